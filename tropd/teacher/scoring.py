r"""Score a batch of rollouts with the frozen teacher, computing only what the objective declares it needs.

One no-grad forward of the teacher over ``prompt ++ response`` (layout of :mod:`tropd.forward`) gives the final
hidden states ``h`` at each response position; :func:`~tropd.objectives.teacher_scores.scores_from_hidden` turns
them into the scores with the teacher's LM head, chunk by chunk over positions (the math is in
:mod:`tropd.objectives.teacher_scores`, which also holds :class:`TeacherScores`; both are re-exported here).

The pass runs under ``torch.no_grad`` rather than ``inference_mode``: the results are later saved for the
student's backward pass, which inference tensors cannot be.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tropd.forward import response_hidden
from tropd.needs import Needs
from tropd.objectives.head import LMHead
from tropd.objectives.teacher_scores import TeacherScores, entropy_from_logprobs, scores_from_hidden

if TYPE_CHECKING:  # annotations only: transformers loads when a model does
    from transformers import PreTrainedModel

__all__ = ["TEACHER_CHUNK", "TeacherScores", "entropy_from_logprobs", "score_with_teacher", "scores_from_hidden"]

#: Response positions turned into teacher logits at a time when nothing else is asked (``objective.chunk_size``
#: null, ``tropd serve-teacher --chunk-size``).
TEACHER_CHUNK = 512


@torch.no_grad()
def score_with_teacher(
    teacher: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_start: int,
    tokens: torch.Tensor,
    needs: Needs,
    chunk_size: int = TEACHER_CHUNK,
) -> TeacherScores:
    """Teacher scores at each response position of ``input_ids`` (the math: :mod:`tropd.objectives.teacher_scores`).

    Args:
        teacher: frozen causal LM sharing the student's tokenizer.
        input_ids, attention_mask: ``[B, L]`` left-padded prompts of length ``P = response_start`` followed by
            right-padded responses (:mod:`tropd.forward`).
        tokens: ``[B, T]`` response tokens ``y_t`` (``T = L - P``), usually ``input_ids[:, P:]``.
        needs: which fields to compute; the others are None.
        chunk_size: response positions (over the flattened ``B·T``) turned into logits at a time.
    """
    batch, length = input_ids.shape
    steps = length - response_start
    if tuple(tokens.shape) != (batch, steps):
        raise ValueError(
            f"tokens must be [B, T]=({batch}, {steps}) for input_ids {tuple(input_ids.shape)} and "
            f"response_start={response_start}, got {tuple(tokens.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of positions, got {chunk_size}")
    want_topk = needs.teacher_topk
    want_any = needs.teacher_logprobs or want_topk or needs.teacher_entropy or needs.teacher_logits
    if not want_any:
        return TeacherScores()
    device = next(teacher.parameters()).device
    hidden = response_hidden(teacher, input_ids.to(device), attention_mask.to(device), response_start)
    return scores_from_hidden(hidden, LMHead.of(teacher), tokens.to(device), needs, chunk_size)
