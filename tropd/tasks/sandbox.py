"""Run an untrusted Python program against trusted tests, in two contained processes.

Guarantees (see ``docs/tasks.md`` for the honest list of limits):

The verdict is out of the program's reach
    The program runs alone in a WORKER process; the reference setup and tests run in a JUDGE process
    (:mod:`tropd.tasks.sandbox_child`). The judge calls the program's functions through proxies over pipes; the
    answers are decoded into plain builtin values only (None, bool, int, float, complex, str, bytes, list,
    tuple, dict, set, frozenset), so every comparison the tests make is between builtin objects; an exception
    comes back as the builtin exception class it derives from. The worker cannot see or touch the judge: it
    runs as an unprivileged uid while the judge keeps the parent's uid (parent is root), or in another PID
    namespace, or inside a Landlock domain (no ptrace, no signals, no ``/proc/<pid>/fd`` outside it). The verdict is the
    judge's exit status plus a per-run nonce on the judge's own stdout.

Filesystem, enforced by the operating system
    With bubblewrap (``bwrap``, the strongest): the worker sees a new root holding only ``/usr``, the
    interpreter's install tree, ``/etc/ld.so.cache`` and ``/etc/localtime``, all read-only, a fresh ``/dev``
    and ``/proc``, a read-only empty ``/tmp``, and its own temporary directory, the one writable place (a
    private ``tmpfs`` of ``max_disk_mb``); the host's ``/tmp``, home directories, the working tree are invisible.
    Without bwrap, Landlock (Linux >= 5.13) makes every path but the temporary directory non-writable (reads stay
    as the uid allows). With neither, a WARNING is logged once and :attr:`Isolation.filesystem_readonly` is
    ``False``.

Also enforced by the operating system
    * a new session and process group per process; when the run ends, for any reason, both groups get
      ``SIGKILL``, and with a PID namespace every process the program created dies with it;
    * resource limits set before untrusted code runs, soft = hard: CPU seconds, address space, processes
      (binding for a non-root uid: a root parent's worker drops to a uid of its own), file size (caps
      stdout/stderr too), open files, no core files; the judge gets the same limits but processes;
    * per sandbox where the machine allows (else one WARNING line each, :func:`limit_warnings`): memory and
      processes of all its processes together (a cgroup of its own; ``RLIMIT_NPROC`` of a uid or a user
      namespace of its own), and the size of its temporary directory (a bubblewrap ``tmpfs``);
    * a wall-clock limit measured by the parent, over both processes;
    * a fixed minimal environment, ``python -I -S``, a fresh temporary directory as the worker's cwd;
    * network, PID, IPC and UTS namespaces when bwrap or ``unshare`` work here.

Best effort, in Python, inside the worker (:func:`tropd.tasks.sandbox_child.install_guard`)
    process creation, signals, ``os._exit``, destructive file operations, writes outside the temporary
    directory, sockets and a few modules raise ``SandboxViolation``: a second layer, not a boundary.

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
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Literal, Sequence

import psutil

from tropd.tasks.sandbox_cgroups import CgroupPlan, RunCgroup, find_plan
from tropd.tasks.sandbox_cgroups import create as create_cgroup

Status = Literal["passed", "failed", "timeout", "early_exit", "error"]
Filesystem = Literal["bubblewrap", "landlock", "none"]
logger = logging.getLogger(__name__)

NOBODY_UID = 65534
#: Processes of the worker's launcher (bwrap's monitor and PID 1, or unshare's) in its cgroup besides the program's.
LAUNCHER_TASKS = 3
NOBODY_GID = 65534
_HARNESS_EXIT_CODES = {1: "a test failed", 2: "the program failed to load", 3: "entry point missing",
                       4: "harness or reference error"}
INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: `apt-get install -y bubblewrap`; Fedora: `dnf install "
                "bubblewrap`), or run on Linux >= 5.13 with Landlock enabled")


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed run.

    Attributes:
        timeout_s: wall-clock seconds before the parent kills both processes.
        cpu_s: CPU seconds (``RLIMIT_CPU``), per process; ``None`` means ``ceil(timeout_s)``.
        memory_mb: MiB of memory for the whole sandbox: the worker and every process it starts, their files in
            the temporary folder included (a cgroup's memory limit, :attr:`Isolation.memory_per_sandbox`); also
            each process's address space (``RLIMIT_AS``; Python itself needs ~100 MiB of it), the only bound
            where no cgroup can be made (then N processes may hold N x memory_mb, and a WARNING says so).
        max_procs: processes and threads of the sandbox (the worker included): a cgroup's ``pids.max`` and
            ``RLIMIT_NPROC`` of a user that only this sandbox uses (:attr:`Isolation.procs_per_sandbox`).
        max_output_bytes: largest file the worker may write (``RLIMIT_FSIZE``), stdout and stderr included.
        max_open_files: ``RLIMIT_NOFILE``.
        max_disk_mb: size of the temporary folder, the one writable place (a private ``tmpfs`` in bubblewrap's
            view, :attr:`Isolation.private_tmp`).
    """

    timeout_s: float = 5.0
    cpu_s: int | None = None
    memory_mb: int = 1024
    max_procs: int = 16
    max_output_bytes: int = 4 * 1024 * 1024
    max_open_files: int = 64
    max_disk_mb: int = 64

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.memory_mb <= 0 or self.max_procs <= 0 or self.max_disk_mb <= 0:
            raise ValueError(f"limits must be positive (timeout_s, memory_mb, max_procs, max_disk_mb): {self}")

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
        passed: the judge ran every test, they passed, it printed this run's nonce and exited with status 0.
        status: ``"passed"``; ``"failed"`` (the judge exited non-zero: a test, the program or a limit failed it);
            ``"timeout"`` (wall clock); ``"early_exit"`` (the judge exited 0 without the verdict);
            ``"error"`` (could not run).
        returncode: the judge's exit status (1 a test failed, 2 the program failed to load, 3 entry point
            missing, 4 harness or reference error; negative: killed by that signal), ``None`` when it never ran.
        stdout: the tail of the program's stdout.
        stderr: the tail of the program's stderr, then the judge's report (which test failed, and why).
        duration_s: wall-clock seconds.
        pid: the worker's pid (its process group and session id on the host).
        worker_returncode: the worker's exit status (negative: killed by that signal; the parent kills it).
    """

    passed: bool
    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    pid: int | None = None
    worker_returncode: int | None = None

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
    """The OS-level isolation of the worker that this machine allows, probed once per process (:func:`isolation`).

    Attributes:
        prefix: command prefix of the worker (``bwrap`` options without the per-run ones, ``unshare``, or empty).
        network_namespace: the worker has its own network namespace: no interfaces but a loopback that is down.
        pid_namespace: the worker sees only its own processes (private ``/proc``) and all of them die with it.
        user_namespace: the worker runs in its own user namespace (an unprivileged way to get the others; from
            Linux 5.14 it also makes ``RLIMIT_NPROC`` count only that namespace's processes).
        drop_to: ``(uid, gid)`` the worker switches to before untrusted code (parent is root), else ``None``;
            with :attr:`uid_per_sandbox`, the uid is the first of :data:`SANDBOX_UIDS` and each run takes one
            that no other run uses.
        preload: standard modules imported before the privilege drop, because the dropped user cannot read
            this interpreter's standard library (then other modules are not importable by programs).
        filesystem: what keeps the worker from writing outside its temporary directory at the OS level:
            ``"bubblewrap"`` (a read-only, minimal view of the filesystem), ``"landlock"`` (writes restricted,
            reads as the uid allows) or ``"none"`` (only file permissions and the Python-level guard).
        private_tmp: the temporary folder is a size-limited ``tmpfs`` (``max_disk_mb``) inside bubblewrap's
            view, invisible to the host; otherwise it is a folder in the host's temporary folder.
        uid_per_sandbox: each run drops to its own uid (:data:`SANDBOX_UIDS`), so ``RLIMIT_NPROC`` counts only
            that run's processes.
        cgroup: where each run gets its own cgroup (memory and/or pids limits of the whole sandbox), or ``None``.
    """

    prefix: tuple[str, ...] = ()
    network_namespace: bool = False
    pid_namespace: bool = False
    user_namespace: bool = False
    drop_to: tuple[int, int] | None = None
    preload: tuple[str, ...] = ()
    filesystem: Filesystem = "none"
    private_tmp: bool = False
    uid_per_sandbox: bool = False
    cgroup: CgroupPlan | None = None

    @property
    def nproc_enforced(self) -> bool:
        """Whether ``RLIMIT_NPROC`` binds the worker: only for a non-root uid (root in a user namespace was
        measured not to be bound by it)."""
        return self.drop_to is not None or os.geteuid() != 0

    @property
    def filesystem_readonly(self) -> bool:
        """Whether the OS stops the worker from writing anywhere but its temporary directory."""
        return self.filesystem != "none"

    @property
    def memory_per_sandbox(self) -> bool:
        """Whether ``memory_mb`` bounds all of a sandbox's processes together (a cgroup), not each one."""
        return self.cgroup is not None and "memory" in self.cgroup.controllers

    @property
    def procs_per_sandbox(self) -> bool:
        """Whether ``max_procs`` counts only this sandbox's processes: a cgroup's ``pids.max``, a uid of its
        own, or ``RLIMIT_NPROC`` in a user namespace of its own (Linux >= 5.14 counts it per namespace)."""
        if self.cgroup is not None and "pids" in self.cgroup.controllers:
            return True
        if self.uid_per_sandbox and self.drop_to is not None:
            return True
        return self.user_namespace and os.geteuid() != 0 and _kernel_at_least(5, 14)

    @property
    def judge_protected(self) -> bool:
        """Whether the OS stops the worker from signalling, tracing or opening the fds of the judge."""
        return self.pid_namespace or self.drop_to is not None or self.filesystem == "landlock"

    def worker_command(self, workdir: str, harness: Sequence[str], disk_bytes: int = 64 << 20) -> list[str]:
        """The command that starts the worker harness (``harness``: the arguments after the interpreter;
        ``disk_bytes``: the size of a private temporary folder)."""
        if self.filesystem != "bubblewrap":
            return [*self.prefix, sys.executable, *harness]
        mounts = [arg for parent in _ancestors(os.path.dirname(workdir)) if not _bwrap_has(parent)
                  for arg in ("--perms", "0755", "--dir", parent)]
        # A private tmpfs of its own size, owned by root with mode 0700 until the harness hands it to the
        # dropped uid; else the host folder itself.
        folder = (["--size", str(int(disk_bytes)), "--perms", "0700", "--tmpfs", workdir] if self.private_tmp
                  else ["--bind", workdir, workdir])
        # The real interpreter, not a venv's symlink: only its install tree is in the sandbox's view.
        return [*self.prefix, *mounts, *folder, "--remount-ro", "/tmp", "--remount-ro", "/",
                "--chdir", workdir, "--", os.path.realpath(sys.executable), *harness]


#: The uids a root parent's workers drop to, one per concurrent run (held with a lock file, so several tropd
#: processes on one machine never share one): 60578-61183 is a range systemd leaves unused (docs/UIDS-GIDS.md of
#: systemd), below the dynamic service users and nobody, and mapped in the usual 65536-uid container.
SANDBOX_UIDS = range(60600, 61100)


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        found = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return found >= (major, minor)


def _uids_mapped(uids: range) -> bool:
    """Whether this user namespace maps every uid of ``uids`` (a rootless container maps only some)."""
    try:
        lines = Path("/proc/self/uid_map").read_text().split("\n")
    except OSError:
        return True
    for line in lines:
        parts = line.split()
        if len(parts) == 3:
            first, count = int(parts[0]), int(parts[2])
            if first <= uids.start and uids.stop <= first + count:
                return True
    return False


def _uid_lock_dir() -> str:
    return "/run/tropd-sandbox-uids" if os.access("/run", os.W_OK) else \
        os.path.join(tempfile.gettempdir(), "tropd-sandbox-uids")


def _acquire_uid() -> tuple[int, int]:
    """A uid of :data:`SANDBOX_UIDS` that no other run (of any process) holds and no process uses, and the
    descriptor of its lock file (close it to release the uid)."""
    import fcntl

    folder = _uid_lock_dir()
    os.makedirs(folder, mode=0o700, exist_ok=True)
    while True:
        for uid in SANDBOX_UIDS:
            fd = os.open(os.path.join(folder, str(uid)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            if _processes_of(uid):  # used by something else (or a straggler not yet gone): skip it
                os.close(fd)
                continue
            return uid, fd
        time.sleep(0.05)


#: Process states that no longer run (psutil).
_GONE = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)


def _processes_of(uid: int) -> list[int]:
    """Live host processes whose real or effective uid is ``uid``."""
    return [p.pid for p in psutil.process_iter(["uids", "status"])
            if p.info["uids"] and uid in p.info["uids"][:2] and p.info["status"] not in _GONE]


def _kill_while(find, settle_s: float) -> None:
    """SIGKILL the processes ``find()`` lists until it lists none, for at most ``settle_s`` seconds."""
    deadline = time.monotonic() + settle_s
    while (alive := find()) and time.monotonic() < deadline:
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)


def _kill_uid(uid: int, settle_s: float = 2.0) -> None:
    """SIGKILL every process of ``uid`` (a uid this run holds) until none is left (bounded)."""
    _kill_while(lambda: _processes_of(uid), settle_s)


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


def _child_env(home: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "HOME": home, "TMPDIR": home}


def _ancestors(path: str) -> list[str]:
    """``/a``, ``/a/b``, ``/a/b/c`` for ``/a/b/c``."""
    parts = Path(path).parts[1:]
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]


