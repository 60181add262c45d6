"""The ``Sampler`` seam: how the trainer gets a step's rollouts, whatever engine draws them.

The trainer hands a sampler one generation batch of prompt token ids and a :class:`RolloutRequest` (which kind
of rollout the objective needs, where training is, the random streams to use) and receives a
:class:`~tropd.rollout.RolloutBatch` with exact behaviour log-probs. :class:`KVCacheSampler` (the default) decodes
with the student's own KV cache in this process, and writes guidance prefixes, TRB blends and GKD teacher rows
with the in-process teacher model; another engine implements the same ``sample`` method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from tropd.objectives.registry import Needs
from tropd.rollout.batch import RolloutBatch
from tropd.rollout.collect import collect_rollouts
from tropd.rollout.guidance import GuidanceConfig
from tropd.rollout.sampling import SamplingConfig
from tropd.rollout.trb import TRBConfig


@dataclass
class RolloutRequest:
    """What one generation batch of a step asks for.

    Attributes:
        needs: the objective's declaration (rollout kind, guidance).
        step, total_steps: position in the objective's phase (guidance cap, TRB budget anneal over it).
        seed, first_row: the run's seed and the global index (in the step's batch of rollouts) of the first
            prompt; random draws depend on these only, never on the process or the batch composition.
        global_step: the optimiser step (seeds the random streams together with ``seed``).
        guidance, trb: settings; ``gkd_lambda``: GKD's on-policy fraction λ.
    """

    needs: Needs
    step: int
    total_steps: int
    seed: int = 0
    global_step: int = 0
    first_row: int = 0
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    trb: TRBConfig = field(default_factory=TRBConfig)
    gkd_lambda: float = 1.0


@runtime_checkable
class Sampler(Protocol):
    """Draws rollouts: ``sample(prompts, request) -> RolloutBatch`` (one row per prompt, in order)."""

    def sample(self, prompts: Sequence[Sequence[int]], request: RolloutRequest) -> RolloutBatch: ...


class KVCacheSampler:
    """The default sampler: KV-cached decoding of ``student`` in this process (:func:`collect_rollouts`), with
    ``teacher`` (a plain model, or None when the objective never samples from it) for guidance prefixes, TRB
    blending and GKD teacher rows."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, sampling: SamplingConfig) -> None:
        self.student, self.teacher, self.sampling = student, teacher, sampling

    @torch.no_grad()
    def sample(self, prompts: Sequence[Sequence[int]], request: RolloutRequest) -> RolloutBatch:
        device = next(self.student.parameters()).device
        generator = torch.Generator(device=device).manual_seed(
            (request.seed * 1_000_003 + request.global_step) * 1_000_033 + request.first_row + 1)
        return collect_rollouts(self.student, self.teacher, prompts, self.sampling, request.needs,
                                step=request.step, total_steps=request.total_steps, generator=generator,
                                guidance_settings=request.guidance, trb_settings=request.trb,
                                gkd_lambda=request.gkd_lambda)
