"""Held-out evaluation of a gym model: greedy answers graded by exact match, their diversity, the teacher's view.

For held-out problems ``p_1..p_n`` and greedy responses ``y_i`` (up to EOS or ``max_new_tokens``):

- ``accuracy``: ``(1/n) Σ_i grade(p_i, y_i)`` (1 iff the text after the last ``####`` is the exact answer);
  ``accuracy/<family>`` the same per task family.
- ``distinct``: mean over responses of distinct tokens / tokens (a collapsed model repeating itself → small).
- ``teacher_nll``: mean per-token NLL of the responses under the teacher, ``−(1/Σ|y_i|) Σ_i log π_T(y_i | p_i)``
  (how far the student's traces are from what the teacher would write).
- ``length``: mean response length in tokens; ``truncated``: share of responses without EOS.
"""

from __future__ import annotations

import torch

from tropd.eval.distill import distinct_ratio, sequence_nll
from tropd.eval.tasks_eval import generate
from tropd.gym.tasks import Problem, grade


class GymEval:
    """``GymEval(problems, tok, teacher)(model) -> dict`` with the metrics of the module docstring."""

    def __init__(self, problems: list[Problem], tok, teacher=None, max_new_tokens: int = 64,
                 batch_size: int = 256) -> None:
        self.problems, self.tok, self.teacher = problems, tok, teacher
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.prompt_ids = [tok(p.prompt)["input_ids"] for p in problems]

    @torch.no_grad()
    def __call__(self, model) -> dict:
        responses, truncated = generate(model, self.tok, self.prompt_ids, max_new_tokens=self.max_new_tokens,
                                        temperature=0.0, batch_size=self.batch_size)
        texts = [self.tok.decode(r, skip_special_tokens=True) for r in responses]
        scores = [grade(p, t) for p, t in zip(self.problems, texts)]
        n = max(len(scores), 1)
        out = {"accuracy": sum(scores) / n,
               "distinct": sum(map(distinct_ratio, responses)) / n,
               "length": sum(map(len, responses)) / n,
               "truncated": sum(truncated) / n,
               "sample": self.problems[0].prompt + texts[0] if texts else ""}
        for family in sorted({p.family for p in self.problems}):
            mine = [s for p, s in zip(self.problems, scores) if p.family == family]
            out[f"accuracy/{family}"] = sum(mine) / len(mine)
        if self.teacher is not None:
            out["teacher_nll"] = sequence_nll(self.teacher, self.prompt_ids, responses, self.tok.pad_token_id,
                                              batch_size=self.batch_size)
        return out
