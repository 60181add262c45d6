"""The two processes of a sandboxed run: the untrusted WORKER and the trusted JUDGE.

:mod:`tropd.tasks.sandbox` runs this file's text as ``python -I -S -c <text> worker|judge RX TX``, where RX and
TX are the ends of the two pipes it created between them, and sends each its job (a ``marshal``-ed dict) on
stdin. Importing the module has no side effects (tests use its wire format directly).

WORKER (untrusted: the program)
    Before the program runs it points stdin at ``/dev/null``, sets resource limits, restricts writes with
    Landlock when asked (the fallback when bubblewrap is not used), leaves root for ``nobody`` when asked, and
    installs the Python-level guard (:func:`install_guard`). It executes the program, reports whether it loaded,
    then answers the judge's requests: the program's names, and calls of its functions. Nothing it does sets
    the verdict: all it can do is send messages, which the judge decodes into plain data.

JUDGE (trusted: the reference setup and tests)
    Runs in a process the worker cannot see or reach (another uid, another PID namespace, or outside the
    worker's Landlock domain). It executes the reference ``setup``, binds the names the tests use that neither
    the setup nor Python's builtins define, from the program: a function becomes a *proxy* (calling it sends the
    encoded arguments to the worker and returns its decoded answer, or raises the builtin exception the program
    raised), a plain-data value a copy. It then executes the tests and writes ``<nonce> passed`` on its own
    stdout. Exit status: 0 passed, 1 a test failed, 2 the program failed to load, 3 the entry point is missing or
    not callable, 4 harness or reference error.

Wire format (:func:`dumps` / :func:`loads`), both directions. A message is its length (8 bytes, big-endian)
then JSON, at most :data:`MAX_MESSAGE_BYTES`. JSON null, true/false, numbers (``NaN``, ``Infinity`` too),
strings and arrays are ``None``, ``bool``, ``int``/``float``, ``str`` and ``list``; a JSON object is a one-key
tag: ``{"tuple": [...]}``, ``{"set": [...]}``, ``{"frozenset": [...]}``, ``{"dict": [[key, value], ...]}``,
``{"bytes": "<hex>"}``, ``{"complex": [real, imag]}``. :func:`loads` builds nothing but those builtin types
and rejects anything else, so no object of the program's (a custom ``__eq__``, ``__hash__``, ...) can reach
the judge. :func:`to_wire` encodes a subclass of those types as its base type (a namedtuple as a tuple, an
``IntEnum`` as an int) and raises ``TypeError`` for any other type.
"""

from __future__ import annotations

import json
import marshal
import os
import sys

MAX_MESSAGE_BYTES = 32 * 1024 * 1024
EXIT_PASSED, EXIT_TEST_FAILED, EXIT_LOAD_FAILED, EXIT_NO_ENTRY_POINT, EXIT_HARNESS = 0, 1, 2, 3, 4

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


# ---------------------------------------------------------------------------------------------- wire format

class WireError(ValueError):
    """A message that is not in the wire format, or too large."""


def to_wire(value):
    """``value`` as JSON-ready data in the wire format; ``TypeError`` for anything but plain data."""
    if value is None or value is True or value is False:
        return value
    kind = type(value)
    if kind is int or kind is str or kind is float:
        return value
    if isinstance(value, int):  # bool is final: only true int subclasses get here
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, list):
        return [to_wire(item) for item in value]
    if isinstance(value, tuple):
        return {"tuple": [to_wire(item) for item in value]}
    if isinstance(value, dict):
        return {"dict": [[to_wire(key), to_wire(item)] for key, item in dict.items(value)]}
    if isinstance(value, frozenset):
        return {"frozenset": [to_wire(item) for item in value]}
    if isinstance(value, set):
        return {"set": [to_wire(item) for item in value]}
    if isinstance(value, bytes):
        return {"bytes": bytes.hex(value)}
    if isinstance(value, complex):
        return {"complex": [complex.real.__get__(value), complex.imag.__get__(value)]}
    raise TypeError(f"a {kind.__name__} is not plain data (None, bool, int, float, complex, str, bytes, "
                    "list, tuple, dict, set, frozenset)")


