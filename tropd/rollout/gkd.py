"""GKD rollouts (Agarwal et al.): a mix of student-sampled and teacher-sampled sequences.

Each sequence is written entirely by the teacher with probability ``1 − λ`` (independent Bernoulli per
sequence: ``U_i ≥ λ`` with ``U_i ~ Uniform[0, 1)``), else by the student (λ = on-policy fraction). Teacher rows
carry loss on every response token but are NOT tagged in ``teacher_token_mask``: GKD's loss is a full-distribution
divergence at every position, whoever wrote the token. ``teacher_rows`` marks them; ``behavior_logprobs`` are the
sampling log-probs of whichever model wrote the row.

Random draws, in order: ``U`` (B values), teacher decoding (teacher rows), student decoding (the other rows).
``λ = 1`` draws nothing extra (identical to plain sampling); ``λ = 0`` draws no ``U`` either (all teacher).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from tropd.rollout.batch import RolloutBatch, RolloutRow
from tropd.rollout.sampling import SamplingConfig, model_device, sample, sample_rows, uniform


def sample_gkd_mixed(student: nn.Module, teacher: nn.Module, prompts: Sequence[Sequence[int]],
                     cfg: SamplingConfig, *, lmbda: float,
                     generator: torch.Generator | None = None) -> RolloutBatch:
    """Per sequence: teacher-written with probability ``1 − lmbda``, else student-written (module docstring)."""
    if not 0.0 <= lmbda <= 1.0:
        raise ValueError(f"sample_gkd_mixed: lmbda (on-policy fraction) must be in [0, 1], got {lmbda}")
    if lmbda >= 1.0:
        return sample(student, prompts, cfg, generator=generator)
    b = len(prompts)
    by_teacher = torch.ones(b, dtype=torch.bool) if lmbda <= 0.0 else uniform(b, generator) >= lmbda
    teacher_idx = torch.nonzero(by_teacher).flatten().tolist()
    student_idx = torch.nonzero(~by_teacher).flatten().tolist()
    rows: list[RolloutRow | None] = [None] * b
    if teacher_idx:
        for i, row in zip(teacher_idx, sample_rows(teacher, [prompts[i] for i in teacher_idx], cfg,
                                                   generator=generator)):
            row.teacher_row = True
            rows[i] = row
    if student_idx:
        for i, row in zip(student_idx, sample_rows(student, [prompts[i] for i in student_idx], cfg,
                                                   generator=generator)):
            rows[i] = row
    teacher_tokens = sum(int(rows[i].tokens.numel()) for i in teacher_idx)
    return RolloutBatch.from_rows(prompts, rows, cfg.pad_token_id,
                                  info={"teacher_generated_tokens": float(teacher_tokens)},
                                  device=model_device(student))
