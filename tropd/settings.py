"""How a config section declares its keys: ``setting(default, help)``.

Every section of a run's config is a dataclass whose fields are ``setting``\\s: one default and one help text per
key, stated once (``tropd train --help-config`` prints them), checked in one place
(:meth:`tropd.train.config.RunConfig.validate`). Most sections live in ``tropd/train/config.py``; ``guidance``
and ``trb`` live beside the rollout code that reads them. This module imports nothing from tropd.
"""

from __future__ import annotations

import dataclasses
from typing import Any


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