# What the bwrap view holds besides the per-run directory: read-only system trees, the interpreter.
_BWRAP_SYSTEM = ("/usr",)
_BWRAP_TOP_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_BWRAP_FILES = ("/etc/ld.so.cache", "/etc/localtime")


@lru_cache(maxsize=1)
def _python_trees() -> tuple[str, ...]:
    """Install trees of this interpreter that the worker must read, outside the system trees, outermost only."""
    real = os.path.realpath(sys.executable)
    trees = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix,
                                           os.path.dirname(os.path.dirname(real)))}
    trees = {t for t in trees if not any(t == s or t.startswith(s + "/") for s in _BWRAP_SYSTEM)}
    return tuple(sorted(t for t in trees if not any(t != o and t.startswith(o + "/") for o in trees)))


def _bwrap_has(path: str) -> bool:
    """Whether ``path`` already exists in the bwrap view built by :func:`_bwrap_prefix`."""
    if path in ("/", "/tmp", "/dev", "/proc", "/etc") or path in _BWRAP_TOP_LINKS:
        return True
    return any(path == t or path.startswith(t + "/") or t.startswith(path + "/")
               for t in (*_BWRAP_SYSTEM, *_python_trees()))


def _bwrap_prefix(bwrap: str, user_namespace: bool) -> tuple[str, ...]:
    """``bwrap`` options of the worker: new namespaces, a minimal read-only view (per-run mounts come later)."""
    args = [bwrap, "--die-with-parent", "--new-session"]
    # As root, no user namespace: the worker harness drops to an unprivileged uid itself (bwrap would map only root).
    args += ["--unshare-all"] if user_namespace else [
        "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
    for tree in _BWRAP_SYSTEM:
        args += ["--ro-bind", tree, tree]
    for top in _BWRAP_TOP_LINKS:
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    args += ["--perms", "0755", "--dir", "/etc"]
    for path in _BWRAP_FILES:
        args += ["--ro-bind-try", path, path]
    made = {"/", "/etc"}
    for tree in _python_trees():
        for parent in _ancestors(os.path.dirname(tree)):
            if parent not in made:  # bwrap would create missing parents with mode 0700
                args += ["--perms", "0755", "--dir", parent]
                made.add(parent)
        args += ["--ro-bind", tree, tree]
    args += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    return tuple(args)


@lru_cache(maxsize=1)
def _landlock_abi() -> int:
    """The kernel's Landlock ABI version (0: unavailable or not askable from here)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        return max(0, int(libc.syscall(ctypes.c_long(444), None, ctypes.c_long(0), ctypes.c_long(1))))
    except (OSError, AttributeError, ImportError):
        return 0


def _candidates() -> list[Isolation]:
    """Isolation set-ups from strongest to weakest; :func:`isolation` keeps the first that passes its probe."""
    unshare, bwrap = shutil.which("unshare"), shutil.which("bwrap")
    root = os.geteuid() == 0
    own_uids = root and _uids_mapped(SANDBOX_UIDS)
    nobody = ((SANDBOX_UIDS.start if own_uids else NOBODY_UID), NOBODY_GID) if root else None  # the drop
    full_ns = ("--net", "--pid", "--fork", "--kill-child", "--mount-proc", "--")
    net_ns = ("--net", "--")
    user_ns = ("--user", "--map-root-user")
    out: list[Isolation] = []
    if bwrap:
        for private_tmp in (True, False):  # a tmpfs of a given size needs bubblewrap >= 0.7 (`--size`)
            for preload in (((), PRELOAD_MODULES) if root else ((),)):
                out.append(Isolation(_bwrap_prefix(bwrap, not root), True, True, not root, nobody, preload,
                                     "bubblewrap", private_tmp))
    filesystems: list[Filesystem] = (["landlock"] if _landlock_abi() > 0 else []) + ["none"]
    for fs in filesystems:
        if root:
            for preload in ((), PRELOAD_MODULES):
                if unshare:
                    out.append(Isolation((unshare, *full_ns), True, True, False, nobody, preload, fs))
                    out.append(Isolation((unshare, *net_ns), True, False, False, nobody, preload, fs))
                out.append(Isolation((), drop_to=nobody, preload=preload, filesystem=fs))
        if unshare:
            out.append(Isolation((unshare, *user_ns, *full_ns), True, True, True, filesystem=fs))
            out.append(Isolation((unshare, *user_ns, *net_ns), True, False, True, filesystem=fs))
        if not root:
            out.append(Isolation(filesystem=fs))
    out.append(Isolation())
    return [replace(c, uid_per_sandbox=own_uids) if c.drop_to else c for c in out]


_PROBE_TESTS = "assert x == 1\n"


def _probe_program(candidate: Isolation, outside: str) -> str:
    """A program whose ``x`` is 1 only when the candidate works: its imports load (without a preload list any
    standard module must be importable: one that nothing imports on its own), and, when the candidate claims
    filesystem isolation, writing its own directory works while writing the world-writable ``outside`` fails
    even past the Python-level guard."""
    lines = ["import json, collections", *([] if candidate.preload else ["import zipfile, wave"]), "x = 1"]
    if candidate.filesystem_readonly:
        lines += ["import sys", "del sys.modules['posix']", "import posix",
                  "flags = posix.O_WRONLY | posix.O_CREAT",
                  "posix.close(posix.open('inside', flags, 0o600))",
                  "try:", f"    posix.close(posix.open({outside + '/escaped'!r}, flags, 0o666))",
                  "    x = 0", "except OSError:", "    pass"]
    return "\n".join(lines) + "\n"


def _probe(candidate: Isolation) -> SandboxResult:
    outside = tempfile.mkdtemp(prefix="tropd-probe-")
    try:
        os.chmod(outside, 0o1777)
        result = _run(_probe_program(candidate, outside), _PROBE_TESTS, None, None, False, Limits(timeout_s=30),
                      candidate)
        if os.listdir(outside):
            result = replace(result, passed=False, status="failed", stderr=result.stderr + "\nwrote outside")
        return result
    finally:
        shutil.rmtree(outside, ignore_errors=True)


_isolation_lock = threading.Lock()
_isolation_cache: Isolation | None = None
_no_cgroup_why = "not probed"


def isolation() -> Isolation:
    """Probe (once per process, thread-safe) the strongest isolation that runs a trivial program here, and where
    each run can get a cgroup of its own.

    Logs a WARNING, once, when the chosen set-up has no OS-level filesystem isolation (saying what is missing
    and how to install it) or does not keep the worker away from the judge, and one line for each limit that
    holds only per process here (:func:`limit_warnings`).
    """
    global _isolation_cache, _no_cgroup_why
    with _isolation_lock:
        if _isolation_cache is None:
            chosen, failures = Isolation(), []
            for candidate in _candidates():
                result = _probe(candidate)
                if result.passed:
                    chosen = candidate
                    break
                failures.append((candidate, result))
            plan, _no_cgroup_why = find_plan()
            chosen = replace(chosen, cgroup=plan)
            _warn_if_weak(chosen, failures)
            _isolation_cache = chosen
        return _isolation_cache


def limit_warnings(iso: Isolation) -> list[str]:
    """One line for each limit of :class:`Limits` that does not hold per sandbox with ``iso``: what it bounds
    instead, what that allows, and how to fix it. :func:`isolation` logs them once per process."""
    lines = []
    if not iso.memory_per_sandbox:
        why = _no_cgroup_why if iso.cgroup is None else "the cgroup has no memory controller"
        lines.append(f"tropd sandbox: memory_mb is per process here (RLIMIT_AS), not per sandbox ({why}): a program "
                     "that starts N processes may hold N x memory_mb. To fix: run the grader as root with a "
                     "writable cgroup (cgroup v2: the parent of its cgroup enables memory and pids), e.g. outside "
                     "a container or in one with a writable /sys/fs/cgroup.")
    if not iso.private_tmp:
        lines.append(f"tropd sandbox: the program's temporary folder is not size-limited and lies in the host's "
                     f"temporary folder ({tempfile.gettempdir()}): RLIMIT_FSIZE caps each file, not their total. "
                     f"To fix: install bubblewrap >= 0.7 ({INSTALL_HINT.split(', or run')[0]}).")
    if not iso.nproc_enforced and not iso.procs_per_sandbox:
        lines.append("tropd sandbox: the process limit is not enforced here (root without a privilege drop or a "
                     "pids cgroup): a fork bomb can exhaust the machine's processes until the wall-clock limit. "
                     "To fix: let the grader drop to an unprivileged uid (it needs to read its interpreter) or "
                     "give it a writable cgroup.")
    elif not iso.procs_per_sandbox:
        who = f"uid {iso.drop_to[0]}" if iso.drop_to else f"uid {os.geteuid()}"
        lines.append(f"tropd sandbox: the process limit is shared by every sandbox running as {who} (RLIMIT_NPROC "
                     "is per user, and no pids cgroup could be made): a fork bomb in one can make programs graded "
                     "beside it fail. To fix: run the grader as root (each sandbox then gets a uid of its own), "
                     "or allow user namespaces on Linux >= 5.14 (each sandbox is counted in its own).")
    return lines


def _warn_if_weak(chosen: Isolation, failures: list[tuple[Isolation, SandboxResult]]) -> None:
    logger.info("tropd sandbox isolation: filesystem=%s pid_namespace=%s network_namespace=%s drop_to=%s",
                chosen.filesystem, chosen.pid_namespace, chosen.network_namespace, chosen.drop_to)
    if not chosen.filesystem_readonly:
        bwrap_failures = [r for c, r in failures if c.filesystem == "bubblewrap"]
        why = ("bubblewrap (bwrap) is not installed" if shutil.which("bwrap") is None
               else f"bubblewrap failed here: {bwrap_failures[-1].stderr.strip()[-300:]!r}" if bwrap_failures
               else "bubblewrap did not work")
        why += "; Landlock is not available" if _landlock_abi() == 0 else "; Landlock did not work"
        logger.warning("tropd sandbox: NO OS-level filesystem isolation (%s). Graded programs can write wherever "
                       "their user may (world-writable folders such as /tmp); only file permissions and a "
                       "Python-level guard, which a program can bypass, stand in the way. To fix: %s.",
                       why, INSTALL_HINT)
    logger.info("tropd sandbox limits: private_tmp=%s uid_per_sandbox=%s cgroup=%s",
                chosen.private_tmp, chosen.uid_per_sandbox, chosen.cgroup.describe() if chosen.cgroup else None)
    for line in limit_warnings(chosen):
        logger.warning(line)
    if not chosen.judge_protected:
        logger.warning("tropd sandbox: the program's process runs as the judge's user in the judge's PID "
                       "namespace without Landlock: a hostile program could trace or signal the judge and forge "
                       "a pass. To fix: run as root (the program then drops to an unprivileged uid), allow user "
                       "namespaces, or %s.", INSTALL_HINT)


def _read_tail(handle, limit: int) -> str:
    handle.flush()
    size = handle.seek(0, os.SEEK_END)
    handle.seek(max(0, size - limit))
    return handle.read().decode("utf-8", errors="replace")


def _kill_group(proc: subprocess.Popen, settle_s: float = 2.0) -> None:
    """SIGKILL a process's whole group, reap it, and wait (bounded) until the group is gone."""
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


def _processes_in(workdir: str) -> list[int]:
    """Live (not zombie) host processes whose working directory lies in ``workdir``."""
    return [p.pid for p in psutil.process_iter(["cwd", "status"])
            if p.info["cwd"] and (p.info["cwd"] == workdir or p.info["cwd"].startswith(workdir + os.sep))
            and p.info["status"] not in _GONE]


def _settle_workdir(workdir: str, settle_s: float = 2.0) -> None:
    """Wait (bounded) until no process runs in ``workdir``, SIGKILLing stragglers. The program's own session
    (bwrap ``--new-session``) is outside the worker's process group: the kernel kills it when the PID namespace's
    init dies, but not at once, and without a PID namespace only this finds it."""
    _kill_while(lambda: _processes_in(workdir), settle_s)


def _start(cmd: list[str], job: dict, out, err, cwd: str, env: dict, fds: tuple[int, int]) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=cwd, env=env,
                            start_new_session=True, close_fds=True, pass_fds=fds)
    try:
        assert proc.stdin is not None
        proc.stdin.write(marshal.dumps(job))
        proc.stdin.close()
    except (BrokenPipeError, OSError):
        pass
    return proc