def _from_tag(pairs: list):
    """Build the builtin value of one tagged JSON object (``object_pairs_hook``; inner values are built)."""
    if len(pairs) == 1:
        (tag, value), = pairs
        if type(value) is list:
            if tag == "tuple":
                return tuple(value)
            if tag == "set":
                return set(value)
            if tag == "frozenset":
                return frozenset(value)
            if tag == "dict" and all(type(item) is list and len(item) == 2 for item in value):
                return dict(value)
            if tag == "complex" and len(value) == 2 and all(type(x) in (int, float) for x in value):
                return complex(value[0], value[1])
        elif tag == "bytes" and type(value) is str:
            return bytes.fromhex(value)
    raise WireError(f"not a wire-format object: keys {[key for key, _ in pairs][:3]}")


def dumps(value) -> bytes:
    """Encode plain data (``TypeError`` otherwise, ``RecursionError`` for too deep or cyclic data)."""
    return json.dumps(to_wire(value), separators=(",", ":")).encode("ascii")


def loads(data: bytes):
    """Decode a message into builtin values only; :class:`WireError` for anything that is not the format."""
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_from_tag)
    except (ValueError, TypeError, RecursionError) as exc:  # JSON, UTF-8, unhashable key, too deep
        raise WireError(f"malformed message: {type(exc).__name__}: {str(exc)[:200]}") from None


def send(fd: int, payload: bytes) -> None:
    if len(payload) > MAX_MESSAGE_BYTES:
        raise WireError(f"message of {len(payload)} bytes is over the {MAX_MESSAGE_BYTES}-byte limit")
    data = memoryview(len(payload).to_bytes(8, "big") + payload)
    while data:
        data = data[os.write(fd, data):]


def _read_exact(fd: int, size: int) -> bytes:
    chunks = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            raise EOFError("the other process closed the channel")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def receive(fd: int) -> bytes:
    size = int.from_bytes(_read_exact(fd, 8), "big")
    if size > MAX_MESSAGE_BYTES:
        raise WireError(f"message of {size} bytes is over the {MAX_MESSAGE_BYTES}-byte limit")
    return _read_exact(fd, size)


# ---------------------------------------------------------------------------------------------- set-up

class SandboxViolation(PermissionError):
    """Raised by a guarded function the sandboxed program is not allowed to call."""


def _disabled(name: str):
    def refuse(*args, **kwargs):
        raise SandboxViolation(f"{name} is disabled in the tropd sandbox")

    refuse.__name__ = name.rsplit(".", 1)[-1]
    return refuse


def _no_int_digit_limit() -> None:
    if hasattr(sys, "set_int_max_str_digits"):  # big ints travel as decimal digits
        sys.set_int_max_str_digits(0)


def set_limits(limits: dict, processes: bool = True) -> None:
    """Apply the OS resource limits (soft = hard, so the process cannot raise them again)."""
    import resource

    cpu = int(limits["cpu_s"])
    plan = [
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),  # SIGXCPU at the soft limit, SIGKILL one second later
        (resource.RLIMIT_AS, (limits["memory_bytes"],) * 2),
        (resource.RLIMIT_FSIZE, (limits["max_file_bytes"],) * 2),
        (resource.RLIMIT_NOFILE, (limits["max_open_files"],) * 2),
        (resource.RLIMIT_CORE, (0, 0)),
    ]
    if processes:
        plan.append((resource.RLIMIT_NPROC, (limits["max_procs"],) * 2))
    for which, value in plan:
        resource.setrlimit(which, value)


def drop_privileges(uid: int, gid: int) -> None:
    """Leave root for ``uid``/``gid`` with no supplementary groups (irreversible)."""
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise RuntimeError("privilege drop did not take effect")


# Landlock (Linux >= 5.13): syscall numbers (the same on every architecture) and access rights.
_LANDLOCK_CREATE_RULESET, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LANDLOCK_WRITE_FILE, _LANDLOCK_REFER, _LANDLOCK_TRUNCATE = 1 << 1, 1 << 13, 1 << 14
# WRITE_FILE, then REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR, MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM
_LANDLOCK_WRITES = _LANDLOCK_WRITE_FILE | sum(1 << bit for bit in range(4, 13))


