"""The harness that runs *inside* the sandboxed child process (its source is passed to ``python -I -c``).

Do not import this module from the parent: :mod:`tropd.tasks.sandbox` reads its text and runs it as the
child's ``__main__``. The child reads the job from stdin (a ``marshal``-ed dict: program, tests, limits, a
per-run nonce), then, before any untrusted code runs:

1. points stdin at ``/dev/null`` (the nonce is gone from the pipe),
2. sets OS resource limits: CPU seconds, address space, process count, file size, open files, no core dumps,
3. drops root privileges to the given uid/gid when asked (the parent does so only when it runs as root),
4. installs a Python-level guard (:func:`install_guard`): process creation/killing/exiting, destructive file
   operations, writes outside the working directory, network sockets, and a few escape modules raise.

It then executes the program and the tests in one namespace and, only when every test has run and passed,
writes the nonce as the last line of stdout and leaves with ``os._exit(0)``. The parent counts a pass only
when it sees that nonce: a program that exits early, with status 0 or otherwise, fails.

Exit statuses: 0 passed, 1 a test failed, 2 the program failed to compile or raised at import,
3 the entry point is missing or not callable, 4 the harness itself failed.
"""

from __future__ import annotations

import marshal
import os
import sys

# The harness imports as little as it can (marshal, posix and io are built in, _socket is a small extension):
# every module it loads is start-up time paid by every graded sample.

# Modules the untrusted code may not import: process creation, raw memory/ffi, terminal control.
BLOCKED_MODULES = (
    "ctypes",
    "_ctypes",
    "subprocess",
    "_posixsubprocess",
    "multiprocessing",
    "_multiprocessing",
    "pty",
    "resource",
)

# os / posix functions that create, signal or replace processes, or change identity, cwd, or the filesystem.
DISABLED_OS_FUNCTIONS = (
    "_exit", "abort", "kill", "killpg", "fork", "forkpty", "system", "popen",
    "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe",
    "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
    "posix_spawn", "posix_spawnp", "pidfd_open",
    "setsid", "setpgid", "setpgrp", "setuid", "seteuid", "setgid", "setegid", "setreuid", "setregid",
    "setresuid", "setresgid", "setgroups", "initgroups", "chroot", "chdir", "fchdir",
    "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate",
    "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chflags", "lchflags",
    "link", "symlink", "mkfifo", "mknod", "putenv", "unsetenv", "nice", "setpriority",
    "sched_setaffinity", "sched_setscheduler", "sched_setparam", "plock",
)

DISABLED_SHUTIL_FUNCTIONS = ("rmtree", "move", "chown", "copytree", "make_archive", "unpack_archive")

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class SandboxViolation(PermissionError):
    """Raised by a guarded function the sandboxed program is not allowed to call."""


def _disabled(name: str):
    def refuse(*args, **kwargs):
        raise SandboxViolation(f"{name} is disabled in the tropd sandbox")

    refuse.__name__ = name.rsplit(".", 1)[-1]
    return refuse


def set_limits(limits: dict) -> None:
    """Apply the OS resource limits (soft = hard, so the program cannot raise them again)."""
    import resource

    cpu = int(limits["cpu_s"])
    plan = [
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),  # SIGXCPU at the soft limit, SIGKILL one second later
        (resource.RLIMIT_AS, (limits["memory_bytes"],) * 2),
        (resource.RLIMIT_NPROC, (limits["max_procs"],) * 2),
        (resource.RLIMIT_FSIZE, (limits["max_file_bytes"],) * 2),
        (resource.RLIMIT_NOFILE, (limits["max_open_files"],) * 2),
        (resource.RLIMIT_CORE, (0, 0)),
    ]
    for which, value in plan:
        resource.setrlimit(which, value)


def drop_privileges(uid: int, gid: int) -> None:
    """Leave root for ``uid``/``gid`` with no supplementary groups (irreversible)."""
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise RuntimeError("privilege drop did not take effect")


def _patch_shutil(module) -> None:
    for name in DISABLED_SHUTIL_FUNCTIONS:
        setattr(module, name, _disabled(f"shutil.{name}"))


class _PatchOnImport:
    """A ``sys.meta_path`` finder that disables ``shutil``'s tree functions when a program imports it."""

    def find_spec(self, name, path=None, target=None):
        if name != "shutil":
            return None
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        real_exec = loader.exec_module

        def exec_module(module):
            real_exec(module)
            _patch_shutil(module)

        loader.exec_module = exec_module
        return spec


def _is_other_process_entry(path: str) -> bool:
    """``/proc/<anything but self>/...`` and ``/sys/...``."""
    if path.startswith("/sys/"):
        return True
    if not path.startswith("/proc/"):
        return False
    head = path[len("/proc/"):].split("/", 1)[0]
    return head not in ("self", "thread-self", "")