def _run(program: str, tests: str, setup: str | None, entry_point: str | None, call_check: bool, limits: Limits,
         iso: Isolation, output_tail: int = 16384) -> SandboxResult:
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="tropd-sandbox-")
    nonce = secrets.token_hex(16)
    child_limits = limits.child_limits()
    judge_job = {"nonce": nonce, "tests": tests, "setup": setup, "entry_point": entry_point,
                 "call_check": call_check, "limits": child_limits}
    procs: list[subprocess.Popen] = []
    pipe_fds: list[int] = []
    uid_lock: int | None = None
    run_cgroup: RunCgroup | None = None
    drop_to = iso.drop_to
    try:
        if drop_to and iso.uid_per_sandbox:
            uid, uid_lock = _acquire_uid()
            drop_to = (uid, drop_to[1])
        if iso.cgroup is not None:
            run_cgroup = create_cgroup(iso.cgroup, child_limits["memory_bytes"],
                                       child_limits["max_procs"] + LAUNCHER_TASKS)
        worker_job = {"program": program, "limits": child_limits, "workdir": workdir,
                      "drop_to": list(drop_to) if drop_to else None, "preload": list(iso.preload),
                      "landlock": iso.filesystem == "landlock"}
        if drop_to:
            os.chown(workdir, *drop_to)
        os.chmod(workdir, 0o700)
        to_worker_r, to_worker_w = os.pipe()
        to_judge_r, to_judge_w = os.pipe()
        pipe_fds = [to_worker_r, to_worker_w, to_judge_r, to_judge_w]
        source = _harness_source()
        with tempfile.TemporaryFile() as w_out, tempfile.TemporaryFile() as w_err, \
                tempfile.TemporaryFile() as j_out, tempfile.TemporaryFile() as j_err:
            worker_cmd = iso.worker_command(workdir, ["-I", "-S", "-c", source, "worker", str(to_worker_r),
                                                      str(to_judge_w)], limits.max_disk_mb << 20)
            if run_cgroup is not None:
                worker_cmd = run_cgroup.wrap(worker_cmd)
            procs.append(_start(worker_cmd, worker_job, w_out, w_err, workdir, _child_env(workdir),
                                (to_worker_r, to_judge_w)))
            judge_cmd = [sys.executable, "-I", "-S", "-c", source, "judge", str(to_judge_r), str(to_worker_w)]
            procs.append(_start(judge_cmd, judge_job, j_out, j_err, "/", _child_env("/"),
                                (to_judge_r, to_worker_w)))
            for fd in pipe_fds:  # now only the children hold the pipes: a dead peer reads as end of file
                os.close(fd)
            pipe_fds = []
            worker, judge = procs
            timed_out = False
            try:
                judge.wait(timeout=max(0.0, limits.timeout_s - (time.monotonic() - start)))
            except subprocess.TimeoutExpired:
                timed_out = True
            for proc in procs:
                _kill_group(proc)
            duration = time.monotonic() - start
            stdout = _read_tail(w_out, output_tail)
            stderr = _read_tail(w_err, output_tail)
            verdict = _read_tail(j_out, 4096)
            report = _read_tail(j_err, output_tail)
    except OSError as exc:
        for proc in procs:
            if proc.returncode is None:
                _kill_group(proc)
        logger.warning("tropd sandbox could not run a program (scored as a failure): %s", exc)
        return SandboxResult(False, "error", None, "", f"could not start the sandbox: {exc}",
                             time.monotonic() - start)
    finally:
        for fd in pipe_fds:
            os.close(fd)
        _settle_workdir(workdir)
        if run_cgroup is not None:
            run_cgroup.destroy()
        if uid_lock is not None:
            _kill_uid(drop_to[0])  # the uid is this run's alone: whatever still runs as it is a straggler
            os.close(uid_lock)
        shutil.rmtree(workdir, ignore_errors=True)

    rc = judge.returncode
    has_verdict = verdict.rstrip("\n").rsplit("\n", 1)[-1] == f"{nonce} passed"
    if timed_out:
        status: Status = "timeout"
    elif rc == 0 and has_verdict:
        status = "passed"
    elif rc == 0:
        status = "early_exit"
    else:
        status = "failed"
    if report:
        stderr = (stderr.rstrip("\n") + "\n" if stderr else "") + report
    return SandboxResult(status == "passed", status, rc, stdout, stderr, duration, worker.pid, worker.returncode)


