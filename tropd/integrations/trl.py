"""tropd's objectives inside TRL: :class:`TrOPDTrainer`, a ``trl.DistillationTrainer`` whose loss is a tropd objective.

Everything but the loss stays TRL's: on-policy generation (HF or vLLM), accelerate (DDP, FSDP, DeepSpeed), PEFT,
logging and checkpointing. Per micro-batch, on TRL's prompts and the student's completions:

- the student's and the teacher's final hidden states at the completion positions, from TRL's own
  ``_get_last_hidden_state`` (the student's through the DDP/FSDP wrapper, as TRL routes it);
- teacher scores (sampled-token log-prob, top-k, entropy, full logits: only what the objective needs) from the
  teacher's hidden states and LM head, chunk by chunk (:func:`tropd.objectives.teacher_scores.scores_from_hidden`);
- behaviour log-probs ``b_t = log softmax(z_t / τ)[y_t]`` of the student at TRL's sampling temperature τ (the
  distribution the completion was drawn from; no gradient);
- the loss: the objective on the fused path (student hidden states + LM head, chunked; no ``[B, T, V]`` logits),
  divided by the number of **generated** completion tokens of the global batch (TRL's ``num_items_in_batch`` of
  the completions, over the number of processes, which DDP's gradient averaging restores), never by the
  dataset's token count.

The objective's metrics (trust fraction, outlier share, reward quantiles, K1 estimate, ...) are logged under
``tropd/<name>`` with TRL's own. Not available inside TRL (one-line errors at construction): teacher-prefix
guidance (``tropd``: TRL's generation cannot start a completion with teacher-written tokens; ``fkl_outlier`` is
TrOPD without guidance), objectives that need other rollouts (``trb``, ``gkd``'s teacher rows, ``sft``), and
sampling with ``top_p`` < 1, ``top_k`` or ``min_p`` (the behaviour log-probs would need the truncated
distribution).

The adapter uses tropd's objectives layer only (``get_objective``, ``TokenInputs``, the LM head and the teacher
scores' math), never its trainer, config or models (``tests/test_layers.py`` checks this).
"""

from __future__ import annotations

import torch
from trl import DistillationTrainer

from tropd.objectives import TokenInputs, get_objective
from tropd.objectives.head import FUSED_CHUNK, LMHead
from tropd.objectives.teacher_scores import scores_from_hidden


def sampled_logprobs(hidden: torch.Tensor, head: LMHead, tokens: torch.Tensor, temperature: float = 1.0,
                     chunk_size: int = FUSED_CHUNK) -> torch.Tensor:
    """``[B, T]`` ``log softmax(head(h) / τ)[y]`` chunk by chunk over positions, without gradient."""
    with torch.no_grad():
        flat = hidden.reshape(-1, hidden.shape[-1])
        ids = tokens.reshape(-1, 1)
        out = [torch.log_softmax(head(h).float() / temperature, -1).gather(-1, y)[:, 0]
               for h, y in zip(flat.split(chunk_size), ids.split(chunk_size))]
        return torch.cat(out).reshape(tokens.shape) if out else flat.new_zeros(tokens.shape)


class TrOPDTrainer(DistillationTrainer):
    """``trl.DistillationTrainer`` with a tropd objective as its loss (module docstring).

    Args:
        objective: a registered tropd objective (``tropd objectives``), e.g. ``"fkl_outlier"``, ``"opd"``,
            ``"eopd"``, ``"clip_outlier"``.
        objective_kwargs: its keywords, e.g. ``{"top_k": 64}``.
        chunk_size: positions per chunk of the fused loss and of the teacher's scores.
        All other arguments are ``DistillationTrainer``'s (``model``, ``teacher_model``, ``args``, datasets, ...).
    """

    def __init__(self, *args, objective: str = "fkl_outlier", objective_kwargs: dict | None = None,
                 chunk_size: int = FUSED_CHUNK, **kwargs) -> None:
        self.tropd_objective = get_objective(objective, chunk_size=chunk_size, **dict(objective_kwargs or {}))
        self.tropd_chunk_size = chunk_size
        needs = self.tropd_objective.needs
        if needs.guidance:
            raise ValueError(f"objective {objective!r} trains on teacher-written prefixes, which TRL's generation "
                             "cannot write; use 'fkl_outlier' (TrOPD without guidance) or tropd's own trainer")
        if needs.rollout != "student":
            raise ValueError(f"objective {objective!r} needs {needs.rollout!r} rollouts; TRL's DistillationTrainer "
                             "samples completions from the student only")
        super().__init__(*args, **kwargs)
        a = self.args
        if a.top_p < 1.0 or (a.top_k or 0) > 0 or a.min_p:
            raise ValueError(f"top_p={a.top_p}, top_k={a.top_k}, min_p={a.min_p}: tropd's objectives need the "
                             "behaviour log-probs of plain temperature sampling; set top_p=1.0, top_k=0, min_p=None")

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        completion_ids = inputs["completion_ids"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        width = completion_ids.size(1)
        student_hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, width)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(self.teacher_model, unwrapped_teacher,
                                                       self._get_last_hidden_state, unwrapped_teacher, input_ids,
                                                       attention_mask, width)
        student_head, teacher_head = LMHead.of(unwrapped_student), LMHead.of(unwrapped_teacher)
        needs = self.tropd_objective.needs
        scores = scores_from_hidden(teacher_hidden.to(student_hidden.device), teacher_head, completion_ids, needs,
                                    self.tropd_chunk_size)
        behavior = sampled_logprobs(student_hidden.detach(), student_head, completion_ids, self.temperature,
                                    self.tropd_chunk_size)
        x = TokenInputs(student_hidden=student_hidden, student_head=student_head, tokens=completion_ids,
                        behavior_logprobs=behavior, loss_mask=loss_mask.bool(), **scores.as_kwargs())
        out = self.tropd_objective(x, num_tokens=num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        for key, value in out.metrics.items():
            self._metrics[mode][f"tropd/{key}"].append(value)
        n_valid = x.student_mask.sum()
        entropy_sum = torch.tensor(out.metrics.get("student_entropy", 0.0), device=n_valid.device) * n_valid
        return out.loss, entropy_sum, n_valid
