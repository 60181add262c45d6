"""Run untrusted Python (a program plus its tests) in a contained child process.

What contains a run (see ``docs/tasks.md`` for the honest list of limits):

Enforced by the operating system
    * a new session and process group per run; when the run ends, for any reason, the whole group gets
      ``SIGKILL`` (``os.killpg``), and with a PID namespace every process it created dies with it;
    * resource limits set in the child before untrusted code runs, soft = hard: CPU seconds (``RLIMIT_CPU``),
      address space (``RLIMIT_AS``), processes (``RLIMIT_NPROC``; per user, and binding only for a non-root
      uid: when the parent is root the child drops to ``nobody`` before untrusted code runs),
      file size (``RLIMIT_FSIZE``, which also caps stdout/stderr), open files, no core files;
    * a wall-clock limit measured by the parent;
    * no inherited environment (the child gets a fixed minimal one), ``python -I`` (isolated mode), a fresh
      temporary directory as cwd, deleted afterwards;
    * when ``unshare`` works on this machine: a private network namespace (no interfaces but loopback, down),
      a PID namespace and a private ``/proc``.

Best effort, in Python, inside the child (:mod:`tropd.tasks.sandbox_child`)
    * process creation, signals, ``os._exit``, destructive file operations, writes outside the temporary
      directory, sockets and a few modules (``ctypes``, ``subprocess``, ...) raise.

A pass requires a per-run random nonce that the harness prints only after every test ran and passed, and
exit status 0: exiting early (``sys.exit``, ``SystemExit``, ``os._exit``, a signal) fails.

Runs are independent and thread-safe: :func:`run_many` runs several at once with a thread pool.
"""

from __future__ import annotations

import logging
import marshal
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal, Sequence

Status = Literal["passed", "failed", "timeout", "early_exit", "error"]
logger = logging.getLogger(__name__)

NOBODY_UID = 65534
NOBODY_GID = 65534
_HARNESS_EXIT_CODES = {1: "a test failed", 2: "the program failed to load", 3: "entry point missing",
                       4: "harness error"}


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed run.

    Attributes:
        timeout_s: wall-clock seconds before the parent kills the process group.
        cpu_s: CPU seconds (``RLIMIT_CPU``); ``None`` means ``ceil(timeout_s)``.
        memory_mb: address-space limit in MiB (``RLIMIT_AS``); Python itself needs ~100 MiB of it.
        max_procs: ``RLIMIT_NPROC`` (processes and threads of the sandbox user).
        max_output_bytes: largest file the child may write (``RLIMIT_FSIZE``), stdout and stderr included.
        max_open_files: ``RLIMIT_NOFILE``.
    """

    timeout_s: float = 5.0
    cpu_s: int | None = None
    memory_mb: int = 1024
    max_procs: int = 16
    max_output_bytes: int = 4 * 1024 * 1024
    max_open_files: int = 64

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.memory_mb <= 0 or self.max_procs <= 0:
            raise ValueError(f"limits must be positive: {self}")

    def child_limits(self) -> dict[str, int]:
        cpu = self.cpu_s if self.cpu_s is not None else max(1, int(-(-self.timeout_s // 1)))
        return {
            "cpu_s": int(cpu),
            "memory_bytes": int(self.memory_mb) * 1024 * 1024,
            "max_procs": int(self.max_procs),
            "max_file_bytes": int(self.max_output_bytes),
            "max_open_files": int(self.max_open_files),
        }


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one run.

    Attributes:
        passed: the harness printed this run's nonce after all tests, and the process exited with status 0.
        status: ``"passed"``; ``"failed"`` (non-zero exit: a test, the program or a limit failed it);
            ``"timeout"`` (wall clock); ``"early_exit"`` (status 0 without the nonce); ``"error"`` (could not run).
        returncode: the child's exit status (negative: killed by that signal), ``None`` when it never ran.
        stdout: the tail of the program's stdout, nonce removed.
        stderr: the tail of its stderr (tracebacks; the harness says which phase failed).
        duration_s: wall-clock seconds.
        pid: the child's pid (its process group and session id).
    """

    passed: bool
    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    pid: int | None = None

    @property
    def reason(self) -> str:
        """A short human-readable reason for the status."""
        if self.status == "failed" and self.returncode in _HARNESS_EXIT_CODES:
            return _HARNESS_EXIT_CODES[self.returncode]
        if self.status == "failed" and self.returncode is not None and self.returncode < 0:
            try:
                return f"killed by {signal.Signals(-self.returncode).name}"
            except ValueError:
                return f"killed by signal {-self.returncode}"
        return self.status


