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


def new_file_mode() -> int:
    """The permission bits a file created now gets: ``0o666`` less this process's umask (read from
    ``/proc/self/status`` where it is shown, else by setting and restoring it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def match_umask(folder: str | Path) -> None:
    """Give every file directly in ``folder`` the mode a new file gets (:func:`new_file_mode`): some writers
    create theirs through a private temporary file (``model.safetensors`` came out ``-rw-------`` beside
    ``-rw-r--r--`` files), so the files of one save differ in who may read them."""
    mode = new_file_mode()
    for path in Path(folder).iterdir():
        if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o777 != mode:
            path.chmod(mode)
