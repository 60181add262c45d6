"""Per-sandbox control groups: one cgroup per run holds the worker and everything it starts, so ``memory_mb``
(``memory.max`` / ``memory.limit_in_bytes``) and ``max_procs`` (``pids.max``) bound the sandbox as a whole.

Where a run's cgroup goes (found from ``/proc/self/cgroup`` and ``/proc/self/mountinfo``, probed once):

* cgroup v2: a sibling of this process's cgroup (v2 forbids processes in a cgroup whose children have
  controllers, so not a child), when the parent's ``cgroup.subtree_control`` enables ``memory`` and ``pids``
  and this user may create folders there: root, or a delegated subtree (``systemd-run --user --scope -p
  Delegate=yes``); the root cgroup itself when this process lives there;
* cgroup v1: a child of this process's cgroup in the ``memory`` and in the ``pids`` hierarchy (v1 allows
  processes beside child cgroups), when this user may create folders there (root, outside a read-only
  container mount).

The worker is moved in before it runs anything: its command starts with ``/bin/sh -c`` writing its own pid into
each ``cgroup.procs`` and then ``exec``-ing the real command (Python's ``subprocess`` has no ``CLONE_INTO_CGROUP``
and ``preexec_fn`` is unsafe with the grader's threads).
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

_CONTROLLERS = ("memory", "pids")
_counter = itertools.count()
_counter_lock = threading.Lock()

# Writes the shell's pid into each cgroup.procs given before `--`, then becomes the command after it.
ENTER_SCRIPT = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'


@dataclass(frozen=True)
class CgroupPlan:
    """Where per-run cgroups are made. ``version``: 1 or 2; ``parents``: controller -> the folder under which a
    run's cgroup is created (v2: the same folder for both controllers)."""

    version: int
    parents: tuple[tuple[str, str], ...]

    @property
    def controllers(self) -> frozenset[str]:
        return frozenset(c for c, _ in self.parents)

    def describe(self) -> str:
        folders = sorted({p for _, p in self.parents})
        return f"cgroup v{self.version} under {', '.join(folders)}"


@dataclass
class RunCgroup:
    """The cgroup folders of one run (one per hierarchy; one in all for v2)."""

    plan: CgroupPlan
    folders: list[str]

    def procs_files(self) -> list[str]:
        return [os.path.join(f, "cgroup.procs") for f in self.folders]

    def wrap(self, command: list[str]) -> list[str]:
        """``command`` started inside this cgroup."""
        return ["/bin/sh", "-c", ENTER_SCRIPT, "sh", *self.procs_files(), "--", *command]

    def pids(self) -> set[int]:
        found: set[int] = set()
        for path in self.procs_files():
            try:
                found.update(int(line) for line in Path(path).read_text().split())
            except (OSError, ValueError):
                pass
        return found

    def destroy(self, settle_s: float = 2.0) -> None:
        """SIGKILL everything in the cgroup (``cgroup.kill`` where the kernel has it) and remove it (bounded)."""
        for folder in self.folders:
            try:
                Path(folder, "cgroup.kill").write_text("1")
            except OSError:
                pass
        deadline = time.monotonic() + settle_s
        while True:
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            left = []
            for folder in self.folders:
                try:
                    os.rmdir(folder)
                except FileNotFoundError:
                    pass
                except OSError:
                    left.append(folder)
            self.folders = left
            if not left or time.monotonic() > deadline:
                return
            time.sleep(0.01)


def _write(path: str, value: str, required: bool = True) -> None:
    try:
        Path(path).write_text(value)
    except OSError:
        if required:
            raise


