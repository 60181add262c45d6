"""The code sandbox's limits hold per sandbox, not per process (issue 22 §5).

A graded program that starts several processes past the Python-level guard (a fresh ``posix`` import) must not
use more than ``memory_mb`` in all, nor write more than ``max_disk_mb`` anywhere, nor make a correct program
graded beside it fail by exhausting a process budget they share. Where this machine cannot enforce a limit per
sandbox, the test asserts the loud fallback warning instead of skipping silently.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tropd.tasks import sandbox
from tropd.tasks.sandbox import Limits, isolation, limit_warnings, run_tests

FRESH_POSIX = "import sys\ndel sys.modules['posix']\nimport posix\n"


def _warned(fragment: str) -> bool:
    return any(fragment in line for line in limit_warnings(isolation()))


# ---------------------------------------------------------------------------------------------- memory

# `count` processes each try to hold `each` MiB (touched, so resident); each reports through a pipe once it holds
# its block. `f()` returns how many made it. Per process each fits in memory_mb; together they do not.
MANY_PROCESSES = FRESH_POSIX + """import time
r, w = posix.pipe()
for _ in range({count}):
    if posix.fork() == 0:
        try:
            block = bytearray({each} * 1024 * 1024)
            for i in range(0, len(block), 4096):
                block[i] = 1
            posix.write(w, b"x")
        except MemoryError:
            pass
        time.sleep(30)
posix.close(w)
posix.set_blocking(r, False)
held = b""
deadline = time.monotonic() + 3
while len(held) < {count} and time.monotonic() < deadline:
    try:
        held += posix.read(r, {count})
    except BlockingIOError:
        time.sleep(0.02)
def f():
    return len(held)
"""


def test_total_memory_of_a_multi_process_program_is_bounded_per_sandbox() -> None:
    if not isolation().memory_per_sandbox:
        assert _warned("memory_mb is per process"), limit_warnings(isolation())
        pytest.skip("no writable cgroup here: memory_mb is per process (the fallback warning is asserted)")
    limits = Limits(timeout_s=8.0, memory_mb=256)
    # The control: one process holding 150 MiB fits.
    one = run_tests(MANY_PROCESSES.format(count=1, each=150), "assert f() == 1\n", "f", limits=limits)
    assert one.passed, one.stderr[-2000:]
    # Four of them (600 MiB) do not: the kernel kills processes of this sandbox alone.
    four = run_tests(MANY_PROCESSES.format(count=4, each=150), "assert f() == 4\n", "f", limits=limits)
    assert not four.passed


# ---------------------------------------------------------------------------------------------- temporary folder

FILL_FOLDER = FRESH_POSIX + """import time
written = 0
try:
    for n in range(64):
        fd = posix.open(f"chunk{n}", posix.O_WRONLY | posix.O_CREAT, 0o600)
        try:
            for _ in range(16):
                written += posix.write(fd, b"x" * 65536)
        finally:
            posix.close(fd)
except OSError:
    pass
where = posix.getcwd()
time.sleep(1.0)
def f():
    return written
"""


def test_temporary_writes_are_confined_and_size_limited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """64 files of 1 MiB (each under the file-size limit) into a folder of 8 MiB: the writes stop at 8 MiB, and
    nothing lands in the host's temporary folder."""
    if not isolation().private_tmp:
        assert _warned("temporary folder is not size-limited"), limit_warnings(isolation())
        pytest.skip("no bubblewrap with tmpfs sizes here: the temporary folder is on the host (warning asserted)")
    monkeypatch.setattr(sandbox.tempfile, "tempdir", str(tmp_path))
    seen: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.append(sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = run_tests(FILL_FOLDER, "assert 4 * 2**20 <= f() <= 8 * 2**20, f()\n", "f",
                           limits=Limits(timeout_s=8.0, max_disk_mb=8))
    finally:
        done.set()
        watcher.join()
    assert result.passed, result.stderr[-2000:]
    assert max(seen, default=0) < 2**20, f"the program's files reached the host's temp folder: {max(seen)} bytes"


# ---------------------------------------------------------------------------------------------- processes

FORK_BOMB = FRESH_POSIX + """import time
while True:
    try:
        if posix.fork() == 0:
            while True:
                time.sleep(1)
    except OSError:
        time.sleep(0.01)
"""

# A correct program that needs a new task (a thread) to answer.
NEEDS_A_THREAD = """import threading
def f(x):
    out = []
    t = threading.Thread(target=lambda: out.append(x + 1))
    t.start()
    t.join()
    return out[0]
"""


def test_a_fork_bomb_does_not_fail_a_correct_program_graded_beside_it() -> None:
    if not isolation().procs_per_sandbox:
        assert _warned("process limit is"), limit_warnings(isolation())
        pytest.skip("no per-sandbox process limit here (the fallback warning is asserted)")
    limits = Limits(timeout_s=4.0, max_procs=8)
    bomb: list = []
    thread = threading.Thread(target=lambda: bomb.append(run_tests(FORK_BOMB, "assert f() == 1\n", "f",
                                                                   limits=limits)))
    thread.start()
    try:
        time.sleep(1.0)  # the bomb has used up its process budget by now
        results = [run_tests(NEEDS_A_THREAD, "assert f(1) == 2\n", "f", limits=Limits(timeout_s=4.0, max_procs=8))
                   for _ in range(2)]
    finally:
        thread.join()
    assert not bomb[0].passed
    for result in results:
        assert result.passed, result.stderr[-2000:]


def test_fallbacks_are_announced_in_one_line_each() -> None:
    """Every limit that does not hold per sandbox here has a one-line WARNING naming it and the fix."""
    iso = isolation()
    lines = limit_warnings(iso)
    assert all("\n" not in line and line.startswith("tropd sandbox:") for line in lines)
    assert _warned("memory_mb is per process") == (not iso.memory_per_sandbox)
    assert _warned("temporary folder is not size-limited") == (not iso.private_tmp)
    assert _warned("process limit is") == (not iso.procs_per_sandbox)
    weak = sandbox.Isolation()  # nothing: every fallback is announced
    assert len(limit_warnings(weak)) >= 3


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="max_disk_mb"):
        Limits(max_disk_mb=0)
