"""One entry point that draws a step's rollouts the way the objective declares (``Needs.rollout``/``guidance``).

| ``needs.rollout`` | ``needs.guidance`` | sampler |
|---|---|---|
| ``"student"`` | False, or guidance disabled | :func:`~tropd.rollout.sampling.sample` (plain on-policy) |
| ``"student"`` | True and enabled | :func:`~tropd.rollout.guidance.sample_with_guidance` (docs/method.md §4.2) |
| ``"trb_blend"`` | False | :func:`~tropd.rollout.trb.sample_trb` with ``ε = trb.budget(step)`` (docs/method.md §4.3) |
| ``"gkd_mixed"`` | False | :func:`~tropd.rollout.gkd.sample_gkd_mixed` with λ = ``needs.on_policy_fraction`` |
| ``"teacher"`` | False | :func:`~tropd.rollout.sampling.sample_teacher` (supervised KD on teacher text) |

The batch always lives on the student's device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from torch import nn

from tropd.needs import Needs
from tropd.rollout.batch import RolloutBatch
from tropd.rollout.gkd import sample_gkd_mixed
from tropd.rollout.guidance import GuidanceConfig, sample_with_guidance
from tropd.rollout.sampling import SamplingConfig, StudentRows, model_device, sample, sample_teacher
from tropd.rollout.streams import RowStreams
from tropd.rollout.trb import TRBConfig, sample_trb

if TYPE_CHECKING:
    from tropd.teacher.protocol import Teacher


def sample_for_needs(student: nn.Module, teacher: Teacher | None, prompts: Sequence[Sequence[int]],
                     cfg: SamplingConfig, needs: Needs, *, step: int, total_steps: int,
                     streams: RowStreams | int | None = None, guidance_settings: GuidanceConfig | None = None,
                     trb_settings: TRBConfig | None = None, student_rows: StudentRows | None = None) -> RolloutBatch:
    """Draw one batch of rollouts (one per prompt) for training step ``step`` of ``total_steps``.

    ``teacher`` writes the guidance prefixes, GKD and SFT teacher rows and blends into TRB rollouts; it may be None
    when the chosen path never needs it (plain student rollouts). ``guidance_settings`` defaults to
    ``GuidanceConfig()`` and ``trb_settings`` to ``TRBConfig()``. ``streams``: the rows' random streams
    (:meth:`RowStreams.resolve`). ``student_rows``: another engine writes the student's rows
    (:data:`~tropd.rollout.sampling.StudentRows`); TRB blending decodes the student in this process and refuses it.
    """
    kind = needs.rollout
    if needs.guidance and kind != "student":
        raise ValueError(f"teacher-prefix guidance combines only with student rollouts, not {kind!r}")
    guidance = guidance_settings or GuidanceConfig()
    trb = trb_settings or TRBConfig()

    def need_teacher() -> Teacher:
        if teacher is None:
            raise ValueError(f"rollout kind {kind!r} (guidance={needs.guidance}) needs a teacher")
        return teacher

    if kind == "student":
        if needs.guidance and guidance.enabled is not False:
            batch = sample_with_guidance(student, need_teacher(), prompts, cfg, step=step, total_steps=total_steps,
                                         guided_fraction=guidance.guided_fraction,
                                         anneal_steps=guidance.anneal_steps, streams=streams,
                                         student_rows=student_rows)
        else:
            batch = sample(student, prompts, cfg, streams=streams, student_rows=student_rows)
    elif kind == "trb_blend":
        if student_rows is not None:
            raise ValueError("TRB blends teacher and student at every decoded token, which only the in-process "
                             "sampler does: use rollout.engine=tropd with objective trb")
        eps = trb.budget(step)
        batch = sample_trb(student, need_teacher() if eps > 0 else teacher, prompts, cfg, eps=eps, iters=trb.iters,
                           streams=streams)
    elif kind == "gkd_mixed":
        lmbda = needs.on_policy_fraction
        batch = sample_gkd_mixed(student, need_teacher() if lmbda < 1.0 else teacher, prompts, cfg, lmbda=lmbda,
                                 streams=streams, student_rows=student_rows)
    elif kind == "teacher":
        batch = sample_teacher(need_teacher(), prompts, cfg, streams=streams)
    else:
        raise ValueError(f"unknown rollout kind {kind!r}")
    return batch.to(model_device(student))
