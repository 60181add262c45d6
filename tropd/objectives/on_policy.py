"""On-policy baselines built on the K1 reward ``r_t = q_t − b_t`` (docs/method.md §3), plus supervised KD (``sft``).

Notation per student-sampled position: ``s = log π_S(y_t)``, ``b`` the behaviour log-prob, ``q = log π_T(y_t)``,
``pg_k1(r) = −sg(r)·exp(s − b)``. None of these objectives puts loss on teacher-prefix positions except ``sft``.
"""

from __future__ import annotations

import torch

from tropd.needs import Needs
from tropd.objectives import terms
from tropd.objectives.base import DEFAULT_TAU, Objective
from tropd.objectives.keywords import Range
from tropd.objectives.registry import register


def top_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, top_frac: float) -> torch.Tensor:
    """``1[H(t) ≥ quantile_{1−p}(H)]`` over the positions in ``mask`` (linear-interpolated quantile)."""
    values = entropy[mask]
    if values.numel() == 0:
        return torch.zeros_like(mask)
    threshold = torch.quantile(values.detach(), 1.0 - top_frac)
    return mask & (entropy >= threshold)


class _K1Objective(Objective):
    """Shared shape: a per-student-token K1 loss; subclasses give the (possibly modified) loss and its mask."""

    def combine(self, t, x):
        sm = x.student_mask
        losses, dropped = self.student_loss(t, x)
        return torch.where(sm, losses, torch.zeros_like(losses)), {"frac_masked": dropped & sm}

    def student_loss(self, t, x) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


@register("opd")
class OPD(_K1Objective):
    """Standard on-policy distillation: K1 REINFORCE with reward log π_T/π_beh on every student token."""

    def __init__(self, chunk_size: int | None = None) -> None:
        super().__init__(chunk_size)
        self.needs = Needs()

    def student_loss(self, t, x):
        return terms.pg_k1(t["reward"], t["s"], t["behavior_logprobs"]), torch.zeros_like(x.loss_mask)


class _StaticThreshold(_K1Objective):
    """K1 objectives with a static reward threshold τ."""

    def __init__(self, tau: float = DEFAULT_TAU, chunk_size: int | None = None) -> None:
        super().__init__(chunk_size)
        self.tau = float(tau)
        self.needs = Needs()


@register("clip_outlier")
class ClipOutlier(_StaticThreshold):
    """Static reward floor: pg_k1(max(r, τ)), τ = log(0.2/0.8)."""

    def student_loss(self, t, x):
        r = t["reward"]
        return terms.pg_k1(r.clamp(min=self.tau), t["s"], t["behavior_logprobs"]), r < self.tau


@register("reopold")
class REOPOLD(ClipOutlier):
    """REOPOLD as run in the TrOPD paper: the reward floor pg_k1(max(r, τ))."""


@register("mask_outlier")
class MaskOutlier(_StaticThreshold):
    """Static mask: 1[r > τ]·pg_k1(r), τ = log(0.2/0.8)."""

    def student_loss(self, t, x):
        r = t["reward"]
        keep = r > self.tau
        loss = terms.pg_k1(r, t["s"], t["behavior_logprobs"])
        return torch.where(keep, loss, torch.zeros_like(loss)), ~keep


@register("entropy_opd")
class EntropyOPD(_K1Objective):
    """K1 OPD on the top-20% student-entropy tokens of the batch only."""

    keyword_ranges = {"entropy_top_frac": Range(0, 1, low_open=True)}

    def __init__(self, entropy_top_frac: float = 0.2, chunk_size: int | None = None) -> None:
        super().__init__(chunk_size)
        self.entropy_top_frac = float(entropy_top_frac)
        self.needs = Needs()

    def rows_independent(self, x) -> bool:
        return False  # the entropy quantile is a statistic of the whole batch

    def student_loss(self, t, x):
        keep = top_entropy_mask(t["student_entropy"], x.student_mask, self.entropy_top_frac)
        loss = terms.pg_k1(t["reward"], t["s"], t["behavior_logprobs"])
        return torch.where(keep, loss, torch.zeros_like(loss)), ~keep


