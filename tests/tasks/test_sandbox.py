"""Sandbox containment: each hostile pattern fails its own run and harms nothing outside it."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from tropd.tasks.sandbox import Limits, SandboxResult, isolation, run_many, run_tests

CHECK_CALL = "def check(candidate):\n    candidate()\n"
FAST = Limits(timeout_s=2.0)


def run(program: str, tests: str = CHECK_CALL, limits: Limits = FAST) -> SandboxResult:
    return run_tests(program, tests, "f", limits=limits)


def leftover_processes(session: int, workdir: str | None = None) -> list[int]:
    """Host processes still in the run's session (the worker's pid is its session id), or, when the program
    printed its working directory, still in it (bubblewrap starts the program in a session of its own)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cwd = os.readlink(entry / "cwd") if workdir else ""
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        in_run = int(fields[3]) == session or bool(workdir and cwd.startswith(workdir))
        if in_run and fields[0] != "Z":
            alive.append(int(entry.name))
    return alive


def test_a_correct_program_passes_and_a_wrong_one_fails() -> None:
    good = run("def f():\n    return 41 + 1\n", "def check(candidate):\n    assert candidate() == 42\n")
    bad = run("def f():\n    return 41\n", "def check(candidate):\n    assert candidate() == 42\n")
    assert good.passed and good.status == "passed" and good.returncode == 0
    assert not bad.passed and bad.status == "failed" and "AssertionError" in bad.stderr


def test_plain_assert_tests_are_supported() -> None:
    assert run("def f(x):\n    return x * 2\n", "assert f(2) == 4\nassert f(0) == 0\n").passed
    assert not run("def f(x):\n    return x * 2\n", "assert f(2) == 5\n").passed


def test_program_output_is_returned_without_the_nonce() -> None:
    result = run("def f():\n    print('hello from f')\n")
    assert result.passed
    assert result.stdout.strip() == "hello from f"


def test_missing_entry_point_fails() -> None:
    result = run("def g():\n    return 1\n")
    assert not result.passed and result.returncode == 3


def test_infinite_loop_fails_within_the_time_limit() -> None:
    start = time.monotonic()
    result = run("def f():\n    while True:\n        pass\n", limits=Limits(timeout_s=1.0))
    assert not result.passed
    assert result.status in ("timeout", "failed")
    assert time.monotonic() - start < 4.0
    assert leftover_processes(result.pid) == []


def test_sleeping_program_is_killed_at_the_wall_clock_limit() -> None:
    result = run("import time\ndef f():\n    time.sleep(60)\n", limits=Limits(timeout_s=1.0))
    assert result.status == "timeout" and result.duration_s < 4.0


@pytest.mark.parametrize("program", [
    "import os\ndef f():\n    os._exit(0)\n",
    "import os\nos._exit(0)\ndef f():\n    pass\n",
    "import sys\ndef f():\n    sys.exit(0)\n",
    "import sys\nsys.exit(0)\ndef f():\n    pass\n",
    "def f():\n    raise SystemExit(0)\n",
    "raise SystemExit\ndef f():\n    pass\n",
    "def f():\n    exit()\n",
    # past the Python guard: a fresh, unpatched posix module exits for real, with status 0, before the tests end
    "import sys\ndel sys.modules['posix']\nimport posix\ndef f():\n    posix._exit(0)\n",
    "import sys, threading\ndel sys.modules['posix']\nimport posix\n"
    "def f():\n    threading.Thread(target=lambda: posix._exit(0)).start()\n    import time; time.sleep(5)\n",
])
def test_early_exit_with_status_zero_fails(program: str) -> None:
    result = run(program, "def check(candidate):\n    candidate()\n    assert False, 'unreachable'\n")
    assert not result.passed
    assert result.status in ("failed", "early_exit")


def test_fork_storm_fails_and_leaves_no_process() -> None:
    result = run("import os\nprint(os.getcwd(), flush=True)\ndef f():\n    while True:\n        os.fork()\n")
    assert not result.passed and "disabled" in result.stderr
    assert leftover_processes(result.pid, result.stdout.strip()) == []


def test_fork_storm_past_the_python_guard_is_bounded_by_the_os() -> None:
    if not isolation().nproc_enforced:
        pytest.skip("RLIMIT_NPROC cannot bind here (root without user namespaces or a privilege drop)")
    program = ("import sys\ndel sys.modules['posix']\nimport posix\nprint(posix.getcwd(), flush=True)\n"
               "def f():\n    while True:\n        posix.fork()\n")
    start = time.monotonic()
    result = run(program, limits=Limits(timeout_s=3.0, max_procs=8))
    assert not result.passed
    assert time.monotonic() - start < 8.0
    time.sleep(0.2)
    assert leftover_processes(result.pid, result.stdout.strip().splitlines()[0]) == []