def install_guard(workdir: str) -> None:
    """Make dangerous calls raise :class:`SandboxViolation` (best effort: Python-level, not a security boundary).

    Covered: process creation and signalling, ``os._exit``, identity/cwd changes, deleting/renaming/linking/
    chmod of files, ``shutil`` tree operations, opening files for writing outside ``workdir``, reading other
    processes' ``/proc`` entries, creating sockets, importing :data:`BLOCKED_MODULES`.
    """
    import _socket
    import builtins
    import io
    import posix

    real_open = io.open
    real_os_open = os.open
    realpath = os.path.realpath
    root = realpath(workdir)

    def inside_workdir(full: str) -> bool:
        return full == root or full.startswith(root + os.sep)

    def check_path(path, writing: bool) -> None:
        if isinstance(path, int):
            return  # an already-open descriptor
        full = realpath(os.fsdecode(os.fspath(path)))
        if writing and not inside_workdir(full):
            raise SandboxViolation(f"writing outside the sandbox directory is disabled: {path!r}")
        if _is_other_process_entry(full):
            raise SandboxViolation(f"reading {path!r} is disabled in the tropd sandbox")

    def guarded_open(file, mode="r", *args, **kwargs):
        check_path(file, writing=any(c in mode for c in "wax+"))
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        writing = bool(flags & _WRITE_FLAGS)
        if dir_fd is not None and writing:
            raise SandboxViolation("os.open with dir_fd for writing is disabled in the tropd sandbox")
        check_path(path, writing=writing)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    os.environ.clear()  # before unsetenv is disabled; the parent passed a minimal environment anyway
    builtins.open = guarded_open
    io.open = guarded_open
    os.open = guarded_os_open
    posix.open = guarded_os_open

    for name in DISABLED_OS_FUNCTIONS:
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, _disabled(f"os.{name}"))

    if "shutil" in sys.modules:
        _patch_shutil(sys.modules["shutil"])
    sys.meta_path.insert(0, _PatchOnImport())

    class NoNetworkSocket(_socket.socket):
        __slots__ = ()  # socket.socket adds __weakref__ itself

        def __init__(self, *args, **kwargs):
            raise SandboxViolation("network access is disabled in the tropd sandbox")

    # `socket.socket` subclasses `_socket.socket`: replaced before `socket` is imported, it cannot be built.
    _socket.socket = NoNetworkSocket
    _socket.SocketType = NoNetworkSocket
    for name in ("socketpair", "fromfd", "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
        if hasattr(_socket, name):
            setattr(_socket, name, _disabled(f"socket.{name}"))
    if "socket" in sys.modules:
        sock = sys.modules["socket"]
        sock.socket = sock.SocketType = NoNetworkSocket
        for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
            setattr(sock, name, _disabled(f"socket.{name}"))

    for name in BLOCKED_MODULES:
        sys.modules[name] = None  # `import name` now raises ImportError


def _report(message: str) -> None:
    try:
        sys.stderr.write(message.rstrip("\n") + "\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - the program may have broken stderr; nothing else to do
        pass


def _traceback() -> str:
    """The current exception with its last frames (no ``traceback`` import: it is slow to load)."""
    _, exc, tb = sys.exc_info()
    frames = []
    while tb is not None:
        frames.append(f"  {tb.tb_frame.f_code.co_filename}, line {tb.tb_lineno}, in {tb.tb_frame.f_code.co_name}")
        tb = tb.tb_next
    try:
        message = f"{type(exc).__name__}: {exc}"
    except BaseException:  # noqa: BLE001 - a hostile __str__
        message = type(exc).__name__
    return "\n".join(["Traceback (most recent call last, innermost 8):", *frames[-8:], message])


def main() -> None:
    """Run one job read from stdin; see the module docstring for the protocol."""
    exit_now = os._exit  # kept before the guard replaces it
    write = os.write
    try:
        job = marshal.loads(sys.stdin.buffer.read())
        nonce = ("\n" + job["nonce"] + "\n").encode()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        out_fd = os.dup(1)  # the nonce goes here even if the program rebinds sys.stdout or closes fd 1
        # Everything the harness needs is imported before the privilege drop: once the child runs as another
        # user it may not be able to read this interpreter's standard library (e.g. one installed under /root).
        import _socket  # noqa: F401 - an extension module in lib-dynload on many builds
        import builtins
        import resource  # noqa: F401
        from importlib import machinery  # noqa: F401

        for module in job.get("preload") or ():
            __import__(module)
        set_limits(job["limits"])
        if job.get("drop_to") is not None:
            drop_privileges(*job["drop_to"])
        install_guard(job["workdir"])
    except BaseException:  # noqa: BLE001
        _report("tropd sandbox: harness set-up failed\n" + _traceback())
        exit_now(4)

    namespace: dict = {"__name__": "__main__", "__builtins__": builtins}
    try:
        code = compile(job["program"], "<solution>", "exec")
        exec(code, namespace)
    except BaseException:  # noqa: BLE001 - SystemExit included: exiting at import is a failure
        _report("tropd sandbox: the program failed to load\n" + _traceback())
        exit_now(2)

    entry_point = job.get("entry_point")
    if entry_point and not callable(namespace.get(entry_point)):
        _report(f"tropd sandbox: entry point {entry_point!r} is not defined or not callable")
        exit_now(3)

    try:
        exec(compile(job["tests"], "<tests>", "exec"), namespace)
        if job.get("call_check"):
            check = namespace["check"]
            check(namespace[entry_point])
    except BaseException:  # noqa: BLE001 - SystemExit from the candidate is a failure too
        _report("tropd sandbox: a test failed\n" + _traceback())
        exit_now(1)

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001
            pass
    try:
        write(out_fd, nonce)
    except BaseException:  # noqa: BLE001
        exit_now(4)
    exit_now(0)


if __name__ == "__main__":
    main()
