"""Writing a small file so that a reader, or a crash, sees the old content or the new one, never half of it."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` (UTF-8, parent folders created): into ``.<name>.tmp-<pid>`` beside it, flushed to
    disk, then renamed over ``path`` (``os.replace`` is atomic on one file system). The temporary file never
    outlives a failed write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
