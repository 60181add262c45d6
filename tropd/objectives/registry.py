"""Registry of named objectives and the declaration of what each one needs from the pipeline."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

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
        progress: the objective reads ``TokenInputs.progress`` (training curricula).
    """

    teacher_logprobs: bool = True
    teacher_topk: bool = False
    teacher_entropy: bool = False
    teacher_logits: bool = False
    top_k: int = 0
    guidance: bool = False
    rollout: str = "student"
    progress: bool = False

    def __post_init__(self) -> None:
        if self.rollout not in ROLLOUT_KINDS:
            raise ValueError(f"Needs.rollout must be one of {ROLLOUT_KINDS}, got {self.rollout!r}")
        if self.teacher_topk and self.top_k < 1:
            raise ValueError("Needs.top_k must be >= 1 when teacher_topk is needed")


_REGISTRY: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: register an objective class under ``name`` (its docstring's first line describes it)."""

    def wrap(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"objective {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def list_objectives() -> list[str]:
    """Names of every registered objective, sorted."""
    return sorted(_REGISTRY)


def describe_objectives() -> dict[str, str]:
    """``name -> one-line description`` for every registered objective."""
    return {n: (inspect.getdoc(_REGISTRY[n]) or "").splitlines()[0] for n in list_objectives()}


def objective_class(name: str) -> type:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown objective {name!r}; registered: {', '.join(list_objectives())}") from None


def objective_keywords(name: str) -> dict[str, object]:
    """The keywords ``get_objective(name, ...)`` accepts, with their defaults."""
    sig = inspect.signature(objective_class(name).__init__)
    return {p.name: p.default for p in sig.parameters.values() if p.name != "self"}


def get_objective(name: str, **kwargs):
    """Build the objective ``name`` with keyword settings; unknown keywords are rejected by name."""
    cls = objective_class(name)
    allowed = objective_keywords(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(
            f"objective {name!r} got unknown keyword(s) {', '.join(unknown)}; it accepts: {', '.join(allowed)}"
        )
    return cls(**kwargs)