def restrict_writes(workdir: str) -> int:
    """Landlock this process and its future children: they may create, write, truncate, delete, rename or link
    files only beneath ``workdir`` (and write ``/dev/null``); with ABI >= 4 they cannot bind or connect TCP
    sockets, with ABI >= 6 not signal processes or reach abstract UNIX sockets outside the domain. Landlock also
    forbids ptrace (and ``/proc/<pid>`` fd/mem access) of processes outside the domain, the judge included.
    Irreversible. Returns the ABI version; ``OSError`` when the kernel refuses."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long

    def call(*args) -> int:
        result = libc.syscall(*(ctypes.c_long(a) if isinstance(a, int) else a for a in args))
        if result < 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"Landlock syscall {args[0]} failed: {os.strerror(errno)}")
        return result

    abi = call(_LANDLOCK_CREATE_RULESET, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    writes = _LANDLOCK_WRITES | (_LANDLOCK_REFER if abi >= 2 else 0) | (_LANDLOCK_TRUNCATE if abi >= 3 else 0)

    class RulesetAttr(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    attr = RulesetAttr(writes, 0b11 if abi >= 4 else 0, 0b11 if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = call(_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), size, 0)
    file_writes = _LANDLOCK_WRITE_FILE | (_LANDLOCK_TRUNCATE if abi >= 3 else 0)
    for path, allowed in ((workdir, writes), (os.devnull, file_writes)):
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            call(_LANDLOCK_ADD_RULE, ruleset, 1, ctypes.byref(PathBeneath(allowed, fd)), 0)  # PATH_BENEATH
        finally:
            os.close(fd)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS, required to restrict oneself without privileges
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    call(_LANDLOCK_RESTRICT_SELF, ruleset, 0)
    os.close(ruleset)
    return abi


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
        message += "".join(f"\n  note: {note}" for note in getattr(exc, "__notes__", ()))
    except BaseException:  # noqa: BLE001 - a hostile __str__
        message = type(exc).__name__
    return "\n".join(["Traceback (most recent call last, innermost 8):", *frames[-8:], message])


def _read_job() -> dict:
    job = marshal.loads(sys.stdin.buffer.read())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return job


# ---------------------------------------------------------------------------------------------- worker

def _builtin_base(kind: type) -> str:
    """The name of the first builtin exception class in ``kind``'s MRO (``SandboxViolation`` -> PermissionError)."""
    import builtins

    for klass in kind.__mro__:
        if getattr(builtins, klass.__name__, None) is klass:
            return klass.__name__
    return "BaseException"


def _describe_exception(exc: BaseException) -> list:
    try:
        args = list(exc.args)
        to_wire(args)
    except BaseException:  # noqa: BLE001 - not plain data, or a hostile object
        try:
            args = [str(exc)]
        except BaseException:  # noqa: BLE001
            args = []
    return ["raised", _builtin_base(type(exc)), type(exc).__name__, args]


def _reply(tx: int, message: list) -> None:
    for stream in (sys.stdout, sys.stderr):  # the parent SIGKILLs the worker at the end: flush prints now
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001
            pass
    try:
        payload = dumps(message)
        if len(payload) > MAX_MESSAGE_BYTES:
            payload = dumps(["unsendable", f"a value of {len(payload)} bytes (over the message limit)"])
    except (TypeError, ValueError, RecursionError) as exc:
        payload = dumps(["unsendable", f"{type(exc).__name__}: {exc}"[:500]])
    send(tx, payload)


