"""Hostile programs: none may earn a pass, and none may write a file outside its sandbox.

Each attack is a *wrong* program (or one that can only pass if the attack works): the tests expect a value it
does not compute. Every test asserts that the run did not pass and, for file attacks, that no file appeared.
Positive controls at the end check that honest programs still pass through the judge/worker split.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest

from tropd.tasks import grade, sandbox
from tropd.tasks.humaneval import load_humaneval, to_example
from tropd.tasks.sandbox import Isolation, Limits, SandboxResult, isolation, run_tests
from tropd.tasks.sandbox_child import MAX_MESSAGE_BYTES, WireError, dumps, loads, to_wire

FAST = Limits(timeout_s=3.0)
EXPECT_42 = "def check(candidate):\n    assert candidate() == 42\n"


def run(program: str, tests: str = EXPECT_42, entry_point: str | None = "f", **kwargs) -> SandboxResult:
    return run_tests(program, tests, entry_point, limits=FAST, **kwargs)


def assert_fails(result: SandboxResult) -> None:
    assert not result.passed, f"a hostile program passed:\n{result.stdout}\n{result.stderr}"
    assert result.status != "passed"


# ---------------------------------------------------------------------------------------------- the verdict

ALWAYS_EQUAL = """
class Anything:
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    def __hash__(self): return 42
    def __bool__(self): return True
    def __index__(self): return 42
    def __float__(self): return 42.0
"""


@pytest.mark.parametrize("program", [
    ALWAYS_EQUAL + "def f():\n    return Anything()\n",
    ALWAYS_EQUAL + "def f():\n    return [Anything()]\n",
    "class I(int):\n    def __eq__(self, o): return True\n    def __ne__(self, o): return False\n"
    "    __hash__ = int.__hash__\ndef f():\n    return I(0)\n",
    "class S(str):\n    def __eq__(self, o): return True\n    __hash__ = str.__hash__\ndef f():\n    return S('no')\n",
    "class L(list):\n    def __eq__(self, o): return True\ndef f():\n    return L()\n",
    "class F(float):\n    def __eq__(self, o): return True\n    __hash__ = float.__hash__\n"
    "def f():\n    return F('nan')\n",
    # a class whose __class__ lies about being an int
    ALWAYS_EQUAL + "class Liar(Anything):\n    __class__ = property(lambda self: int)\ndef f():\n    return Liar()\n",
])
def test_objects_that_equal_everything_do_not_pass(program: str) -> None:
    for tests in (EXPECT_42,
                  "def check(candidate):\n    assert not (candidate() != 42)\n",
                  "def check(candidate):\n    assert candidate() in {42}\n",
                  "def check(candidate):\n    assert [candidate()] == [42]\n"):
        assert_fails(run(program, tests))


FRAME_WALKER = """
import sys, os, gc
def attack():
    tokens = []
    frame = sys._getframe(0)
    while frame is not None:  # every frame up the stack: harness locals and globals
        for scope in (frame.f_locals, frame.f_globals):
            for key, value in list(scope.items()):
                if isinstance(value, bytes) and len(value.strip()) == 32:
                    tokens.append(value.strip().decode())
                if isinstance(value, str) and len(value) == 32:
                    tokens.append(value)
                if isinstance(value, dict) and isinstance(value.get('nonce'), str):
                    tokens.append(value['nonce'])
        frame = frame.f_back
    for obj in gc.get_objects():  # every live dict: the harness's job, with its tests
        if isinstance(obj, dict) and 'tests' in obj:
            if isinstance(obj.get('nonce'), str):
                tokens.append(obj['nonce'])
            obj['tests'] = 'pass'
            obj['call_check'] = False
    for token in tokens:
        line = (token + ' passed' + chr(10) + token + chr(10)).encode()
        for fd in range(1, 64):
            try:
                os.write(fd, line)
            except OSError:
                pass
    frame = sys._getframe(0)
    while frame is not None:  # the harness's own exit, with status 0
        if callable(frame.f_locals.get('exit_now')):
            frame.f_locals['exit_now'](0)
        frame = frame.f_back