def test_huge_allocation_fails() -> None:
    result = run("def f():\n    block = bytearray(10 * 1024 ** 3)\n    return len(block)\n")
    assert not result.passed and "MemoryError" in result.stderr


def test_output_flood_is_cut_off() -> None:
    result = run("def f():\n    while True:\n        print('x' * 4096)\n",
                 limits=Limits(timeout_s=5.0, max_output_bytes=1 << 20))
    assert not result.passed
    assert len(result.stdout) <= 16384


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    path = tmp_path / "host" / "canary.txt"
    path.parent.mkdir()
    path.write_text("precious")
    return path


@pytest.mark.parametrize("action", [
    "import shutil\n    shutil.rmtree({dir!r})",
    "import os\n    os.remove({file!r})",
    "import os\n    os.unlink({file!r})",
    "import os\n    os.rename({file!r}, {file!r} + '.moved')",
    "open({file!r}, 'w').write('overwritten')",
    "import pathlib\n    pathlib.Path({file!r}).unlink()",
    "import os\n    os.system('rm -rf ' + {dir!r})",
    "import subprocess\n    subprocess.run(['rm', '-rf', {dir!r}])",
])
def test_host_files_survive(canary: Path, action: str) -> None:
    body = action.format(dir=str(canary.parent), file=str(canary))
    result = run(f"def f():\n    {body}\n")
    assert not result.passed
    assert canary.read_text() == "precious"


def test_host_files_survive_a_program_past_the_python_guard(canary: Path) -> None:
    if isolation().drop_to is None:
        pytest.skip("no privilege drop here: only the Python-level guard protects host files")
    program = (f"import sys\ndel sys.modules['posix']\nimport posix\n"
               f"def f():\n    posix.unlink({str(canary)!r})\n")
    result = run(program)
    assert not result.passed
    assert canary.read_text() == "precious"


def test_writing_inside_the_sandbox_directory_is_allowed() -> None:
    program = ("def f():\n    with open('scratch.txt', 'w') as h:\n        h.write('ok')\n"
               "    return open('scratch.txt').read()\n")
    assert run(program, "def check(candidate):\n    assert candidate() == 'ok'\n").passed


def test_host_environment_is_not_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "tropd-secret-7f3a9c"
    monkeypatch.setenv("TROPD_TEST_SECRET", secret)
    program = (
        "import os\n"
        "def f():\n"
        "    print(dict(os.environ))\n"
        "    for pid in os.listdir('/proc'):\n"
        "        try:\n"
        "            print(open(f'/proc/{pid}/environ', 'rb').read())\n"
        "        except Exception as exc:\n"
        "            pass\n"
    )
    result = run(program)
    assert result.passed, result.stderr
    assert secret not in result.stdout and "TROPD_TEST_SECRET" not in result.stdout


@pytest.fixture
def listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()


def _accepted(server: socket.socket) -> bool:
    try:
        conn, _ = server.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


def test_network_connect_fails(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    program = f"import socket\ndef f():\n    socket.create_connection(('127.0.0.1', {port}), timeout=1).send(b'x')\n"
    result = run(program)
    assert not result.passed
    assert not _accepted(listener)


def test_network_connect_past_the_python_guard_fails(listener: socket.socket) -> None:
    if not isolation().network_namespace:
        pytest.skip("no network namespace here: only the Python-level guard blocks sockets")
    port = listener.getsockname()[1]
    program = ("import sys\nfor m in ('socket', '_socket'):\n    del sys.modules[m]\nimport _socket\n"
               f"def f():\n    s = _socket.socket(2, 1)\n    s.settimeout(1)\n    s.connect(('127.0.0.1', {port}))\n")
    result = run(program)
    assert not result.passed
    assert not _accepted(listener)


def test_runs_in_parallel_do_not_interfere() -> None:
    good = ("def f(x):\n    return x + 1\n", "def check(candidate):\n    assert candidate(1) == 2\n", "f")
    loop = ("def f(x):\n    while True:\n        pass\n", "def check(candidate):\n    candidate(1)\n", "f")
    hog = ("def f(x):\n    return bytearray(10 * 1024 ** 3)\n", "def check(candidate):\n    candidate(1)\n", "f")
    results = run_many([good, loop, good, hog, good], limits=Limits(timeout_s=1.5), max_workers=3)
    assert [r.passed for r in results] == [True, False, True, False, True]


def test_sandbox_directory_is_removed(tmp_path: Path) -> None:
    result = run("import os\ndef f():\n    print(os.getcwd())\n")
    assert result.passed
    workdir = result.stdout.strip()
    assert "tropd-sandbox-" in workdir and not os.path.exists(workdir)