def worker_main(rx: int, tx: int) -> None:
    """Load the program, then serve the judge's ``names`` and ``call`` requests until the channel closes."""
    exit_now = os._exit  # kept before the guard replaces it
    try:
        job = _read_job()
        # Everything the worker needs is imported before the privilege drop: once it runs as another user it may
        # not be able to read this interpreter's standard library (e.g. one installed under /root).
        import _socket  # noqa: F401 - an extension module in lib-dynload on many builds
        import builtins
        import resource  # noqa: F401
        from importlib import machinery  # noqa: F401

        for module in job.get("preload") or ():
            __import__(module)
        _no_int_digit_limit()
        set_limits(job["limits"])
        if job.get("landlock"):
            restrict_writes(job["workdir"])
        if job.get("drop_to") is not None:
            os.chown(job["workdir"], *job["drop_to"])  # a private tmpfs is root's until now
            drop_privileges(*job["drop_to"])
        install_guard(job["workdir"])
    except BaseException:  # noqa: BLE001
        _report("tropd sandbox: worker set-up failed\n" + _traceback())
        exit_now(EXIT_HARNESS)

    namespace: dict = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(job["program"], "<solution>", "exec"), namespace)
    except BaseException:  # noqa: BLE001 - SystemExit included: exiting at import is a failure
        _report("tropd sandbox: the program failed to load\n" + _traceback())
        try:
            _reply(tx, ["load_failed"])
        finally:
            exit_now(EXIT_LOAD_FAILED)
    try:
        _reply(tx, ["loaded"])
        exported: dict = {}
        while True:
            request = loads(receive(rx))
            if request[0] == "names":
                found = {}
                for name in request[1]:
                    if name not in namespace:
                        continue
                    value = namespace[name]
                    if callable(value):
                        exported[name] = value
                        found[name] = ["callable"]
                    else:
                        try:
                            to_wire(value)
                        except (TypeError, RecursionError):
                            continue  # not plain data: invisible to the tests
                        found[name] = ["value", value]
                _reply(tx, found)
            elif request[0] == "call":
                _, name, args, kwargs = request
                try:
                    result = exported[name](*args, **kwargs)
                except BaseException as exc:  # noqa: BLE001 - reported to the judge, which decides
                    _reply(tx, _describe_exception(exc))
                else:
                    _reply(tx, ["ok", result])
            else:
                break
    except BaseException:  # noqa: BLE001 - the judge closed the channel, or the program broke the worker
        pass
    exit_now(0)


# ---------------------------------------------------------------------------------------------- judge

class ProgramFailure(BaseException):
    """Raised in the judge when a call cannot give the tests a value or a builtin exception: the program's
    process died, broke the protocol, exited, or returned something that is not plain data. A ``BaseException``,
    so a test's ``except Exception`` does not swallow it."""


def _rebuild_exception(base: str, type_name: str, args: list) -> BaseException:
    """The builtin exception the program raised, built in the judge from plain data."""
    import builtins

    klass = getattr(builtins, base, None)
    if not (isinstance(klass, type) and issubclass(klass, Exception)):
        return ProgramFailure(f"the program raised {type_name} ({base})")
    if issubclass(klass, (StopIteration, StopAsyncIteration)):  # would end the tests' loops early
        return RuntimeError(f"the program raised {type_name}")
    for candidate in klass.__mro__:  # e.g. UnicodeDecodeError needs 5 arguments
        try:
            exc = candidate(*args)
        except Exception:  # noqa: BLE001
            continue
        if type_name != candidate.__name__ and hasattr(exc, "add_note"):
            exc.add_note(f"raised by the program as {type_name}")
        return exc
    return ProgramFailure(f"the program raised {type_name}")


class _Channel:
    """The judge's end of the pipes to the worker: requests out, strictly decoded replies back."""

    def __init__(self, rx: int, tx: int) -> None:
        self.rx, self.tx = rx, tx

    def receive(self):
        try:
            return loads(receive(self.rx))
        except (OSError, EOFError, WireError) as exc:
            raise ProgramFailure(f"no valid answer from the program's process: {exc}") from None

    def request(self, message: list):
        try:
            payload = dumps(message)
        except (TypeError, ValueError, RecursionError) as exc:
            raise ProgramFailure(f"the tests passed an argument that is not plain data: {exc}") from None
        try:
            send(self.tx, payload)
        except (OSError, WireError) as exc:
            raise ProgramFailure(f"could not reach the program's process: {exc}") from None
        return self.receive()

    def call(self, name: str, args: tuple, kwargs: dict):
        reply = self.request(["call", name, list(args), kwargs])
        if type(reply) is list and reply:
            if reply[0] == "ok" and len(reply) == 2:
                return reply[1]
            if (reply[0] == "raised" and len(reply) == 4 and type(reply[1]) is str and type(reply[2]) is str
                    and type(reply[3]) is list):
                raise _rebuild_exception(reply[1], reply[2], reply[3])
            if reply[0] == "unsendable":
                raise ProgramFailure(f"{name} returned something that is not plain data: {reply[1:]}"[:1000])
        raise ProgramFailure(f"malformed answer from the program's process to a call of {name}")

    def proxy(self, name: str):
        def call(*args, **kwargs):
            return self.call(name, args, kwargs)

        call.__name__ = call.__qualname__ = name
        return call


