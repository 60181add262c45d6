"""Objectives: pure per-token loss math over tensors (docs/method.md §2-§4). No I/O, no models, no trainer state."""

from tropd.objectives import full_vocab, on_policy, trust_region  # noqa: F401  (registers the objectives)
from tropd.objectives.base import Objective
from tropd.objectives.inputs import ObjectiveOutput, TokenInputs
from tropd.objectives.normalize import count_loss_tokens, data_parallel_scale
from tropd.objectives.registry import (
    Needs,
    describe_objectives,
    get_objective,
    list_objectives,
    objective_keywords,
)

__all__ = [
    "Needs",
    "Objective",
    "ObjectiveOutput",
    "TokenInputs",
    "count_loss_tokens",
    "data_parallel_scale",
    "describe_objectives",
    "get_objective",
    "list_objectives",
    "objective_keywords",
]