"""


@pytest.mark.parametrize("when", ["at import", "inside the call"])
def test_frame_walking_and_gc_scanning_cannot_forge_a_pass(when: str) -> None:
    if when == "at import":
        program = FRAME_WALKER + "attack()\ndef f():\n    return 0\n"
    else:
        program = FRAME_WALKER + "def f():\n    attack()\n    return 0\n"
    assert_fails(run(program))


def test_referrers_of_the_namespace_cannot_replace_the_tests() -> None:
    program = ("import gc, sys, types\n"
               "frames = [sys._getframe(i) for i in range(3)]  # materialize the callers' frame objects\n"
               "for holder in gc.get_referrers(sys._getframe(0).f_globals):\n"
               "    scope = holder.f_locals if isinstance(holder, types.FrameType) else holder\n"
               "    for value in list(scope.values()) if isinstance(scope, dict) else []:\n"
               "        if isinstance(value, dict) and 'tests' in value:\n"
               "            value['tests'] = 'pass'\n"
               "            value['call_check'] = False\n"
               "def f():\n    return 0\n")
    assert_fails(run(program))


def test_the_program_never_sees_the_tests_or_their_expected_values() -> None:
    program = ("import gc\n"
               "seen = [v for o in gc.get_objects() if isinstance(o, dict) for v in list(o.values())\n"
               "        if isinstance(v, str) and 'expected-' + '7f3a' in v]\n"
               "def f():\n    print('seen', seen)\n    return 0\n")
    result = run(program, "def check(candidate):\n    assert candidate() == 'expected-7f3a'\n")
    assert_fails(result)
    assert "expected-7f3a" not in result.stdout


@pytest.mark.parametrize("program,tests", [
    ("import builtins\nbuiltins.abs = lambda x: 0\ndef f():\n    return 1.0\n",
     "def check(candidate):\n    assert abs(candidate() - 3.5) < 1e-9\n"),
    ("abs = lambda x: 0\ndef f():\n    return 1.0\n",  # a module-level shadow of a builtin the tests use
     "def check(candidate):\n    assert abs(candidate() - 3.5) < 1e-9\n"),
    ("def sorted(x, **kw):\n    return [1, 2, 3]\ndef f():\n    return [3, 3]\n",
     "def check(candidate):\n    assert sorted(candidate()) == [1, 2, 3]\n"),
    ("import builtins\nbuiltins.isinstance = lambda *a: True\nbuiltins.len = lambda x: 3\n"
     "def f():\n    return 'x'\n",
     "def check(candidate):\n    r = candidate()\n    assert isinstance(r, list) and len(r) == 3\n"),
    ("import builtins\nclass Never(Exception): pass\nbuiltins.AssertionError = Never\n"
     "__builtins__.AssertionError = Never\ndef f():\n    return 0\n", EXPECT_42),
    ("import builtins\nbuiltins.__dict__.clear()\ndef f():\n    return 0\n", EXPECT_42),
])
def test_builtins_changed_by_the_program_are_not_the_tests_builtins(program: str, tests: str) -> None:
    assert_fails(run(program, tests))


@pytest.mark.parametrize("program,tests", [
    ("import math\nmath.isclose = lambda *a, **k: True\nmath.isnan = lambda x: True\ndef f():\n    return 1.0\n",
     "import math\ndef check(candidate):\n    assert math.isclose(candidate(), 3.5)\n"),
    ("import operator\noperator.eq = lambda a, b: True\ndef f():\n    return 0\n",
     "import operator\ndef check(candidate):\n    assert operator.eq(candidate(), 42)\n"),
    ("import math, sys\nsys.modules['math'] = type(sys)('math')\nsys.modules['math'].isclose = lambda *a, **k: True\n"
     "def f():\n    return 1.0\n",
     "def check(candidate):\n    import math\n    assert math.isclose(candidate(), 3.5)\n"),
])
def test_modules_patched_by_the_program_are_not_the_tests_modules(program: str, tests: str) -> None:
    assert_fails(run(program, tests))


def test_a_program_cannot_redefine_a_reference_helper() -> None:
    """HumanEval/38: the tests call the prompt's encode_cyclic; an identity encode + decode must not pass."""
    record = load_humaneval()[38]
    assert record["entry_point"] == "decode_cyclic"
    completion = ("```python\ndef encode_cyclic(s: str):\n    return s\n\n"
                  "def decode_cyclic(s: str):\n    return s\n```")
    assert grade("code", completion, to_example(record).reference) == 0.0
    honest = f"```python\n{record['prompt']}{record['canonical_solution']}```"
    assert grade("code", honest, to_example(record).reference) == 1.0