def create(plan: CgroupPlan, memory_bytes: int | None, max_pids: int | None) -> RunCgroup:
    """Make one run's cgroup(s) with these limits (``None``: leave that limit off). Raises ``OSError``."""
    with _counter_lock:
        name = f"tropd-sandbox-{os.getpid()}-{next(_counter)}"
    run = RunCgroup(plan, [])
    try:
        for parent in sorted({p for _, p in plan.parents}):
            folder = os.path.join(parent, name)
            os.mkdir(folder)
            run.folders.append(folder)
            controllers = {c for c, p in plan.parents if p == parent}
            if "memory" in controllers and memory_bytes is not None:
                if plan.version == 2:
                    _write(os.path.join(folder, "memory.max"), str(memory_bytes))
                    _write(os.path.join(folder, "memory.swap.max"), "0", required=False)
                else:
                    _write(os.path.join(folder, "memory.limit_in_bytes"), str(memory_bytes))
                    _write(os.path.join(folder, "memory.memsw.limit_in_bytes"), str(memory_bytes), required=False)
            if "pids" in controllers and max_pids is not None:
                _write(os.path.join(folder, "pids.max"), str(max_pids))
    except OSError:
        run.destroy(settle_s=0.2)
        raise
    return run


def _own_cgroups() -> dict[str, str]:
    """``/proc/self/cgroup`` as {controller (or "" for v2): path}."""
    out: dict[str, str] = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            out[controller] = path
    return out


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """cgroup mounts as (fs type, mount point, root inside the hierarchy, super options)."""
    found = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        found.append((tail[0], fields[4], fields[3], set(tail[2].split(","))))
    return found


def _inside(mount_point: str, mount_root: str, path: str) -> str | None:
    """The folder of cgroup ``path`` under a mount of the hierarchy's ``mount_root``, if the mount shows it."""
    if mount_root != "/" and not (path == mount_root or path.startswith(mount_root.rstrip("/") + "/")):
        return None
    rel = path[len(mount_root):] if mount_root != "/" else path
    return os.path.normpath(mount_point + "/" + rel.lstrip("/"))


def candidate_plans() -> list[CgroupPlan]:
    """Where per-run cgroups could go here, strongest first (probe with :func:`probe`)."""
    own, plans = _own_cgroups(), []
    for fstype, point, root, _ in _mounts():
        if fstype != "cgroup2" or "" not in own:
            continue
        folder = _inside(point, root, own[""])
        if folder is None:
            continue
        try:
            available = set(Path(point, "cgroup.controllers").read_text().split())
        except OSError:
            continue
        if not set(_CONTROLLERS) <= available:
            continue
        parents = [folder] if own[""] == "/" else [os.path.dirname(folder)]
        for parent in parents:
            try:
                enabled = set(Path(parent, "cgroup.subtree_control").read_text().split())
            except OSError:
                continue
            usable = tuple(c for c in _CONTROLLERS if c in enabled)
            if usable:
                plans.append(CgroupPlan(2, tuple((c, parent) for c in usable)))
    v1 = []
    for fstype, point, root, options in _mounts():
        if fstype != "cgroup":
            continue
        for controller in _CONTROLLERS:
            if controller in options and controller in own:
                folder = _inside(point, root, own[controller])
                if folder is not None and os.path.isdir(folder):
                    v1.append((controller, folder))
    if v1:
        plans.append(CgroupPlan(1, tuple(sorted(dict(v1).items()))))
    return plans


def probe(plan: CgroupPlan) -> str | None:
    """``None`` when a process can be started inside a fresh cgroup of ``plan`` with both limits set, else why
    not (one line)."""
    try:
        run = create(plan, 64 * 1024 * 1024, 8)
    except OSError as exc:
        return f"cannot create a cgroup ({plan.describe()}): {exc.strerror or exc}"
    try:
        done = subprocess.run(run.wrap(["/bin/sh", "-c", "exit 0"]), capture_output=True, timeout=10)
        if done.returncode != 0:
            return (f"cannot move a process into a cgroup ({plan.describe()}): "
                    f"{done.stderr.decode(errors='replace').strip()[-200:]}")
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot start a process in a cgroup ({plan.describe()}): {exc}"
    finally:
        run.destroy(settle_s=0.5)


def find_plan() -> tuple[CgroupPlan | None, str]:
    """The first plan that passes its probe, or ``None`` and why none did (one line)."""
    plans, reasons = candidate_plans(), []
    for plan in plans:
        why = probe(plan)
        if why is None:
            return plan, ""
        reasons.append(why)
    if not plans:
        return None, ("no cgroup hierarchy with the memory and pids controllers is writable from this process "
                      "(cgroup v2: the parent of this process's cgroup must enable them and be writable)")
    return None, "; ".join(reasons)
