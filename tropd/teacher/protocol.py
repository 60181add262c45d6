"""The ``Teacher`` protocol: everything a run asks of its frozen teacher, wherever the teacher runs.

A teacher does two things for the pipeline:

- it **scores** rollouts: given a :class:`~tropd.rollout.RolloutBatch` and the objective's
  :class:`~tropd.needs.Needs`, it returns :class:`~tropd.teacher.scoring.TeacherScores` at every response
  position, with only the fields the objective needs (the trainer calls this);
- it **writes rows**: continuations of token contexts, token t of row i drawn with the caller's ``uniforms[i, t]``
  (guidance prefixes, GKD teacher rows, SFT rows: the samplers call this, :func:`tropd.rollout.sampling.teacher_rows`).

TRB blending decodes the teacher token by token beside the student, which only a model in this process can do:
``model_for_blending()`` gives that model, and a teacher elsewhere raises a ``ValueError`` saying so.

It also says what it is: ``context_length`` (the longest sequence it takes, which bounds the prompts a run
accepts) and ``describe()`` (one line for the console). Callers use these, never attributes of one
implementation.

Implementations: :class:`~tropd.teacher.InProcessTeacher` (a frozen model in this process, the default) and
:class:`~tropd.teacher.RemoteTeacher` (the client of ``tropd serve-teacher``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from tropd.needs import Needs
from tropd.rollout.batch import RolloutBatch, RolloutRow
from tropd.rollout.sampling import SamplingConfig
from tropd.teacher.scoring import TeacherScores


@runtime_checkable
class Teacher(Protocol):
    """The frozen teacher of a run (module docstring)."""

    def score(self, batch: RolloutBatch, needs: Needs) -> TeacherScores:
        """Scores at every response position of ``batch`` (fields ``[B, T(, K)]``, on any device)."""
        ...

    def write_rows(self, contexts: list[list[int]], cfg: SamplingConfig, budgets: torch.Tensor,
                   uniforms: torch.Tensor) -> list[RolloutRow]:
        """One continuation per context, at most ``budgets[i]`` tokens, token t of row i drawn with
        ``uniforms[i, t]`` from the teacher's sampling distribution under ``cfg`` (rows untagged, on the CPU)."""
        ...

    def model_for_blending(self) -> nn.Module:
        """The teacher as a model decoded in this process beside the student (TRB); ValueError if it is not."""
        ...

    @property
    def context_length(self) -> int | None:
        """The longest sequence (prompt and response) the teacher takes, in tokens; None when it does not say."""
        ...

    def describe(self) -> str:
        """One line for the console: which model, where, how large."""
        ...
