"""Objectives that need the teacher's full distribution at every position: GKD and TRB.

Both are analytic per-position divergences, so they need no reward, no importance weight and treat every
loss-bearing position alike (GKD's teacher-written sequences arrive as ordinary loss positions, since the
divergence does not depend on who sampled the token). Guidance-prefix positions carry no loss.
"""

from __future__ import annotations

import torch

from tropd.needs import Needs
from tropd.objectives import terms
from tropd.objectives.base import Objective
from tropd.objectives.registry import register


class _FullVocab(Objective):
    row_terms = ("divergence",)
    requires = ()

    def divergence(self, lp_s: torch.Tensor, lp_t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def row_fn(self, logits, rows):
        out = super().row_fn(logits, rows)
        lp = terms.log_softmax(logits)
        out["divergence"] = self.divergence(lp, terms.log_softmax(rows["teacher_logits"]).to(lp.dtype))
        return out

    def combine(self, t, x):
        sm = x.student_mask
        loss = torch.where(sm, t["divergence"], torch.zeros_like(t["divergence"]))
        return loss, {"divergence": t["divergence"]}


@register("gkd")
class GKD(_FullVocab):
    """GKD: generalised JSD_β(π_T‖π_S) over the full vocabulary (β=0 forward KL, β=1 reverse KL); λ = on-policy share."""

    def __init__(self, beta: float = 0.5, lmbda: float = 0.5, chunk_size: int | None = None) -> None:
        super().__init__(chunk_size)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"gkd: beta must be in [0, 1], got {beta}")
        if not 0.0 <= lmbda <= 1.0:
            raise ValueError(f"gkd: lmbda (on-policy fraction) must be in [0, 1], got {lmbda}")
        self.beta = float(beta)
        self.needs = Needs(teacher_logits=True, rollout="gkd_mixed", on_policy_fraction=float(lmbda))

    def divergence(self, lp_s, lp_t):
        return terms.generalized_jsd(lp_s, lp_t, self.beta)


@register("trb")
class TRB(_FullVocab):
    """TRB: reverse KL on the student's top-16 support; warm-up rollouts from the KL-trust-region blend of §4.3."""

    def __init__(self, trb_support: int = 16, chunk_size: int | None = None) -> None:
        super().__init__(chunk_size)
        if trb_support < 1:
            raise ValueError(f"trb: trb_support must be >= 1, got {trb_support}")
        self.trb_support = int(trb_support)
        self.needs = Needs(teacher_logits=True, rollout="trb_blend")

    def divergence(self, lp_s, lp_t):
        return terms.topk_support_rkl(lp_s, lp_t, self.trb_support)
