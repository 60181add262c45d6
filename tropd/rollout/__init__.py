"""Rollouts: KV-cached sampling with exact behaviour log-probs, teacher-prefix guidance, TRB blending, GKD mixing."""

from tropd.rollout.batch import RolloutBatch, RolloutRow, left_pad, position_ids_from_mask, rollout_stats
from tropd.rollout.dispatch import sample_for_needs
from tropd.rollout.gkd import sample_gkd_mixed
from tropd.rollout.guidance import GuidanceConfig, choose_guided_rows, guidance_cap, sample_with_guidance
from tropd.rollout.sampling import (
    SamplingConfig,
    decode,
    sample,
    sample_teacher,
    sampling_logprobs,
    temperature_logprobs,
    truncate_logprobs,
)
from tropd.rollout.streams import RowStreams
from tropd.rollout.trb import TRBConfig, blend_logprobs, kl_blend_student, sample_trb, solve_beta

__all__ = [
    "GuidanceConfig",
    "RolloutBatch",
    "RolloutRow",
    "RowStreams",
    "SamplingConfig",
    "TRBConfig",
    "blend_logprobs",
    "choose_guided_rows",
    "decode",
    "guidance_cap",
    "kl_blend_student",
    "left_pad",
    "position_ids_from_mask",
    "rollout_stats",
    "sample",
    "sample_for_needs",
    "sample_gkd_mixed",
    "sample_teacher",
    "sample_trb",
    "sample_with_guidance",
    "sampling_logprobs",
    "solve_beta",
    "temperature_logprobs",
    "truncate_logprobs",
]