@dataclass(frozen=True)
class Isolation:
    """The OS-level isolation this machine allows, probed once per process (see :func:`isolation`).

    Attributes:
        prefix: command prefix (an ``unshare`` invocation, or empty).
        network_namespace: the child has its own network namespace: no interfaces but a loopback that is down.
        pid_namespace: the child sees only its own processes (private ``/proc``) and all of them die with it.
        user_namespace: the child runs in its own user namespace (an unprivileged way to get the others).
        drop_to: ``(uid, gid)`` the child switches to before untrusted code (parent is root), else ``None``.
        preload: standard modules imported before the privilege drop, because the dropped user cannot read
            this interpreter's standard library (then other modules are not importable by programs).
        nproc_enforced: whether ``RLIMIT_NPROC`` binds the child: only for a non-root uid (root in a user
            namespace was measured not to be bound by it).
    """

    prefix: tuple[str, ...] = ()
    network_namespace: bool = False
    pid_namespace: bool = False
    user_namespace: bool = False
    drop_to: tuple[int, int] | None = None
    preload: tuple[str, ...] = ()

    @property
    def nproc_enforced(self) -> bool:
        return self.drop_to is not None or os.geteuid() != 0


# Imported before the privilege drop when the dropped user cannot read the standard library.
PRELOAD_MODULES = (
    "typing", "math", "cmath", "random", "copy", "string", "collections", "collections.abc", "re",
    "hashlib", "itertools", "functools", "heapq", "bisect", "operator", "fractions", "decimal",
    "statistics", "datetime", "json", "array", "numbers", "dataclasses", "enum", "textwrap", "unicodedata",
    "time",
)


@lru_cache(maxsize=1)
def _harness_source() -> str:
    return (Path(__file__).with_name("sandbox_child.py")).read_text(encoding="utf-8")


def _child_env(workdir: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}


def _candidates() -> list[Isolation]:
    """Isolation set-ups from strongest to weakest; :func:`isolation` keeps the first that works."""
    unshare = shutil.which("unshare")
    full_ns = ("--net", "--pid", "--fork", "--kill-child", "--mount-proc", "--")
    net_ns = ("--net", "--")
    user_ns = ("--user", "--map-root-user")
    out: list[Isolation] = []
    if os.geteuid() == 0:
        nobody = (NOBODY_UID, NOBODY_GID)
        for preload in ((), PRELOAD_MODULES):
            if unshare:
                out.append(Isolation((unshare, *full_ns), True, True, False, nobody, preload))
                out.append(Isolation((unshare, *net_ns), True, False, False, nobody, preload))
            out.append(Isolation((), drop_to=nobody, preload=preload))
        if unshare:
            out.append(Isolation((unshare, *user_ns, *full_ns), True, True, True))
            out.append(Isolation((unshare, *user_ns, *net_ns), True, False, True))
    elif unshare:
        out.append(Isolation((unshare, *user_ns, *full_ns), True, True, True))
        out.append(Isolation((unshare, *user_ns, *net_ns), True, False, True))
    out.append(Isolation())
    return out


_PROBE_TESTS = "assert x == 1\n"


def _probe_program(candidate: Isolation) -> str:
    # Without a preload list the dropped user must be able to import any standard module: try one that
    # nothing imports on its own.
    return ("import json, collections\n" + ("" if candidate.preload else "import zipfile, wave\n")
            + "x = 1\n")
_isolation_lock = threading.Lock()
_isolation_cache: Isolation | None = None


def isolation() -> Isolation:
    """Probe (once per process, thread-safe) the strongest isolation that runs a trivial program here."""
    global _isolation_cache
    with _isolation_lock:
        if _isolation_cache is None:
            chosen = Isolation()
            for candidate in _candidates():
                if _run(_probe_program(candidate), _PROBE_TESTS, None, False, Limits(timeout_s=30), candidate).passed:
                    chosen = candidate
                    break
            _isolation_cache = chosen
        return _isolation_cache


