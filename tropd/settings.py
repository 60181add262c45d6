"""How a config section declares its keys: ``setting(default, help)``.

Every section of a run's config is a dataclass whose fields are ``setting``\\s: one default and one help text per
key, stated once (``tropd train --help-config`` prints them), checked by
:meth:`tropd.train.config.RunConfig.validate`, which raises :class:`ConfigError` naming the key. Most sections
live in ``tropd/train/config.py``; ``guidance`` and ``trb`` live beside the rollout code that reads them, and
check their own ranges (``check()``, also on construction, so a section built in code is checked too);
``validate`` runs those checks with the others. This module imports nothing from tropd.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
from typing import Any


class ConfigError(ValueError):
    """An invalid configuration; the message names the key and what is allowed.

    ``key`` is the dotted key at fault when one is (``load_config`` uses it to say whether the value came from
    the config file or from the command line)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def require(ok: bool, key: str, what: str) -> None:
    """Raise :class:`ConfigError` ``"<key> <what>"`` for ``key`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key} {what}", key)


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxtuple, _BRIEF.maxdict = 2, 4, 4, 4
_BRIEF.maxstring = _BRIEF.maxother = 60


def brief(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters, without building the whole of it first: an error message
    shows a value given by the user this way (a list of a million items, or one that YAML aliases expanded,
    prints as its first items and ``...``)."""
    text = _BRIEF.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def is_int(value: Any) -> bool:
    """An int (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def setting(default: Any = dataclasses.MISSING, help: str = "", *, path: bool = False) -> Any:
    """A dataclass field with its help text in ``metadata["help"]``; a list or dict default is copied for each
    instance. ``path=True`` (``metadata["path"]``): the value names a file, folder or model, and a command-line
    override gives it as written (not parsed as YAML, where ``#`` starts a comment and ``null``, ``~`` or ``2024``
    are no strings)."""
    metadata = {"help": help, "path": path}
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)
