"""How close a student is to its teacher, measured on held-out prompts (the trainer's evaluation hook).

- ``teacher_text_nll`` / ``teacher_text_ppl``: the student's mean per-token NLL (and perplexity) of the
  teacher's own greedy responses to held-out prompts. Lower = closer to the teacher. It does NOT detect
  collapse on its own (see ``distinct_ratio``).
- ``distinct_ratio``: distinct tokens / tokens of the student's greedy responses, averaged over prompts;
  a collapsed student repeating one token scores near 0 (the teacher's own value is reported alongside).
- ``task_score``: mean grade of the student's greedy responses on prompts that carry a grading reference
  (the same code as ``tropd eval``).
"""

from __future__ import annotations

import math

import torch

from tropd.eval.tasks_eval import generate, score_responses
from tropd.forward import response_logits
from tropd.rollout import left_pad


def distinct_ratio(ids: list[int]) -> float:
    return len(set(ids)) / len(ids) if ids else 0.0


@torch.no_grad()
def sequence_nll(model, prompt_ids: list[list[int]], responses: list[list[int]], pad_id: int,
                 batch_size: int = 8) -> float:
    """Mean per-token NLL of ``responses`` given ``prompt_ids`` under ``model``."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(prompt_ids), batch_size):
        prompts, resps = prompt_ids[i:i + batch_size], responses[i:i + batch_size]
        ids_p, mask_p = left_pad(prompts, pad_id, device)
        width = max(1, max(len(r) for r in resps))
        ids_r = torch.full((len(resps), width), pad_id, dtype=torch.long, device=device)
        mask_r = torch.zeros_like(ids_r)
        for j, r in enumerate(resps):
            ids_r[j, : len(r)] = torch.tensor(r, dtype=torch.long, device=device)
            mask_r[j, : len(r)] = 1
        logits = response_logits(model, torch.cat([ids_p, ids_r], 1), torch.cat([mask_p, mask_r], 1), ids_p.shape[1])
        lp = torch.log_softmax(logits.float(), -1).gather(-1, ids_r.unsqueeze(-1)).squeeze(-1)
        total += float(-(lp * mask_r).sum())
        count += int(mask_r.sum())
    return total / max(count, 1)


class DistillEval:
    """Evaluation hook: teacher-text perplexity, greedy-sample diversity, task score, and one sample text.
    ``teacher`` writes the reference answers: a :class:`~tropd.teacher.Teacher` or a model in this process."""

    def __init__(self, teacher, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int,
                 prompts: list | None = None) -> None:
        self.tokenizer, self.prompt_ids, self.max_new_tokens = tokenizer, prompt_ids, max_new_tokens
        prompts = prompts or []
        self.graded = [i for i, p in enumerate(prompts) if getattr(p, "domain", None) and getattr(p, "reference", None)]
        self.examples = [prompts[i] if hasattr(prompts[i], "prompt") else prompts[i].to_example() for i in self.graded]
        self.teacher_responses = self._greedy(teacher)
        self.teacher_distinct = sum(map(distinct_ratio, self.teacher_responses)) / max(len(prompt_ids), 1)

    def _greedy(self, model) -> list[list[int]]:
        return generate(model, self.tokenizer, self.prompt_ids, max_new_tokens=self.max_new_tokens,
                        temperature=0.0)[0]

    def __call__(self, student) -> dict:
        nll = sequence_nll(student, self.prompt_ids, self.teacher_responses, self.tokenizer.pad_token_id)
        responses = self._greedy(student)
        result = {
            "teacher_text_nll": nll,
            "teacher_text_ppl": math.exp(min(nll, 50.0)),
            "distinct_ratio": sum(map(distinct_ratio, responses)) / max(len(responses), 1),
            "teacher_distinct_ratio": self.teacher_distinct,
            "sample": self.tokenizer.decode(responses[0], skip_special_tokens=True) if responses else "",
        }
        if self.graded:  # graded like `tropd eval` (greedy, one sample per prompt)
            texts = [self.tokenizer.decode(responses[i], skip_special_tokens=True) for i in self.graded]
            owners = list(range(len(self.graded)))
            result["task_score"] = score_responses(self.examples, owners, texts, n=1)["avg@n"]
        return result