def _read_tail(handle, limit: int) -> str:
    handle.flush()
    size = handle.seek(0, os.SEEK_END)
    handle.seek(max(0, size - limit))
    return handle.read().decode("utf-8", errors="replace")


def _kill_group(proc: subprocess.Popen, settle_s: float = 2.0) -> None:
    """SIGKILL the run's whole process group, reap the child, and wait (bounded) until the group is gone."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # members still exiting (or a late fork) get it again
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.01)


def _run(program: str, tests: str, entry_point: str | None, call_check: bool, limits: Limits,
         iso: Isolation, output_tail: int = 16384) -> SandboxResult:
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="tropd-sandbox-")
    nonce = secrets.token_hex(16)
    job = {
        "nonce": nonce,
        "program": program,
        "tests": tests,
        "entry_point": entry_point,
        "call_check": call_check,
        "limits": limits.child_limits(),
        "workdir": workdir,
        "drop_to": list(iso.drop_to) if iso.drop_to else None,
        "preload": list(iso.preload),
    }
    proc: subprocess.Popen | None = None
    try:
        if iso.drop_to:
            os.chown(workdir, *iso.drop_to)
        os.chmod(workdir, 0o700)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            cmd = [*iso.prefix, sys.executable, "-I", "-S", "-c", _harness_source()]
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=workdir,
                                    env=_child_env(workdir), start_new_session=True, close_fds=True)
            timed_out = False
            try:
                assert proc.stdin is not None
                proc.stdin.write(marshal.dumps(job))
                proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            try:
                proc.wait(timeout=max(0.0, limits.timeout_s - (time.monotonic() - start)))
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc)
            duration = time.monotonic() - start
            stdout = _read_tail(out, output_tail)
            stderr = _read_tail(err, output_tail)
    except OSError as exc:
        if proc is not None and proc.returncode is None:
            _kill_group(proc)
        logger.warning("tropd sandbox could not run a program (scored as a failure): %s", exc)
        return SandboxResult(False, "error", None, "", f"could not start the sandbox: {exc}",
                             time.monotonic() - start)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    rc = proc.returncode
    lines = stdout.rstrip("\n").rsplit("\n", 1)
    has_nonce = lines[-1] == nonce
    if has_nonce:
        stdout = lines[0] if len(lines) == 2 else ""
    if timed_out:
        status: Status = "timeout"
    elif rc == 0 and has_nonce:
        status = "passed"
    elif rc == 0:
        status = "early_exit"
    else:
        status = "failed"
    return SandboxResult(status == "passed", status, rc, stdout, stderr, duration, proc.pid)


def run_tests(program: str, tests: str, entry_point: str | None = None, *, call_check: bool | None = None,
              limits: Limits | None = None) -> SandboxResult:
    """Execute ``program`` then ``tests`` in one namespace inside the sandbox.

    Args:
        program: the candidate source (untrusted).
        tests: test source: plain ``assert`` statements, and/or a ``check(candidate)`` function.
        entry_point: name the program must define (callable); ``check`` receives it.
        call_check: call ``check(<entry_point>)`` after the tests load; ``None``: when ``tests`` defines
            a top-level ``check`` function and an entry point is given.
        limits: resource limits (default :class:`Limits`).
    """
    if call_check is None:
        call_check = entry_point is not None and _defines_check(tests)
    if call_check and not entry_point:
        raise ValueError("call_check needs an entry_point")
    return _run(program, tests, entry_point, call_check, limits or Limits(), isolation())


def run_many(jobs: Sequence[tuple[str, str, str | None]], *, limits: Limits | None = None,
             max_workers: int | None = None) -> list[SandboxResult]:
    """Run ``(program, tests, entry_point)`` jobs concurrently (a thread pool over subprocesses), in order."""
    isolation()  # probe once before the threads start
    workers = max_workers or max(1, min(len(jobs), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda job: run_tests(job[0], job[1], job[2], limits=limits), jobs))


def _defines_check(tests: str) -> bool:
    import ast

    try:
        tree = ast.parse(tests)
    except SyntaxError:
        return False
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "check"
               for node in tree.body)