def run_tests(program: str, tests: str, entry_point: str | None = None, *, call_check: bool | None = None,
              limits: Limits | None = None, setup: str | None = None) -> SandboxResult:
    """Run ``program`` in the worker and ``setup`` then ``tests`` in the judge (see the module docstring).

    The tests see: the judge's builtins; the names ``setup`` defines; then, from the program, the entry point
    and every other name they use that neither defines: a function as a proxy (arguments and return values
    must be plain data; mutating an argument in place is not seen by the tests), a plain-data value as a copy.

    Args:
        program: the candidate source (untrusted). For HumanEval it starts with the setup (the prompt).
        tests: test source (trusted): plain ``assert`` statements, and/or a ``check(candidate)`` function.
        entry_point: name the program must define (callable); ``check`` receives its proxy.
        call_check: call ``check(<entry_point>)`` after the tests load; ``None``: when ``tests`` defines
            a top-level ``check`` function and an entry point is given.
        limits: resource limits (default :class:`Limits`).
        setup: reference code (trusted) run in the judge before the tests: imports and helper functions the
            tests use, which the program cannot redefine for them. A setup that does not compile on its own
            (e.g. a bare ``def f(x):``) is not run in the judge.
    """
    if call_check is None:
        call_check = entry_point is not None and _defines_check(tests)
    if call_check and not entry_point:
        raise ValueError("call_check needs an entry_point")
    return _run(program, tests, setup, entry_point, call_check, limits or Limits(), isolation())


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
