"""What an objective asks of the pipeline, so that rollout and teacher compute only that.

An objective declares one :class:`Needs` (``objective.needs``); the sampler reads how rollouts are drawn
(``rollout``, ``guidance``, ``on_policy_fraction``), the teacher which scores to compute (``teacher_*``,
``top_k``), the trainer whether to pass ``progress``. This module imports nothing from tropd: every layer may
read it.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLLOUT_KINDS = ("student", "teacher", "trb_blend", "gkd_mixed")


@dataclass(frozen=True)
class Needs:
    """What the pipeline must compute for an objective, so it computes only that.

    Attributes:
        teacher_logprobs: teacher log-prob of each sampled token (``q_t``).
        teacher_topk: teacher top-k ids and log-probs at each position (``top_k`` of them).
        teacher_entropy: full-vocabulary teacher entropy at each position.
        teacher_logits: full teacher logits (full-vocabulary objectives only; the teacher pass chunks them).
        top_k: k for ``teacher_topk`` (0 when not needed).
        guidance: the objective trains on teacher-written prefixes (docs/method.md §4.2); the rollout adds them.
        rollout: how rollouts are drawn: ``"student"`` (plain on-policy), ``"trb_blend"`` (docs/method.md §4.3 warm-up
            blending), ``"gkd_mixed"`` (GKD: a share of sequences written by the teacher), ``"teacher"`` (the
            teacher writes whole responses, tagged as teacher positions: supervised KD).
        on_policy_fraction: GKD's λ, the share of sequences the student writes (the teacher writes the other
            ``1 − λ``), in [0, 1]. Required with ``"gkd_mixed"`` rollouts, which have no default for it (the
            ``gkd`` objective passes its ``lmbda``, 0.5 unless set); must stay None with any other rollout.
        progress: the objective reads ``TokenInputs.progress`` (training curricula).
    """

    teacher_logprobs: bool = True
    teacher_topk: bool = False
    teacher_entropy: bool = False
    teacher_logits: bool = False
    top_k: int = 0
    guidance: bool = False
    rollout: str = "student"
    on_policy_fraction: float | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        if self.rollout not in ROLLOUT_KINDS:
            raise ValueError(f"Needs.rollout must be one of {ROLLOUT_KINDS}, got {self.rollout!r}")
        if self.teacher_topk and self.top_k < 1:
            raise ValueError("Needs.top_k must be >= 1 when teacher_topk is needed")
        if self.rollout == "gkd_mixed" and self.on_policy_fraction is None:
            raise ValueError("Needs(rollout='gkd_mixed') requires on_policy_fraction: GKD's λ, the share in [0, 1] of "
                             "sequences the student writes (the gkd objective passes its lmbda); there is no default")
        if self.rollout != "gkd_mixed" and self.on_policy_fraction is not None:
            raise ValueError(f"Needs.on_policy_fraction={self.on_policy_fraction} applies only to rollout='gkd_mixed' "
                             f"(GKD's λ), not rollout={self.rollout!r}; leave it None")
        if self.on_policy_fraction is not None and not 0.0 <= self.on_policy_fraction <= 1.0:
            raise ValueError(f"Needs.on_policy_fraction must be in [0, 1], got {self.on_policy_fraction}")
