"""Registry of named objectives. What each one needs from the pipeline (:class:`Needs`) is declared in
:mod:`tropd.needs`, re-exported here."""

from __future__ import annotations

import inspect
from typing import Callable

from tropd.needs import ROLLOUT_KINDS, Needs  # noqa: F401  (re-exported: objectives declare their needs)

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