def _referenced_names(code) -> set:
    """Global (and attribute) names used anywhere in ``code``, nested functions and comprehensions included."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, type(code)):
            names |= _referenced_names(const)
    return names


def judge_main(rx: int, tx: int) -> None:
    """Run the reference setup and tests against proxies of the program's functions; print the verdict."""
    exit_now = os._exit
    try:
        job = _read_job()
        verdict_fd = os.dup(1)
        os.dup2(2, 1)  # whatever the tests print goes to stderr: stdout carries only the verdict
        import builtins

        _no_int_digit_limit()
        set_limits(job["limits"], processes=False)
        namespace: dict = {"__name__": "__main__", "__builtins__": builtins}
        referenced: set = set()
        if job.get("setup"):
            try:
                setup_code = compile(job["setup"], "<setup>", "exec")
            except SyntaxError:
                _report("tropd sandbox: the reference setup does not compile on its own; the judge does not run it")
            else:
                exec(setup_code, namespace)
                referenced |= _referenced_names(setup_code)
        tests_code = compile(job["tests"], "<tests>", "exec")
    except BaseException:  # noqa: BLE001
        _report("tropd sandbox: the judge could not load the reference setup or tests\n" + _traceback())
        exit_now(EXIT_HARNESS)

    entry_point = job.get("entry_point")
    referenced |= _referenced_names(tests_code)
    # Names the setup defines win over the program's (a program cannot redefine a reference helper), except
    # the entry point; builtins are never taken from the program (a program cannot redefine `abs` for the tests).
    wanted = sorted(name for name in referenced | ({entry_point} if entry_point else set())
                    if name == entry_point or (name not in namespace and not hasattr(builtins, name)
                                               and not (name.startswith("__") and name.endswith("__"))))
    channel = _Channel(rx, tx)
    try:
        loaded = channel.receive() == ["loaded"]
    except ProgramFailure:
        loaded = False
    if not loaded:
        _report("tropd sandbox: the program failed to load (its traceback is above)")
        exit_now(EXIT_LOAD_FAILED)
    try:
        found = channel.request(["names", wanted])
        if type(found) is not dict:
            raise ProgramFailure("malformed answer to the names request")
    except ProgramFailure:
        _report("tropd sandbox: the program's process did not list its names\n" + _traceback())
        exit_now(EXIT_LOAD_FAILED)
    callables = set()
    for name in wanted:
        entry = found.get(name)
        if entry == ["callable"]:
            namespace[name] = channel.proxy(name)
            callables.add(name)
        elif type(entry) is list and len(entry) == 2 and entry[0] == "value":
            namespace[name] = entry[1]
    if entry_point and entry_point not in callables:
        _report(f"tropd sandbox: entry point {entry_point!r} is not defined or not callable")
        exit_now(EXIT_NO_ENTRY_POINT)

    try:
        exec(tests_code, namespace)
        if job.get("call_check"):
            namespace["check"](namespace[entry_point])
    except BaseException:  # noqa: BLE001 - a failed assert, an exception of the program, ProgramFailure
        _report("tropd sandbox: a test failed\n" + _traceback())
        exit_now(EXIT_TEST_FAILED)
    try:
        sys.stdout.flush()
        os.write(verdict_fd, (job["nonce"] + " passed\n").encode())
    except BaseException:  # noqa: BLE001
        exit_now(EXIT_HARNESS)
    exit_now(EXIT_PASSED)


def main(argv: list) -> None:
    role, rx, tx = argv[1], int(argv[2]), int(argv[3])
    if role == "worker":
        worker_main(rx, tx)
    elif role == "judge":
        judge_main(rx, tx)
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv)
