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
from tropd.objectives.keywords import Range
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

    keyword_ranges = {"beta": Range(0, 1), "lmbda": Range(0, 1)}

    def __init__(self, beta: float = 0.5, lmbda: float = 0.5, chunk_size: int | None = None) -> None:
        super().__init__(chunk_size)
        self.beta = float(beta)
        self.needs = Needs(teacher_logits=True, rollout="gkd_mixed", on_policy_fraction=float(lmbda))

    def divergence(self, lp_s, lp_t):
        return terms.generalized_jsd(lp_s, lp_t, self.beta)


@register("trb")
class TRB(_FullVocab):
    """TRB: reverse KL on the student's top-16 support; warm-up rollouts from the KL-trust-region blend of §4.3."""

    keyword_ranges = {"trb_support": Range(1, None)}

    def __init__(self, trb_support: int = 16, chunk_size: int | None = None) -> None:
        super().__init__(chunk_size)
        self.trb_support = int(trb_support)
        self.needs = Needs(teacher_logits=True, rollout="trb_blend")

    def divergence(self, lp_s, lp_t):
        return terms.topk_support_rkl(lp_s, lp_t, self.trb_support)