@pytest.mark.parametrize("program", [
    "import sys\nsys.exit(0)\ndef f():\n    return 42\n",
    "import os\nos._exit(0)\ndef f():\n    return 42\n",
    "import sys\ndef f():\n    sys.exit(0)\n",
    "def f():\n    raise SystemExit(0)\n",
    "def f():\n    raise KeyboardInterrupt\n",
    "import os\ndef f():\n    os._exit(0)\n",  # the guard turns it into SandboxViolation, an exception
    "import sys\ndel sys.modules['posix']\nimport posix\ndef f():\n    posix._exit(0)\n",
    "import sys\ndel sys.modules['posix']\nimport posix\nposix._exit(0)\ndef f():\n    return 42\n",
])
def test_exiting_early_fails(program: str) -> None:
    assert_fails(run(program))
    if "os._exit" not in program:
        # a test that accepts any Exception from the program must not accept an exit
        lenient = "def check(candidate):\n    try:\n        candidate()\n    except Exception:\n        pass\n"
        assert_fails(run(program, lenient))


FAKE_VERDICTS = """
import os, sys, json
def attack():
    print('passed')
    sys.stdout.flush()
    for line in (b'passed\\n', b'0' * 32 + b' passed\\n'):
        for fd in range(0, 64):
            try:
                os.write(fd, line)
            except OSError:
                pass
    frame = json.dumps(['ok', 42]).encode()
    for fd in range(3, 64):
        try:
            os.write(fd, len(frame).to_bytes(8, 'big') + frame)
        except OSError:
            pass
"""


@pytest.mark.parametrize("when", ["at import", "inside the call"])
def test_writing_pass_tokens_and_fake_replies_to_guessed_fds_fails(when: str) -> None:
    program = FAKE_VERDICTS + ("attack()\ndef f():\n    return 0\n" if when == "at import"
                               else "def f():\n    attack()\n    return 0\n")
    assert_fails(run(program))


@pytest.mark.parametrize("patch", [
    # the worker's own encoder replaced: whatever it sends, the judge accepts only the wire format
    "m.dumps = lambda v: b'{\"__class__\": \"Anything\"}'",
    "m.dumps = lambda v: b'{\"tuple\": [1], \"extra\": 2}'",
    "m.dumps = lambda v: b'[\"ok\", {\"dict\": [[[1], 2]]}]'",
    "m.dumps = lambda v: b'[\"raised\", \"SystemExit\", \"SystemExit\", []]'",
    "m.dumps = lambda v: b'[\"raised\", \"StopIteration\", \"StopIteration\", []]'",
    "m.send = lambda fd, p: m.os.write(fd, (1 << 40).to_bytes(8, 'big'))",
])
def test_forged_worker_messages_are_rejected(patch: str) -> None:
    program = f"import sys\nm = sys.modules['__main__']\n{patch}\ndef f():\n    return 0\n"
    tests = ("def check(candidate):\n    try:\n        r = candidate()\n    except Exception:\n        r = None\n"
             "    for x in [1, 2]:\n        pass\n    assert r == 42\n")
    assert_fails(run(program, tests))


def test_the_judge_is_out_of_reach() -> None:
    """Signal every process it can see, and write a verdict into every fd of every process (past the guard)."""
    program = ("import sys\ndel sys.modules['posix']\nimport posix\n"
               "def f():\n"
               "    for pid in posix.listdir('/proc'):\n"
               "        if not pid.isdigit() or int(pid) == posix.getpid():\n"
               "            continue\n"
               "        try:\n"
               "            fds = posix.listdir(f'/proc/{pid}/fd')\n"
               "        except OSError:\n"
               "            fds = []\n"
               "        for fd in fds:\n"
               "            try:\n"
               "                w = posix.open(f'/proc/{pid}/fd/{fd}', posix.O_WRONLY)\n"
               "                posix.write(w, b'passed\\n')\n"
               "            except OSError:\n"
               "                pass\n"
               "        try:\n"
               "            posix.kill(int(pid), 9)\n"
               "        except OSError:\n"
               "            pass\n"
               "    return 0\n")
    assert_fails(run(program))
    assert isolation().judge_protected


