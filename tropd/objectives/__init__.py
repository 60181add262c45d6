"""Objectives: pure per-token loss math over tensors (SPEC §2-§4). No I/O, no models, no trainer state."""

from tropd.objectives.inputs import ObjectiveOutput, TokenInputs
from tropd.objectives.registry import (
    Needs,
    describe_objectives,
    get_objective,
    list_objectives,
    objective_keywords,
)

__all__ = [
    "Needs",
    "ObjectiveOutput",
    "TokenInputs",
    "describe_objectives",
    "get_objective",
    "list_objectives",
    "objective_keywords",
]
