"""Off-policy guidance (docs/method.md §4.2): rollouts that start with a teacher-written prefix the student continues.

Cap schedule (cosine from the full budget to 0 over ``T_anneal`` steps)::

    L_max(k) = ⌊ L_gen · ½ (1 + cos(π · k / T_anneal)) ⌋   for k < T_anneal,   0 for k ≥ T_anneal

Per rollout i: ``U_i ~ Uniform[0, 1)``, ``cap_i = ⌊U_i · L_max⌋``; a guided rollout keeps the first
``l_i = min(cap_i, len(teacher response_i))`` tokens of a teacher sample (drawn with the same
:class:`~tropd.rollout.sampling.SamplingConfig` as the student's), and the student writes the rest of the
length budget ``L_gen − l_i``. Prefix tokens are teacher positions (``teacher_token_mask``; behaviour log-prob =
the teacher's sampling log-prob); the continuation is student-sampled.

Decisions (documented here, pinned by tests):
- Which rollouts are guided: an exact count with stochastic rounding,
  ``n = ⌊f·B⌋ + Bernoulli(f·B − ⌊f·B⌋)`` rows chosen by a random permutation, so the share is f in
  expectation and within 1/B of it in every batch.
- The teacher samples each guided row only up to its own ``cap_i`` (per-row budget), so ``l_i`` is simply the
  length of what it wrote. If that prefix ends with EOS, the response is complete: it is kept whole (EOS included,
  it carries loss as a teacher position) and the student writes nothing for that row.
- Rows with ``cap_i = 0`` (guided or not) get no prefix; when no row has a positive cap the teacher is not run.
  When ``L_max = 0`` or ``guided_fraction = 0`` no randomness is drawn for guidance at all, so the result is
  identical to plain sampling with the same generator.
- Random draws, in order: ``U`` (B values), the rounding draw (1), the row permutation, teacher decoding,
  student decoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from tropd.rollout.batch import RolloutBatch, RolloutRow
from tropd.rollout.sampling import SamplingConfig, model_device, sample, sample_rows, uniform


@dataclass(frozen=True)
class GuidanceConfig:
    """Teacher-prefix guidance settings (docs/method.md §4.2).

    Attributes:
        enabled: add teacher prefixes when the objective asks for guidance (False: plain student rollouts).
        guided_fraction: share of rollouts that get a prefix, in [0, 1] (exact count, stochastic rounding).
        anneal_steps: ``T_anneal``, steps over which the cap decays to 0; None means all training steps.
    """

    enabled: bool = True
    guided_fraction: float = 1.0
    anneal_steps: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.guided_fraction <= 1.0:
            raise ValueError(f"GuidanceConfig.guided_fraction must be in [0, 1], got {self.guided_fraction}")
        if self.anneal_steps is not None and self.anneal_steps < 0:
            raise ValueError(f"GuidanceConfig.anneal_steps must be >= 0 or None, got {self.anneal_steps}")


def guidance_cap(step: int, total_steps: int, max_new_tokens: int, anneal_steps: int | None = None) -> int:
    """``L_max(step) = ⌊L_gen · ½(1 + cos(π · step / T_anneal))⌋``, and 0 once ``step ≥ T_anneal``.

    ``T_anneal = anneal_steps`` if given, else ``total_steps``; ``L_gen = max_new_tokens``. ``T_anneal = 0``
    disables guidance (cap 0 at every step).
    """
    if step < 0:
        raise ValueError(f"guidance_cap: step must be >= 0, got {step}")
    t_anneal = total_steps if anneal_steps is None else anneal_steps
    if t_anneal < 0:
        raise ValueError(f"guidance_cap: the anneal horizon must be >= 0, got {t_anneal}")
    if step >= t_anneal:
        return 0
    return int(math.floor(max_new_tokens * 0.5 * (1.0 + math.cos(math.pi * step / t_anneal))))


def choose_guided_rows(batch_size: int, fraction: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[B]`` bool: ``⌊f·B⌋ + Bernoulli(frac(f·B))`` rows, chosen uniformly without replacement."""
    exact = fraction * batch_size
    n = int(math.floor(exact))
    if uniform(1, generator).item() < exact - n:
        n += 1
    device = generator.device if generator is not None else torch.device("cpu")
    order = torch.randperm(batch_size, generator=generator, device=device).cpu()
    rows = torch.zeros(batch_size, dtype=torch.bool)
    rows[order[:n]] = True
    return rows


def sample_with_guidance(student: nn.Module, teacher: nn.Module, prompts: Sequence[Sequence[int]],
                         cfg: SamplingConfig, *, step: int, total_steps: int, guided_fraction: float = 1.0,
                         anneal_steps: int | None = None,
                         generator: torch.Generator | None = None) -> RolloutBatch:
    """Rollouts with teacher prefixes: teacher writes ``l_i`` tokens, the student continues (module docstring).

    The result's ``info`` holds ``guidance_cap`` (``L_max`` this step) and ``teacher_generated_tokens``.
    """
    if not 0.0 <= guided_fraction <= 1.0:
        raise ValueError(f"sample_with_guidance: guided_fraction must be in [0, 1], got {guided_fraction}")
    l_max = guidance_cap(step, total_steps, cfg.max_new_tokens, anneal_steps)
    device = model_device(student)
    if l_max == 0 or guided_fraction == 0.0:
        batch = sample(student, prompts, cfg, generator=generator)
        batch.info.update(guidance_cap=float(l_max), teacher_generated_tokens=0.0)
        return batch

    b = len(prompts)
    caps = torch.floor(uniform(b, generator) * l_max).long()
    guided = choose_guided_rows(b, guided_fraction, generator)
    caps = torch.where(guided, caps, torch.zeros_like(caps))

    prefixes: list[RolloutRow | None] = [None] * b
    teacher_idx = torch.nonzero(caps > 0).flatten().tolist()
    if teacher_idx:
        written = sample_rows(teacher, [prompts[i] for i in teacher_idx], cfg, caps[teacher_idx], generator)
        for i, row in zip(teacher_idx, written):
            prefixes[i] = row

    contexts, budgets = [], []
    for i in range(b):
        pre = prefixes[i]
        n_pre = 0 if pre is None else int(pre.tokens.numel())
        contexts.append(list(prompts[i]) + ([] if pre is None else pre.tokens.tolist()))
        budgets.append(0 if pre is not None and pre.eos else cfg.max_new_tokens - n_pre)
    continued = sample_rows(student, contexts, cfg, torch.tensor(budgets, dtype=torch.long), generator)

    rows = []
    for i in range(b):
        pre, cont = prefixes[i], continued[i]
        if pre is None:
            rows.append(cont)
            continue
        tokens = torch.cat([pre.tokens, cont.tokens])
        eos = pre.eos or cont.eos
        rows.append(RolloutRow(
            tokens=tokens,
            behavior_logprobs=torch.cat([pre.behavior_logprobs, cont.behavior_logprobs]),
            guidance_length=int(pre.tokens.numel()),
            eos=eos,
            truncated=not eos and int(tokens.numel()) >= cfg.max_new_tokens,
        ))
    teacher_tokens = sum(int(prefixes[i].tokens.numel()) for i in teacher_idx)
    info = {"guidance_cap": float(l_max), "teacher_generated_tokens": float(teacher_tokens)}
    return RolloutBatch.from_rows(prompts, rows, cfg.pad_token_id, info=info, device=device)