# ---------------------------------------------------------------------------------------------- files

@pytest.fixture
def world_writable():
    """A world-writable folder in /tmp, where only OS-level filesystem isolation can stop a write."""
    folder = tempfile.mkdtemp(prefix="tropd-hostile-", dir="/tmp")
    os.chmod(folder, 0o1777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


WRITE_ATTACKS = {
    "open": "open({path!r}, 'w').write('x')",
    "_io.open": "import _io\n    _io.open({path!r}, 'w').write('x')",
    "io.FileIO": "import io\n    io.FileIO({path!r}, 'w').write(b'x')",
    "fresh posix": ("import sys\n    sys.modules.pop('posix', None)\n    import posix\n"
                    "    posix.write(posix.open({path!r}, posix.O_WRONLY | posix.O_CREAT, 0o666), b'x')"),
    "os.open dir_fd": ("import os, sys\n    sys.modules.pop('posix', None)\n    import posix\n"
                       "    d = posix.open({folder!r}, posix.O_RDONLY)\n"
                       "    posix.write(posix.open({name!r}, posix.O_WRONLY | posix.O_CREAT, 0o666, dir_fd=d), b'x')"),
    "symlink": ("import sys\n    sys.modules.pop('posix', None)\n    import posix\n"
                "    posix.symlink({path!r}, 'link')\n"
                "    posix.write(posix.open('link', posix.O_WRONLY | posix.O_CREAT, 0o666), b'x')"),
    "mkdir": "import sys\n    sys.modules.pop('posix', None)\n    import posix\n    posix.mkdir({path!r})",
    "ctypes": ("import sys\n    for m in ('ctypes', '_ctypes'):\n        sys.modules.pop(m, None)\n"
               "    import ctypes\n    libc = ctypes.CDLL(None)\n"
               "    fd = libc.open({path!r}.encode(), 0o101, 0o666)\n"
               "    assert fd >= 0 and libc.write(fd, b'x', 1) == 1"),
}


def _targets(world_writable: str) -> dict[str, str]:
    return {"world-writable /tmp folder": world_writable, "parent's cwd": os.getcwd(),
            "home": os.path.expanduser("~")}


@pytest.mark.parametrize("target", ["world-writable /tmp folder", "parent's cwd", "home"])
@pytest.mark.parametrize("attack", sorted(WRITE_ATTACKS))
def test_no_write_outside_the_sandbox(attack: str, target: str, world_writable: str) -> None:
    if target == "world-writable /tmp folder" and not isolation().filesystem_readonly:
        pytest.skip("no OS-level filesystem isolation here (see the WARNING): only the Python guard")
    folder = _targets(world_writable)[target]
    name = f"tropd-escape-{secrets.token_hex(4)}"
    path = os.path.join(folder, name)
    body = WRITE_ATTACKS[attack].format(path=path, folder=folder, name=name)
    result = run(f"def f():\n    {body}\n    return 'written'\n",
                 "def check(candidate):\n    assert candidate() == 'written'\n")
    try:
        assert_fails(result)
        assert not os.path.lexists(path), f"{attack} wrote {path}"
    finally:
        if os.path.isdir(path) and not os.path.islink(path):
            os.rmdir(path)
        elif os.path.lexists(path):
            os.unlink(path)


def test_a_private_file_of_the_host_cannot_be_read(tmp_path: Path) -> None:
    secret = secrets.token_hex(16)
    path = tmp_path / "secret.txt"
    path.write_text(secret)
    path.chmod(0o600)
    for read in (f"open({str(path)!r}).read()",
                 f"__import__('_io').open({str(path)!r}).read()"):
        program = f"def f():\n    data = {read}\n    print(data)\n    return data\n"
        result = run(program, f"def check(candidate):\n    assert candidate() == {secret!r}\n")
        assert_fails(result)
        assert secret not in result.stdout and secret not in result.stderr


# ---------------------------------------------------------------------------------------------- fallbacks

def test_without_filesystem_isolation_a_warning_is_logged_and_flagged(monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(sandbox, "_isolation_cache", None)
    monkeypatch.setattr(sandbox, "_candidates", lambda: [Isolation()])
    with caplog.at_level(logging.WARNING, logger="tropd.tasks.sandbox"):
        chosen = isolation()
    assert not chosen.filesystem_readonly
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("NO OS-level filesystem isolation" in m and "apt-get install -y bubblewrap" in m for m in messages)


def test_bubblewrap_is_used_when_installed() -> None:
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed here")
    chosen = isolation()
    assert chosen.filesystem == "bubblewrap" and chosen.filesystem_readonly
    assert chosen.pid_namespace and chosen.network_namespace and chosen.judge_protected


def test_landlock_fallback_blocks_writes_outside(world_writable: str) -> None:
    if sandbox._landlock_abi() == 0:
        pytest.skip("no Landlock in this kernel")
    landlocked = next((c for c in sandbox._candidates() if c.filesystem == "landlock"
                       and sandbox._probe(c).passed), None)
    assert landlocked is not None, "Landlock is available but no Landlock set-up passed its probe"
    assert landlocked.judge_protected
    for attack in ("fresh posix", "ctypes", "mkdir"):
        path = os.path.join(world_writable, f"escape-{attack.replace(' ', '-')}")
        body = WRITE_ATTACKS[attack].format(path=path, folder=world_writable, name="x")
        result = sandbox._run(f"def f():\n    {body}\n    return 'written'\n",
                              "def check(candidate):\n    assert candidate() == 'written'\n",
                              None, "f", True, FAST, landlocked)
        assert_fails(result)
        assert not os.path.lexists(path)
    honest = sandbox._run("def f():\n    open('scratch', 'w').write('ok')\n    return open('scratch').read()\n",
                          "def check(candidate):\n    assert candidate() == 'ok'\n", None, "f", True, FAST, landlocked)
    assert honest.passed, honest.stderr


# ---------------------------------------------------------------------------------------------- positive controls

@pytest.mark.parametrize("program,tests", [
    ("def f():\n    return 42\n", EXPECT_42),
    ("from collections import namedtuple\nP = namedtuple('P', 'a b')\ndef f():\n    return P(1, 2)\n",
     "def check(candidate):\n    assert candidate() == (1, 2) and type(candidate()) is tuple\n"),
    ("def f():\n    return float('nan')\n",
     "import math\ndef check(candidate):\n    assert math.isnan(candidate())\n"),
    ("def f():\n    return [float('inf'), -float('inf'), -0.0, 0.1 + 0.2, 10 ** 5000, 3 + 4j]\n",
     "import math\ndef check(candidate):\n    r = candidate()\n"
     "    assert r[:2] == [math.inf, -math.inf] and math.copysign(1, r[2]) == -1\n"
     "    assert r[3] == 0.1 + 0.2 and r[4] == 10 ** 5000 and r[5] == 3 + 4j\n"),
    ("def f():\n    return {(1, 'a'): {1, 2}, 'k': frozenset([3]), b'\\x00\\xff': [None, True, 'é\\ud800']}\n",
     "def check(candidate):\n"
     "    assert candidate() == {(1, 'a'): {1, 2}, 'k': frozenset([3]), b'\\x00\\xff': [None, True, 'é\\ud800']}\n"),
    ("from enum import IntEnum\nclass C(IntEnum):\n    A = 42\ndef f():\n    return C.A\n", EXPECT_42),
    ("from collections import Counter, OrderedDict\ndef f():\n    return Counter('aab'), OrderedDict(b=1)\n",
     "def check(candidate):\n    assert candidate() == ({'a': 2, 'b': 1}, {'b': 1})\n"),
    ("def f(x, *, scale=1):\n    if x < 0:\n        raise ValueError('negative')\n    return x * scale\n",
     "def check(candidate):\n    assert candidate(2, scale=3) == 6\n    try:\n        candidate(-1)\n"
     "        assert False\n    except ValueError as e:\n        assert str(e) == 'negative'\n"),
    ("class Bad(ValueError):\n    pass\ndef f(x):\n    raise Bad('custom')\n",
     "def check(candidate):\n    try:\n        candidate(1)\n    except ValueError as e:\n"
     "        assert str(e) == 'custom'\n    else:\n        assert False\n"),
    ("def f(d):\n    return d['missing']\n",
     "def check(candidate):\n    try:\n        candidate({})\n    except KeyError as e:\n"
     "        assert e.args == ('missing',)\n    else:\n        assert False\n"),
    ("def f(s):\n    return s.encode('ascii')\n",  # UnicodeEncodeError needs 5 arguments
     "def check(candidate):\n    try:\n        candidate('é')\n    except UnicodeError:\n        pass\n"
     "    else:\n        assert False\n"),
])
def test_honest_programs_pass(program: str, tests: str) -> None:
    result = run(program, tests)
    assert result.passed, result.stderr


def test_arguments_are_copies() -> None:
    """Documented limit: the program gets a copy of each argument; mutating it in place is not seen."""
    program = "def f(xs):\n    xs.append(1)\n    return len(xs)\n"
    tests = "def check(candidate):\n    xs = []\n    assert candidate(xs) == 1 and candidate(xs) == 1 and xs == []\n"
    assert run(program, tests).passed


def test_plain_asserts_see_the_programs_helpers_and_constants() -> None:
    program = "LIMIT = 10\ndef helper(x):\n    return x * 2\ndef f(x):\n    return min(helper(x), LIMIT)\n"
    tests = "assert helper(2) == 4\nassert LIMIT == 10\nassert f(9) == 10\n"
    assert run(program, tests).passed
    assert run_tests("def add(a, b):\n    return a + b\n", "assert add(1, 2) == 3\n", limits=FAST).passed


def test_setup_helpers_and_imports_serve_the_tests() -> None:
    setup = "import math\n\ndef double(x):\n    return 2 * x\n\ndef f(x):\n    \"\"\"Stub.\"\"\"\n"
    program = setup + "    return double(x) + math.floor(0.5)\n"
    tests = "def check(candidate):\n    assert candidate(3) == double(3) == 6 and math.pi > 3\n"
    assert run(program, tests, setup=setup).passed


def test_a_non_plain_return_value_fails_clearly() -> None:
    result = run("def f():\n    return (i for i in range(3))\n",
                 "def check(candidate):\n    try:\n        candidate()\n    except Exception:\n        pass\n")
    assert_fails(result)
    assert "not plain data" in result.stderr


# ---------------------------------------------------------------------------------------------- wire format

def test_wire_round_trip_gives_exact_builtin_types() -> None:
    value = [None, True, 1, 2.5, math.inf, 1j, "s", b"b", [1], (1,), {1: (2,)}, {3}, frozenset({4}), 10 ** 400]
    back = loads(dumps(value))
    assert back == value
    assert [type(x) for x in back] == [type(x) for x in value]
    assert math.isnan(loads(dumps(float("nan"))))


@pytest.mark.parametrize("payload", [
    b'{"object": 1}', b'{"tuple": [1], "set": [2]}', b'{"dict": [[1, 2, 3]]}', b'{"dict": [[[1], 2]]}',
    b'{"set": [[1]]}', b'{"bytes": 12}', b'{"bytes": "zz"}', b'{"complex": ["1", 2]}', b"\xff",
    b"[" * 100000 + b"]" * 100000, b"{}",
])
def test_wire_rejects_anything_else(payload: bytes) -> None:
    with pytest.raises(WireError):
        loads(payload)


def test_to_wire_rejects_objects_and_flattens_subclasses() -> None:
    class Mine:
        pass

    class MyInt(int):
        def __eq__(self, other):
            return True

        __hash__ = int.__hash__

    with pytest.raises(TypeError):
        to_wire(Mine())
    with pytest.raises(TypeError):
        to_wire([1, {2: range(3)}])
    assert type(to_wire(MyInt(3))) is int and to_wire(MyInt(3)) == 3
    assert MAX_MESSAGE_BYTES >= 1 << 20
