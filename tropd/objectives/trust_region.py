"""TrOPD (docs/method.md §4) and its no-guidance ablation ``fkl_outlier``.

Student-sampled position ``t`` with K1 reward ``r_t = q_t − b_t``:

    P_trust(t) = min(exp(r_t), 1)                      (speculative-decoding acceptance probability)
    M_t ~ Bernoulli(P_trust(t))                        (trust_mode="sample", fresh each call, detached:
                                                        [U_t < P_trust(t)] with the given trust_uniforms)
    ℓ_t = M_t · pg_k1(r_t) + (1 − M_t) · outlier_t

``trust_mode="expected"`` replaces ``M_t`` by ``P_trust(t)``: the same expected gradient with lower variance.
There the weight on a negative reward is ``P·r = u log u`` with ``u = π_T/π_beh < 1``, bounded below by −1/e.
``outlier_t`` is ``fkl_topk`` (default), 0 (``"mask"``) or ``pg_k1(τ)`` (``"clip"``).

Teacher-prefix (guidance) position: ``ℓ_t = β (q_t − s_t)``, the K1 forward-KL estimate on teacher samples,
whose gradient is ``β ∇(−s_t)`` (β-weighted NLL), β = 0.001 by default.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from tropd.needs import Needs
from tropd.objectives import terms
from tropd.objectives.base import DEFAULT_TAU, Objective
from tropd.objectives.keywords import Range
from tropd.objectives.registry import register

TRUST_MODES = ("sample", "expected")
OUTLIERS = ("fkl", "mask", "clip")


@register("tropd")
class TrOPD(Objective):
    """TrOPD: K1 OPD inside the trust region M~Bernoulli(min(π_T/π_beh,1)), forward KL on outliers, teacher-prefix guidance."""

    keyword_ranges = {"top_k": Range(1, None), "beta": Range(0, None)}

    def __init__(self, top_k: int = 64, beta: float = 1e-3, tau: float = DEFAULT_TAU, trust_mode: str = "sample",
                 outlier: str = "fkl", chunk_size: int | None = None) -> None:
        super().__init__(chunk_size)
        if trust_mode not in TRUST_MODES:
            raise ValueError(f"{self.name}: trust_mode must be one of {TRUST_MODES}, got {trust_mode!r}")
        if outlier not in OUTLIERS:
            raise ValueError(f"{self.name}: outlier must be one of {OUTLIERS}, got {outlier!r}")
        self.top_k, self.beta, self.tau = top_k, float(beta), float(tau)
        self.trust_mode, self.outlier = trust_mode, outlier
        self.row_terms = ("fkl_topk",) if outlier == "fkl" else ()
        uses_topk = outlier == "fkl"
        self.needs = Needs(teacher_topk=uses_topk, top_k=int(top_k) if uses_topk else 0,
                           guidance=True)

    def row_fn(self, logits, rows):
        out = super().row_fn(logits, rows)
        if self.outlier == "fkl":
            out["fkl_topk"] = terms.fkl_topk(out["student_topk"], rows["topk_logprobs"])
        return out

    def rows_independent(self, x) -> bool:
        # a Bernoulli draw over the batch depends on the batch's layout; given uniforms or a mask do not
        return self.trust_mode == "expected" or x.trust_mask is not None or x.trust_uniforms is not None

    def trust_weight(self, p_trust: torch.Tensor, x) -> torch.Tensor:
        """``M_t`` (the given ``trust_mask``, else ``[U_t < P_trust]`` with the given ``trust_uniforms``, else a
        Bernoulli draw with ``generator``) or ``P_trust`` under ``trust_mode="expected"``."""
        if self.trust_mode == "expected":
            return p_trust
        if x.trust_mask is not None:
            return x.trust_mask.to(p_trust.dtype)
        if x.trust_uniforms is not None:
            return (x.trust_uniforms.to(p_trust.device) < p_trust).to(p_trust.dtype)  # compared in float64
        return torch.bernoulli(p_trust, generator=x.generator)

    def combine(self, t, x):
        sm, tm = x.student_mask, x.teacher_token_mask
        s, b, r = t["s"], t["behavior_logprobs"], t["reward"]
        zero = torch.zeros_like(s)
        p_trust = torch.where(sm, torch.exp(r.clamp(max=0.0)), zero)
        w = torch.where(sm, self.trust_weight(p_trust, x), zero)
        if self.outlier == "fkl":
            outlier = t["fkl_topk"]
        elif self.outlier == "clip":
            outlier = terms.pg_k1(torch.full_like(r, self.tau), s, b)
        else:
            outlier = zero
        trust = torch.where(sm, w * terms.pg_k1(r, s, b), zero)
        out_part = torch.where(sm, (1.0 - w) * outlier, zero)
        parts = {"region_trust": trust, "region_outlier": out_part, "trust_frac": w,
                 "p_trust": p_trust, "frac_masked": torch.where(sm, 1.0 - w, zero)}
        loss = trust + out_part
        if self.needs.guidance:
            guide = torch.where(tm, self.beta * (t["teacher_logprobs"] - s), zero)
            parts["region_guidance"] = guide
            loss = loss + guide
        if self.outlier == "fkl":
            weight = torch.where(sm, 1.0 - w, zero).detach()
            denom = weight.sum()
            parts["fkl_outlier"] = (weight * t["fkl_topk"]).sum() / denom if denom > 0 else zero.sum()
        return loss, parts


@register("fkl_outlier")
class FKLOutlier(TrOPD):
    """Trust region + top-k forward KL on outliers, without teacher-prefix guidance (TrOPD ablation)."""

    def __init__(self, top_k: int = 64, tau: float = DEFAULT_TAU, trust_mode: str = "sample",
                 chunk_size: int | None = None) -> None:
        super().__init__(top_k=top_k, beta=0.0, tau=tau, trust_mode=trust_mode, outlier="fkl", chunk_size=chunk_size)
        self.needs = replace(self.needs, guidance=False)
