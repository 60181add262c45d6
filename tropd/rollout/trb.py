"""TRB behaviour blending (docs/method.md §4.3): warm-up rollouts from a KL-trust-region blend of student and teacher.

Geometric blend, for log-probs ``s = log π_S`` and ``t = log π_T`` over one vocabulary::

    log μ_β = (1−β)·s + β·t − log Z(β),      log Z(β) = logsumexp((1−β)·s + β·t)

With ``f(β) = log Z(β)`` (a convex cumulant function, ``f(0) = 0``)::

    KL(μ_β ‖ π_S) = β·E_μβ[t − s] − f(β) = β f'(β) − f(β),   d/dβ KL = β·Var_μβ[t − s] ≥ 0,

so the KL is non-decreasing in β, ``KL(μ_0‖π_S) = 0`` and ``KL(μ_1‖π_S) = KL(π_T‖π_S)``. The step's mixing
weight is ``β* = max{β ∈ [0,1] : KL(μ_β‖π_S) ≤ ε}``, found per row by a safeguarded Newton search in float64
(:func:`solve_beta`).

Budget schedule (:meth:`TRBConfig.budget`): ``ε_k = ε_0 (1 − k/K)`` for ``k ≤ K``, then 0 (pure student
rollouts; the teacher is not run).

Decoding decision (temperature / top-p): temperature is applied to both models' logits first, the β* search and
the blend use those tempered distributions, and top-p (or greedy at temperature 0) is applied to the blend last;
the behaviour log-prob of a token is its log-prob under that final distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from tropd.rollout.batch import RolloutBatch, left_pad
from tropd.rollout.sampling import (
    Combine,
    SamplingConfig,
    decode,
    inference_mode,
    model_device,
    rows_from_decode,
    sample,
    temperature_logprobs,
    truncate_logprobs,
)
from tropd.rollout.streams import RowStreams
from tropd.settings import is_int, is_number, require, setting

if TYPE_CHECKING:
    from tropd.teacher.protocol import Teacher


@dataclass
class TRBConfig:
    """TRB warm-up blending settings (docs/method.md §4.3); the ``trb`` section of a run's config."""

    eps0: float = setting(0.02, "ε_0: the KL budget KL(μ_β‖π_S) per decoding step at the first training step "
                                "(docs/method.md §4.3).")
    warmup_steps: int = setting(50, "K: training steps over which the budget decays linearly to 0 (then plain "
                                    "student rollouts).")
    iters: int = setting(16, "Safeguarded Newton steps for β* per decoded token (float64; each one KL evaluation "
                             "over the vocabulary).")

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Each key's type and range; :class:`~tropd.settings.ConfigError` naming the key (``trb.*``)."""
        require(is_number(self.eps0), "trb.eps0", f"must be a number, got {self.eps0!r}")
        require(self.eps0 >= 0, "trb.eps0", f"must be >= 0, got {self.eps0}")
        require(is_int(self.warmup_steps), "trb.warmup_steps", f"must be an integer, got {self.warmup_steps!r}")
        require(self.warmup_steps >= 0, "trb.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(is_int(self.iters), "trb.iters", f"must be an integer, got {self.iters!r}")
        require(self.iters >= 1, "trb.iters", f"must be >= 1, got {self.iters}")

    def budget(self, step: int) -> float:
        """``ε_k = ε_0 (1 − k/K)`` for ``k ≤ K``, else 0 (``K = warmup_steps``; K = 0 gives 0 at every step)."""
        if step < 0:
            raise ValueError(f"TRB budget: step must be >= 0, got {step}")
        if self.warmup_steps <= 0 or step >= self.warmup_steps:
            return 0.0
        return float(self.eps0) * (1.0 - step / self.warmup_steps)


def _scaled(weight: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """``weight · logp`` with ``0 · (−inf) = 0`` (a zero weight removes the factor, as in p^0 = 1)."""
    return torch.where(weight == 0, torch.zeros_like(logp), weight * logp)


def _beta_column(beta: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    b = torch.as_tensor(beta, dtype=like.dtype, device=like.device)
    return b.unsqueeze(-1) if b.dim() > 0 else b


def blend_logprobs(student_logp: torch.Tensor, teacher_logp: torch.Tensor,
                   beta: torch.Tensor | float) -> torch.Tensor:
    """``log μ_β``, ``μ_β ∝ π_S^{1−β} π_T^{β}`` over the last dim, normalised in log space.

    ``beta`` is a scalar or one value per row (shape = the inputs' leading dims). Computed in the inputs' dtype.
    """
    s, t = torch.broadcast_tensors(student_logp, teacher_logp)
    b = _beta_column(beta, s)
    z = _scaled(1.0 - b, s) + _scaled(b, t)
    return z - torch.logsumexp(z, dim=-1, keepdim=True)


def kl_blend_student(student_logp: torch.Tensor, teacher_logp: torch.Tensor,
                     beta: torch.Tensor | float) -> torch.Tensor:
    """``KL(μ_β ‖ π_S) = Σ_v μ_β(v) (log μ_β(v) − log π_S(v))`` per row (terms with μ_β(v) = 0 count 0).

    ``student_logp`` is renormalised (log-softmax) first, so unnormalised logits are accepted too.
    """
    s = torch.log_softmax(student_logp, dim=-1)
    return _kl_blend(s, torch.log_softmax(teacher_logp, dim=-1), beta)


def _kl_blend(s: torch.Tensor, t: torch.Tensor, beta: torch.Tensor | float) -> torch.Tensor:
    """:func:`kl_blend_student` for already-normalised log-probs."""
    log_mu = blend_logprobs(s, t, beta)
    mu = log_mu.exp()
    terms = torch.where(mu > 0, mu * (log_mu - s), torch.zeros_like(mu))
    return terms.sum(-1)


FULL_BLEND_SLACK = 1e-12
"""Absolute tolerance (nats) on the ``KL(π_T‖π_S) ≤ ε`` test for β* = 1: float64 rounding of the two KL sums."""


#: Newton aims at ``ε − min(δ, ε/2)`` with this δ (nats), so that its limit is feasible despite float64 rounding.
NEWTON_SLACK = 1e-10


def _kl_and_var(s_live: torch.Tensor, d: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``KL(μ_β‖π_S)`` and ``Var_μβ[t − s]`` per row for ``0 < β < 1``: the KL's slope in β is ``β·Var``.

    ``s_live`` is ``s`` where both ``s`` and ``t`` are finite and ``−inf`` elsewhere (μ_β is zero wherever
    either model gives zero), ``d = t − s`` there and 0 elsewhere. With ``z = s + β d`` and
    ``f(β) = logsumexp(z)`` (``f(0) = 0``): ``μ_β = exp(z − f)``, ``KL = β E_μ[d] − f``.
    """
    z = torch.addcmul(s_live, beta.unsqueeze(-1), d)
    f = torch.logsumexp(z, dim=-1, keepdim=True)
    mu = z.sub_(f).exp_()
    md = mu.mul_(d)
    mean = md.sum(-1)
    second = md.mul_(d).sum(-1)
    return beta * mean - f[..., 0], (second - mean.square()).clamp(min=0.0)


def solve_beta(student_logp: torch.Tensor, teacher_logp: torch.Tensor, eps: torch.Tensor | float,
               iters: int = TRBConfig.iters) -> torch.Tensor:
    """``β* = max{β ∈ [0,1] : KL(μ_β‖π_S) ≤ ε}`` per row, float64.

    Returns 1 where ``KL(π_T‖π_S) ≤ ε`` (``μ_1 = π_T``; compared with a float64 rounding slack of
    :data:`FULL_BLEND_SLACK`, so a budget set to exactly that KL gives β* = 1). Otherwise a safeguarded Newton
    search (``iters`` evaluations of the KL and its slope ``β·Var_μβ[t − s]``) keeps a bracket
    ``KL(μ_lo) ≤ ε < KL(μ_hi)`` from ``[0, 1]``: each step is Newton's when it lands inside the bracket and at
    least halves the step before it, else bisection. It starts at ``β_0 = √(2ε / Var_πS[t − s])`` (the
    small-β expansion ``KL ≈ β² Var/2``); Newton aims at ``ε − min(10⁻¹⁰, ε/2)``
    (:data:`NEWTON_SLACK`) so that the point it converges to is feasible despite rounding. Returns ``lo``:
    always feasible (``KL(μ_0) = 0 ≤ ε``); no host synchronisation. ``eps`` is a scalar or one budget
    per row (must be ≥ 0); ``ε = 0`` gives exactly 0 unless ``π_T = π_S``.
    """
    s = torch.log_softmax(student_logp.double(), dim=-1)
    t = torch.log_softmax(teacher_logp.double(), dim=-1)
    s, t = torch.broadcast_tensors(s, t)
    if isinstance(eps, torch.Tensor) and bool((eps < 0).any()) or not isinstance(eps, torch.Tensor) and eps < 0:
        raise ValueError("solve_beta: the KL budget eps must be >= 0")
    eps_t = torch.as_tensor(eps, dtype=torch.float64, device=s.device).expand(s.shape[:-1])
    live = torch.isfinite(s) & torch.isfinite(t)
    s_live = s.masked_fill(~live, float("-inf"))
    d = (t - s).masked_fill(~live, 0.0)
    full = _kl_blend(s, t, 1.0) <= eps_t + FULL_BLEND_SLACK
    lo = torch.zeros(s.shape[:-1], dtype=torch.float64, device=s.device)
    hi = torch.ones_like(lo)
    mean0 = (s_live.exp() * d).sum(-1)
    var0 = (s_live.exp() * d.square()).sum(-1) - mean0.square()  # Var_πS[t − s] (on the common support)
    beta = torch.sqrt(2 * eps_t / var0).nan_to_num(0.5, 0.5, 0.5).clamp(1e-12, 0.5)
    target = eps_t - torch.clamp(eps_t / 2, max=NEWTON_SLACK)
    last = torch.ones_like(lo)  # size of the step before the current one
    step = torch.ones_like(lo)
    for _ in range(int(iters)):
        kl, var = _kl_and_var(s_live, d, beta)
        ok = kl <= eps_t
        lo = torch.where(ok, torch.maximum(lo, beta), lo)
        hi = torch.where(ok, hi, torch.minimum(hi, beta))
        newton = beta - (kl - target) / (beta * var)
        take = torch.isfinite(newton) & (newton > lo) & (newton < hi) & ((newton - beta).abs() <= 0.5 * last)
        proposal = torch.where(take, newton, 0.5 * (lo + hi))
        last, step = step, (proposal - beta).abs()
        beta = proposal
    lo = torch.where(eps_t > 0, lo, torch.zeros_like(lo))  # ε = 0: only β = 0 (float noise aside) is feasible
    return torch.where(full, torch.ones_like(lo), lo)


def trb_combine(cfg: SamplingConfig, eps: float, iters: int = TRBConfig.iters) -> Combine:
    """Step hook for blended decoding: (student, teacher) logits -> (log μ_β* after top-p, β* per row)."""

    def combine(logits: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        ls, lt = logits
        if ls.shape[-1] != lt.shape[-1]:
            raise ValueError(f"TRB blending needs one vocabulary: student has {ls.shape[-1]} logits, "
                             f"teacher {lt.shape[-1]}")
        s = temperature_logprobs(ls, cfg.temperature).double()
        t = temperature_logprobs(lt, cfg.temperature).double()
        beta = solve_beta(s, t, eps, iters)
        mu = torch.log_softmax(blend_logprobs(s, t, beta).float(), dim=-1)
        return truncate_logprobs(mu, cfg.top_p, greedy=cfg.greedy), beta.float()

    return combine


def sample_trb(student: nn.Module, teacher: Teacher | None, prompts: Sequence[Sequence[int]], cfg: SamplingConfig,
               *, eps: float, iters: int = TRBConfig.iters, streams: RowStreams | int | None = None) -> RolloutBatch:
    """Rollouts drawn token by token from ``μ_β*`` (the student and ``teacher.model_for_blending()`` run on the
    same tokens, each with its own KV cache). ``behavior_logprobs`` are log-probs under the blend; ``blend_beta``
    holds β* per token and ``blend_beta_per_step`` its mean per step. ``eps ≤ 0`` is plain student sampling (the
    teacher is not run; it may be None). Token t of row i uses value t of row i's ``"student"`` stream, as plain
    sampling does.
    """
    device = model_device(student)
    streams = RowStreams.resolve(streams, len(prompts))
    if eps <= 0:
        batch = sample(student, prompts, cfg, streams=streams)
        batch.info["trb_eps"] = 0.0
        return batch
    teacher_model = teacher.model_for_blending()
    ids, mask = left_pad(prompts, cfg.pad_token_id)
    with inference_mode(student, teacher_model):
        out = decode([student, teacher_model], ids, mask, cfg.max_new_tokens, cfg, trb_combine(cfg, eps, iters),
                     streams.uniform("student", cfg.max_new_tokens))
    rows = rows_from_decode(out)
    return RolloutBatch.from_rows(prompts, rows, cfg.pad_token_id, info={"trb_eps": float(eps)}, device=device)
