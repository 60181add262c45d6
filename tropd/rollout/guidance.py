"""Off-policy guidance (docs/method.md §4.2): rollouts that start with a teacher-written prefix the student continues.

Cap schedule (cosine from the full budget to 0 over ``T_anneal`` steps)::

    L_max(k) = ⌊ L_gen · ½ (1 + cos(π · k / T_anneal)) ⌋   for k < T_anneal,   0 for k ≥ T_anneal

Per rollout i: ``U_i ~ Uniform[0, 1)`` (row i's ``"guidance_cap"`` stream), ``cap_i = ⌊U_i · L_max⌋``; a guided
rollout keeps the first ``l_i = min(cap_i, len(teacher response_i))`` tokens of a teacher sample (drawn with the same
:class:`~tropd.rollout.sampling.SamplingConfig` as the student's), and the student writes the rest of the
length budget ``L_gen − l_i``. Prefix tokens are teacher positions (``teacher_token_mask``; behaviour log-prob =
the teacher's sampling log-prob); the continuation is student-sampled.

Decisions (documented here, pinned by tests):
- Which rollouts are guided: an exact count with stochastic rounding over the step's **global** batch of
  ``B`` rollouts (all processes), ``n = ⌊f·B⌋ + Bernoulli(f·B − ⌊f·B⌋)`` rows chosen by a random permutation
  drawn from a stream every process shares, so the share is f in expectation and within 1/B of it in every
  step, and a row is guided or not whatever process or generation chunk it lands in.
- The teacher samples each guided row only up to its own ``cap_i`` (per-row budget), so ``l_i`` is simply the
  length of what it wrote. If that prefix ends with EOS, the response is complete: it is kept whole (EOS included,
  it carries loss as a teacher position) and the student writes nothing for that row.
- Rows with ``cap_i = 0`` (guided or not) get no prefix; when no row has a positive cap the teacher is not run.
  When ``L_max = 0`` or ``guided_fraction = 0`` the result is identical to plain sampling with the same streams.
- Random streams (:class:`~tropd.rollout.streams.RowStreams`): per row ``"guidance_cap"`` (``U_i``),
  ``"teacher"`` (the prefix tokens) and ``"student"`` (the continuation, the same stream plain sampling uses);
  shared ``"guided_rows"`` (the rounding draw, then the permutation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from tropd.rollout.batch import RolloutBatch, RolloutRow
from tropd.rollout.sampling import (SamplingConfig, StudentRows, model_device, sample, student_sample_rows,
                                    teacher_rows)
from tropd.rollout.streams import RowStreams
from tropd.settings import is_int, is_number, require, setting

if TYPE_CHECKING:
    from tropd.teacher.protocol import Teacher


@dataclass
class GuidanceConfig:
    """Teacher-prefix guidance settings (docs/method.md §4.2); the ``guidance`` section of a run's config."""

    enabled: bool | None = setting(None, "Teacher-prefix guidance (docs/method.md §4.2); null = on iff the objective "
                                         "trains on teacher prefixes (tropd); false = plain student rollouts.")
    guided_fraction: float = setting(1.0, "Share of the step's rollouts that get a teacher prefix, in [0, 1] (exact "
                                          "count, stochastic rounding).")
    anneal_steps: int | None = setting(None, "T_anneal: steps over which the prefix cap decays to 0; null = all "
                                             "training steps of the objective.")

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Each key's type and range; :class:`~tropd.settings.ConfigError` naming the key (``guidance.*``)."""
        require(self.enabled is None or isinstance(self.enabled, bool), "guidance.enabled",
                f"must be true, false or null, got {self.enabled!r}")
        require(is_number(self.guided_fraction), "guidance.guided_fraction",
                f"must be a number, got {self.guided_fraction!r}")
        require(0 <= self.guided_fraction <= 1, "guidance.guided_fraction",
                f"must be in [0, 1], got {self.guided_fraction}")
        require(self.anneal_steps is None or is_int(self.anneal_steps), "guidance.anneal_steps",
                f"must be an integer or null, got {self.anneal_steps!r}")
        require(self.anneal_steps is None or self.anneal_steps >= 1, "guidance.anneal_steps",
                f"must be >= 1 or null, got {self.anneal_steps}")


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
    """``[B]`` bool: ``⌊f·B⌋ + Bernoulli(frac(f·B))`` rows, chosen uniformly without replacement (CPU generator)."""
    exact = fraction * batch_size
    n = int(math.floor(exact))
    if torch.rand((), generator=generator, dtype=torch.float64).item() < exact - n:
        n += 1
    order = torch.randperm(batch_size, generator=generator)
    rows = torch.zeros(batch_size, dtype=torch.bool)
    rows[order[:n]] = True
    return rows


def sample_with_guidance(student: nn.Module, teacher: Teacher, prompts: Sequence[Sequence[int]],
                         cfg: SamplingConfig, *, step: int, total_steps: int,
                         guided_fraction: float = GuidanceConfig.guided_fraction,
                         anneal_steps: int | None = GuidanceConfig.anneal_steps,
                         streams: RowStreams | int | None = None,
                         student_rows: StudentRows | None = None) -> RolloutBatch:
    """Rollouts with teacher prefixes: teacher writes ``l_i`` tokens, the student continues (module docstring).

    ``streams``: the rows' random streams (:meth:`RowStreams.resolve`); their ``total_rows`` is the batch the
    guided rows are chosen over. ``student_rows``: another engine writes the student's tokens
    (:data:`~tropd.rollout.sampling.StudentRows`).

    The result's ``info`` holds ``guidance_cap`` (``L_max`` this step) and ``teacher_generated_tokens``.
    """
    if not 0.0 <= guided_fraction <= 1.0:
        raise ValueError(f"sample_with_guidance: guided_fraction must be in [0, 1], got {guided_fraction}")
    l_max = guidance_cap(step, total_steps, cfg.max_new_tokens, anneal_steps)
    device = model_device(student)
    b = len(prompts)
    streams = RowStreams.resolve(streams, b)
    if l_max == 0 or guided_fraction == 0.0:
        batch = sample(student, prompts, cfg, streams=streams, student_rows=student_rows)
        batch.info.update(guidance_cap=float(l_max), teacher_generated_tokens=0.0)
        return batch

    caps = torch.floor(streams.uniform("guidance_cap")[:, 0] * l_max).long()
    guided = choose_guided_rows(streams.total_rows, guided_fraction, streams.shared("guided_rows"))
    caps = torch.where(guided[list(streams.rows)], caps, torch.zeros_like(caps))

    prefixes: list[RolloutRow | None] = [None] * b
    teacher_idx = torch.nonzero(caps > 0).flatten().tolist()
    if teacher_idx:
        written = teacher_rows(teacher, [prompts[i] for i in teacher_idx], cfg, caps[teacher_idx],
                               streams.select(teacher_idx))
        for i, row in zip(teacher_idx, written):
            prefixes[i] = row

    contexts, budgets = [], []
    for i in range(b):
        pre = prefixes[i]
        n_pre = 0 if pre is None else int(pre.tokens.numel())
        contexts.append(list(prompts[i]) + ([] if pre is None else pre.tokens.tolist()))
        budgets.append(0 if pre is not None and pre.eos else cfg.max_new_tokens - n_pre)
    continued = student_sample_rows(student, contexts, cfg, torch.tensor(budgets, dtype=torch.long), streams,
                                    student_rows)

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
