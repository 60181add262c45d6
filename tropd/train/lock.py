"""One process per run folder: an OS lock (``fcntl.flock``) on ``<run>/.tropd.lock``, held for the run's life.

Two ``tropd train`` processes in one folder (two fresh starts, two ``--resume``, or one of each) would overwrite
each other's checkpoints and metrics, and one's clean-up would delete the other's save in progress. The second is
refused with one line naming the folder and the holder's pid. The OS releases the lock when its process ends,
however it ends (a stale lock file after a crash blocks nothing); the holder removes the file when it is done.
Under ``accelerate launch`` only the main process takes it (:func:`tropd.train.run.train_from_config`).

This module imports nothing from tropd: a test or a tool takes the lock without loading torch.
"""

from __future__ import annotations

import errno
import os
import socket
import warnings
from pathlib import Path

try:
    import fcntl
except ImportError:  # not a POSIX system: runs are not locked
    fcntl = None

LOCK_FILE = ".tropd.lock"


class RunFolderBusyError(FileExistsError):
    """Another process holds the run folder's lock; the message names the folder and the holder's pid."""


class RunLock:
    """The lock of one run folder, held until :meth:`release` (or the process ends)."""

    def __init__(self, run_dir: Path, fh, created_dir: bool) -> None:
        self.run_dir, self._fh, self._created_dir = run_dir, fh, created_dir

    @classmethod
    def acquire(cls, run_dir: str | Path) -> RunLock:
        """Lock ``run_dir`` (created when missing) or raise :class:`RunFolderBusyError`."""
        run_dir = Path(run_dir)
        if run_dir.exists() and not run_dir.is_dir():
            raise FileExistsError(f"{run_dir} is a file, not a run folder; choose another --run-dir")
        created = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_FILE
        while True:
            fh = open(path, "a+", encoding="utf-8")
            if fcntl is None:
                return cls(run_dir, fh, created)
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    # e.g. a network file system without flock: run, but say that nothing guards the folder
                    warnings.warn(f"cannot lock {path} ({err.strerror}): a second tropd process in {run_dir} "
                                  "would not be refused", RuntimeWarning, stacklevel=2)
                    return cls(run_dir, fh, created)
                fh.seek(0)
                holder = fh.read().strip()
                fh.close()
                raise RunFolderBusyError(
                    f"{run_dir} is in use by another tropd process ({holder or 'pid unknown'}, lock file {path}): "
                    "two runs in one folder would overwrite each other's checkpoints; wait for it to end or stop "
                    "it, or choose another --run-dir") from None
            try:  # the holder before us may have removed the file between our open and our lock: lock it anew
                same = os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            fh.close()
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        return cls(run_dir, fh, created)

    def release(self) -> None:
        """Remove the lock file (while still holding the lock), then unlock; a folder this lock created and
        nothing else filled is removed too."""
        if self._fh is None:
            return
        try:
            (self.run_dir / LOCK_FILE).unlink(missing_ok=True)
        finally:
            self._fh.close()
            self._fh = None
        if self._created_dir:
            try:
                self.run_dir.rmdir()  # only when empty: a refused start leaves nothing behind
            except OSError:
                pass

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
