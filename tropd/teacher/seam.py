"""The ``Teacher`` seam: what the trainer asks of a teacher, wherever it runs.

A teacher scores rollouts: given a :class:`~tropd.rollout.RolloutBatch` and the objective's
:class:`~tropd.objectives.registry.Needs`, it returns :class:`TeacherScores` at every response position, with only
the fields the objective needs. :class:`InProcessTeacher` (the default) runs a frozen HF model in this process;
a teacher on other machines implements the same method. The trainer only ever calls ``score``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import nn

from tropd.needs import Needs
from tropd.rollout.batch import RolloutBatch
from tropd.teacher.scoring import TeacherScores, score_with_teacher


@runtime_checkable
class Teacher(Protocol):
    """Scores rollouts: ``score(batch, needs) -> TeacherScores`` (fields ``[B, T(, K)]`` on any device)."""

    def score(self, batch: RolloutBatch, needs: Needs) -> TeacherScores: ...


class InProcessTeacher:
    """A frozen causal LM in this process, scored ``chunk_size`` positions at a time (:func:`score_with_teacher`).

    ``model`` is public: the default sampler uses it to write guidance prefixes, blend TRB rollouts and sample
    GKD teacher rows."""

    def __init__(self, model: nn.Module, chunk_size: int = 512) -> None:
        self.model = model.requires_grad_(False).eval()
        self.chunk_size = chunk_size

    def score(self, batch: RolloutBatch, needs: Needs) -> TeacherScores:
        return score_with_teacher(self.model, batch.input_ids, batch.attention_mask, batch.response_start,
                                  batch.tokens, needs, chunk_size=self.chunk_size)
