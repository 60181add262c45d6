"""GKD rollouts (Agarwal et al.): a mix of student-sampled and teacher-sampled sequences.

Each sequence is written entirely by the teacher with probability ``1 − λ`` (independent Bernoulli per
sequence: ``U_i ≥ λ`` with ``U_i ~ Uniform[0, 1)`` from row i's ``"gkd_source"`` stream), else by the student (λ = on-policy fraction). Teacher rows
carry loss on every response token but are NOT tagged in ``teacher_token_mask``: GKD's loss is a full-distribution
divergence at every position, whoever wrote the token. ``teacher_rows`` marks them; ``behavior_logprobs`` are the
sampling log-probs of whichever model wrote the row.

Random streams per row (:class:`~tropd.rollout.streams.RowStreams`): ``"gkd_source"``, then ``"teacher"`` or
``"student"`` for the tokens. ``λ = 1`` is identical to plain sampling with the same streams.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from tropd.rollout.batch import RolloutBatch, RolloutRow
from tropd.rollout.sampling import (SamplingConfig, StudentRows, model_device, sample, student_sample_rows,
                                    teacher_rows)
from tropd.rollout.streams import RowStreams

if TYPE_CHECKING:
    from tropd.teacher.protocol import Teacher


def sample_gkd_mixed(student: nn.Module, teacher: Teacher | None, prompts: Sequence[Sequence[int]],
                     cfg: SamplingConfig, *, lmbda: float,
                     streams: RowStreams | int | None = None,
                     student_rows: StudentRows | None = None) -> RolloutBatch:
    """Per sequence: teacher-written with probability ``1 − lmbda``, else student-written (module docstring).
    ``teacher`` may be None when ``lmbda = 1`` (it is not run then). ``student_rows``: another engine writes the
    student's rows (:data:`~tropd.rollout.sampling.StudentRows`)."""
    if not 0.0 <= lmbda <= 1.0:
        raise ValueError(f"sample_gkd_mixed: lmbda (on-policy fraction) must be in [0, 1], got {lmbda}")
    b = len(prompts)
    streams = RowStreams.resolve(streams, b)
    if lmbda >= 1.0:
        return sample(student, prompts, cfg, streams=streams, student_rows=student_rows)
    by_teacher = streams.uniform("gkd_source")[:, 0] >= lmbda
    teacher_idx = torch.nonzero(by_teacher).flatten().tolist()
    student_idx = torch.nonzero(~by_teacher).flatten().tolist()
    rows: list[RolloutRow | None] = [None] * b
    if teacher_idx:
        for i, row in zip(teacher_idx, teacher_rows(teacher, [prompts[i] for i in teacher_idx], cfg,
                                                    streams=streams.select(teacher_idx))):
            row.teacher_row = True
            rows[i] = row
    if student_idx:
        for i, row in zip(student_idx, student_sample_rows(student, [prompts[i] for i in student_idx], cfg, None,
                                                           streams.select(student_idx), student_rows)):
            rows[i] = row
    teacher_tokens = sum(int(rows[i].tokens.numel()) for i in teacher_idx)
    return RolloutBatch.from_rows(prompts, rows, cfg.pad_token_id,
                                  info={"teacher_generated_tokens": float(teacher_tokens)},
                                  device=model_device(student))
