"""Checks of an objective's keyword settings, made once for every objective when it is constructed.

An objective's ``__init__`` annotates each keyword with its type (``int``, ``float``, ``str``, ``bool``, or a
union with ``None``) and its class declares the allowed interval of numeric ones in ``keyword_ranges``
(``{"beta": Range(0, None)}``; inherited, a subclass's entries win). :class:`tropd.objectives.base.Objective`
checks every value against both before the constructor runs: ``float`` takes finite real numbers (an ``int``
too, never a bool, NaN or +-inf), ``int`` integers only (not ``True``), and the error names the objective, the
keyword, what it must be with its interval, and the value.
"""

from __future__ import annotations

import functools
import math
import numbers
import reprlib
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable


class ObjectiveKeywordError(ValueError, TypeError):
    """A keyword value of the wrong type or outside its range (a ValueError and a TypeError: either catch works);
    ``key`` names the keyword."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Range:
    """The interval ``[low, high]`` (None: unbounded); ``low_open`` / ``high_open`` exclude the end."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def __str__(self) -> str:
        low = "(-inf" if self.low is None else f"{'(' if self.low_open else '['}{self.low:g}"
        high = "inf)" if self.high is None else f"{self.high:g}{')' if self.high_open else ']'}"
        return f"{low}, {high}"


def _accepts(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(value, a) for a in typing.get_args(tp))
    if tp is type(None) or tp is None:
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    return True  # a type this module does not know: the constructor checks it


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = sorted(typing.get_args(tp), key=lambda a: a is not type(None))  # "None or an integer"
        return " or ".join(_describe(a) for a in args)
    return {int: "an integer", float: "a finite number", str: "a string", bool: "true or false",
            type(None): "None"}.get(tp, getattr(tp, "__name__", str(tp)))


@functools.lru_cache(maxsize=None)
def _hints(init: Callable) -> dict[str, Any]:
    try:
        return typing.get_type_hints(init)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: no type checks for it
        return {}


def check_keywords(name: str, init: Callable, values: dict[str, Any], ranges: dict[str, Range]) -> None:
    """Raise :class:`ObjectiveKeywordError` for the first of ``values`` (keyword -> value given to ``init``) that
    its annotation or its entry in ``ranges`` refuses."""
    hints = _hints(init)
    for key, value in values.items():
        tp, allowed = hints.get(key), ranges.get(key)
        what = (_describe(tp) if tp is not None else "a number") + (f" in {allowed}" if allowed is not None else "")
        shown = f"{value!r} ({type(value).__name__})" if isinstance(value, bool) else _brief(value)
        if tp is not None and not _accepts(value, tp):
            raise ObjectiveKeywordError(f"{name}: {key} must be {what}, got {shown}", key)
        if allowed is not None and isinstance(value, numbers.Real) and not isinstance(value, bool):
            if not math.isfinite(value) or value not in allowed:
                raise ObjectiveKeywordError(f"{name}: {key} must be {what}, got {shown}", key)


def _brief(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (a huge value is never printed whole; the objectives layer
    imports nothing of tropd's higher layers, so this is not ``tropd.settings.brief``)."""
    text = reprlib.repr(value)  # bounded: never builds the whole repr of a huge value
    return text if len(text) <= limit else text[:limit - 3] + "..."
