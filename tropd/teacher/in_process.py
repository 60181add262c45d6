"""The default :class:`~tropd.teacher.Teacher`: a frozen causal LM in this process."""

from __future__ import annotations

import torch
from torch import nn

from tropd.models import context_length, describe_size
from tropd.needs import Needs
from tropd.rollout.batch import RolloutBatch, RolloutRow
from tropd.rollout.sampling import SamplingConfig, decode_rows
from tropd.teacher.scoring import TEACHER_CHUNK, TeacherScores, score_with_teacher


class InProcessTeacher:
    """A frozen causal LM in this process: scored ``chunk_size`` positions at a time (:func:`score_with_teacher`),
    its rows decoded with its own KV cache (:func:`~tropd.rollout.sampling.decode_rows`)."""

    def __init__(self, model: nn.Module, chunk_size: int = TEACHER_CHUNK) -> None:
        self._model = model.requires_grad_(False).eval()
        self.chunk_size = chunk_size

    def score(self, batch: RolloutBatch, needs: Needs) -> TeacherScores:
        return score_with_teacher(self._model, batch.input_ids, batch.attention_mask, batch.response_start,
                                  batch.tokens, needs, chunk_size=self.chunk_size)

    def write_rows(self, contexts: list[list[int]], cfg: SamplingConfig, budgets: torch.Tensor,
                   uniforms: torch.Tensor) -> list[RolloutRow]:
        return decode_rows(self._model, contexts, cfg, budgets, uniforms)

    def model_for_blending(self) -> nn.Module:
        return self._model

    @property
    def context_length(self) -> int | None:
        """The longest sequence the model takes (:func:`~tropd.models.context_length`), when its config says."""
        return context_length(self._model)

    def describe(self) -> str:
        return describe_size(self._model)
