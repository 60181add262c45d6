"""The ``Sampler`` seam: how the trainer gets a step's rollouts, whatever engine draws them.

The trainer hands a sampler one generation batch of prompt token ids and a :class:`RolloutRequest` (which kind
of rollout the objective needs, where training is, which rows of the step's global batch these are) and
receives a :class:`~tropd.rollout.RolloutBatch` with exact behaviour log-probs. :class:`KVCacheSampler` (the
default) decodes with the student's own KV cache in this process and asks the run's
:class:`~tropd.teacher.Teacher` for guidance prefixes, GKD and SFT teacher rows and TRB blending; another engine
implements the same ``sample`` method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from tropd.needs import Needs
from tropd.rollout.batch import RolloutBatch
from tropd.rollout.dispatch import sample_for_needs
from tropd.rollout.guidance import GuidanceConfig
from tropd.rollout.sampling import SamplingConfig, StudentRows
from tropd.rollout.streams import RowStreams
from tropd.rollout.trb import TRBConfig

if TYPE_CHECKING:
    from tropd.teacher.protocol import Teacher


@dataclass
class RolloutRequest:
    """What one generation batch of a step asks for.

    Attributes:
        needs: the objective's declaration (rollout kind, guidance).
        step, total_steps: position in the objective's phase (guidance cap, TRB budget anneal over it).
        seed, global_step: the run's seed and the optimiser step.
        first_row, total_rows: the global index (in the step's batch of rollouts, all processes) of the first
            prompt, and the size of that batch. Random draws depend on ``(seed, global_step, row)`` only, never
            on the process or the batch composition (:attr:`streams`); ``total_rows`` 0 means this batch alone.
        guidance, trb: the run's guidance and TRB settings.
    """

    needs: Needs
    step: int
    total_steps: int
    seed: int = 0
    global_step: int = 0
    first_row: int = 0
    total_rows: int = 0
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    trb: TRBConfig = field(default_factory=TRBConfig)

    def streams(self, num_rows: int) -> RowStreams:
        """The random streams of this request's ``num_rows`` rows (:class:`~tropd.rollout.streams.RowStreams`)."""
        return RowStreams.of(self.seed, num_rows, step=self.global_step, first_row=self.first_row,
                             total_rows=self.total_rows or None)


@runtime_checkable
class Sampler(Protocol):
    """Draws rollouts: ``sample(prompts, request) -> RolloutBatch`` (one row per prompt, in order)."""

    def sample(self, prompts: Sequence[Sequence[int]], request: RolloutRequest) -> RolloutBatch: ...


class KVCacheSampler:
    """The default sampler: KV-cached decoding of ``student`` in this process (:func:`sample_for_needs`), with the
    run's :class:`~tropd.teacher.Teacher` (in process or behind a server; None when the objective never samples
    from it) writing guidance prefixes and GKD and SFT teacher rows, and blended into TRB rollouts.

    ``student_rows`` (None here) lets a subclass draw the student's rows with another engine and keep the rest
    (:class:`tropd.rollout.vllm_sampler.VLLMSampler`)."""

    student_rows: StudentRows | None = None

    def __init__(self, student: nn.Module, teacher: Teacher | None, sampling: SamplingConfig) -> None:
        self.student, self.teacher, self.sampling = student, teacher, sampling

    @torch.no_grad()
    def sample(self, prompts: Sequence[Sequence[int]], request: RolloutRequest) -> RolloutBatch:
        return sample_for_needs(self.student, self.teacher, prompts, self.sampling, request.needs,
                                step=request.step, total_steps=request.total_steps,
                                streams=request.streams(len(prompts)),
                                guidance_settings=request.guidance, trb_settings=request.trb,
                                student_rows=self.student_rows)