@register("reopold_2stage")
class REOPOLD2Stage(_K1Objective):
    """REOPOLD curriculum: 1[r ≥ τ]·pg_k1(r) in the first half, top-50% student-entropy mask in the second."""

    keyword_ranges = {"stage": Range(1, 2), "entropy_top_frac": Range(0, 1, low_open=True)}

    def __init__(self, tau: float = DEFAULT_TAU, stage: int | None = None, entropy_top_frac: float = 0.5,
                 chunk_size: int | None = None) -> None:
        super().__init__(chunk_size)
        self.tau, self.stage, self.entropy_top_frac = float(tau), stage, float(entropy_top_frac)
        self.needs = Needs(progress=stage is None)

    def current_stage(self, x) -> int:
        if self.stage is not None:
            return self.stage
        if x.progress is None:
            raise ValueError("objective 'reopold_2stage' needs TokenInputs.progress (or the keyword stage=1|2)")
        return 1 if x.progress < 0.5 else 2

    def rows_independent(self, x) -> bool:
        return self.current_stage(x) == 1  # stage 2 masks by the batch's entropy quantile

    def student_loss(self, t, x):
        loss = terms.pg_k1(t["reward"], t["s"], t["behavior_logprobs"])
        if self.current_stage(x) == 1:
            keep = t["reward"] >= self.tau
        else:
            keep = top_entropy_mask(t["student_entropy"], x.student_mask, self.entropy_top_frac)
        return torch.where(keep, loss, torch.zeros_like(loss)), ~keep


class _TopKObjective(_K1Objective):
    """Objectives that read the teacher's top-k at student positions."""

    keyword_ranges = {"top_k": Range(1, None)}

    row_terms = ("fkl_topk",)

    def row_fn(self, logits, rows):
        out = super().row_fn(logits, rows)
        out["fkl_topk"] = terms.fkl_topk(out["student_topk"], rows["topk_logprobs"])
        return out


@register("fkl")
class FKL(_TopKObjective):
    """Top-k forward KL on every student token (the paper reports that it collapses)."""

    requires = ()

    def __init__(self, top_k: int = 64, chunk_size: int | None = None) -> None:
        super().__init__(chunk_size)
        self.needs = Needs(teacher_topk=True, top_k=int(top_k))

    def student_loss(self, t, x):
        return t["fkl_topk"], torch.zeros_like(x.loss_mask)


@register("eopd")
class EOPD(_TopKObjective):
    """EOPD: pg_k1(r) plus top-k forward KL where the teacher entropy exceeds τ_H = 0.8 nats."""

    requires = ("behavior_logprobs", "teacher_logprobs", "teacher_entropy")

    def __init__(self, top_k: int = 64, entropy_threshold: float = 0.8, chunk_size: int | None = None) -> None:
        super().__init__(chunk_size)
        self.entropy_threshold = float(entropy_threshold)
        self.needs = Needs(teacher_topk=True, teacher_entropy=True, top_k=int(top_k))

    def combine(self, t, x):
        sm = x.student_mask
        pg = terms.pg_k1(t["reward"], t["s"], t["behavior_logprobs"])
        uncertain = sm & (t["teacher_entropy"] > self.entropy_threshold)
        fkl = torch.where(uncertain, t["fkl_topk"], torch.zeros_like(pg))
        pg = torch.where(sm, pg, torch.zeros_like(pg))
        return pg + fkl, {"region_pg": pg, "region_fkl": fkl, "fkl_frac": uncertain}


@register("jsd")
class JSD(_K1Objective):
    """JSD as run in the paper: β_J·top-k KL(π_T‖π_M) + (1−β_J)·pg_k1(log π_M(y) − b), π_M = β_J π_T + (1−β_J) π_S."""

    row_terms = ("jsd_topk",)
    keyword_ranges = {"top_k": Range(1, None), "jsd_beta": Range(0, 1, low_open=True, high_open=True)}

    def __init__(self, top_k: int = 64, jsd_beta: float = 0.5, chunk_size: int | None = None) -> None:
        super().__init__(chunk_size)
        self.jsd_beta = float(jsd_beta)
        self.needs = Needs(teacher_topk=True, top_k=int(top_k))

    def row_fn(self, logits, rows):
        out = super().row_fn(logits, rows)
        out["jsd_topk"] = terms.jsd_topk(out["student_topk"], rows["topk_logprobs"], self.jsd_beta)
        return out

    def student_loss(self, t, x):
        bj = self.jsd_beta
        s = t["s"].detach()
        log_m = torch.logaddexp(t["teacher_logprobs"] + torch.log(torch.tensor(bj, dtype=s.dtype)),
                                s + torch.log(torch.tensor(1.0 - bj, dtype=s.dtype)))
        pg = terms.pg_k1(log_m - t["behavior_logprobs"], t["s"], t["behavior_logprobs"])
        return bj * t["jsd_topk"] + (1.0 - bj) * pg, torch.zeros_like(x.loss_mask)


@register("sft")
class SFT(Objective):
    """Supervised KD on teacher-written text: NLL −log π_S(y_t) on teacher positions, nothing on student ones."""

    requires = ()

    def __init__(self, chunk_size: int | None = None) -> None:
        super().__init__(chunk_size)
        self.needs = Needs(teacher_logprobs=False, rollout="teacher")

    def combine(self, t, x):
        tm = x.teacher_token_mask
        loss = torch.where(tm, terms.nll(t["s"]), torch.zeros_like(t["s"]))
        return loss, {"region_guidance": loss}
