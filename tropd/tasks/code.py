"""Code grader: take the program out of a completion, run it against hidden tests in the sandbox.

Reference keys:
    ``tests`` (str, required): HumanEval style ``def check(candidate): ...`` (called with the entry point),
        and/or plain top-level ``assert`` statements that call the entry point by name.
    ``entry_point`` (str, required): the function the program must define.
    ``setup`` (str, optional): code placed before the program (imports, helpers; for HumanEval, the prompt).
        A completion that does not define the entry point itself is treated as the continuation of ``setup``
        (HumanEval's native format: the completion is the function body). The judge also runs ``setup`` (when
        it compiles on its own) before the tests, so the tests use the reference's helpers, not the program's.
    ``timeout_s`` (float, optional): wall-clock limit of this problem's run (default 5 s).
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, Sequence

from tropd.tasks.sandbox import Limits, SandboxResult, isolation, run_tests

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = {"", "python", "py", "python3", "py3"}


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.MULTILINE) is not None


def extract_code(completion: str, entry_point: str | None = None) -> str:
    """The program in a completion.

    Fenced blocks (```` ```python ```` or untagged; an unterminated last fence counts) are preferred: the last
    one that defines ``entry_point``, else the last Python block. Without fences the whole completion is code.
    """
    blocks = [(tag.lower(), body) for tag, body in _FENCE.findall(completion)]
    python_blocks = [body for tag, body in blocks if tag in _PYTHON_TAGS]
    if entry_point:
        defining = [body for body in python_blocks if _defines(body, entry_point)]
        if defining:
            return defining[-1]
    if python_blocks:
        return python_blocks[-1]
    return completion


def build_program(completion: str, reference: Mapping[str, Any]) -> str:
    """The source the sandbox runs before the tests: ``setup`` plus the extracted program (or continuation)."""
    entry_point = reference["entry_point"]
    setup = reference.get("setup") or ""
    code = extract_code(completion, entry_point)
    if not setup:
        return code
    if _defines(code, entry_point):
        return setup.rstrip("\n") + "\n\n" + code
    return setup + code  # a continuation of the setup (function body)


def _check_reference(reference: Mapping[str, Any]) -> None:
    for key in ("tests", "entry_point"):
        if not isinstance(reference.get(key), str) or not reference[key]:
            raise ValueError(f"code reference needs a non-empty string {key!r}; got keys {sorted(reference)}")
    if not reference["entry_point"].isidentifier():
        raise ValueError(f"entry_point must be a Python identifier, got {reference['entry_point']!r}")
    if "setup" in reference and not isinstance(reference["setup"], (str, type(None))):
        raise ValueError("code reference 'setup' must be a string")


def _limits(reference: Mapping[str, Any], limits: Limits | None) -> Limits:
    if limits is not None:
        return limits
    if "timeout_s" in reference:
        return Limits(timeout_s=float(reference["timeout_s"]))
    return Limits()


def run_code(completion: str, reference: Mapping[str, Any], *, limits: Limits | None = None) -> SandboxResult:
    """Run a completion's program against the reference tests; the full :class:`SandboxResult`."""
    _check_reference(reference)
    program = build_program(completion, reference)
    return run_tests(program, reference["tests"], reference["entry_point"], limits=_limits(reference, limits),
                     setup=reference.get("setup") or None)


def grade_code(completion: str, reference: Mapping[str, Any], *, limits: Limits | None = None) -> float:
    """1.0 when the program defines the entry point and every test ran and passed, else 0.0."""
    return 1.0 if run_code(completion, reference, limits=limits).passed else 0.0


def grade_code_many(completions: Sequence[str], references: Sequence[Mapping[str, Any]], *,
                    max_workers: int | None = None, limits: Limits | None = None) -> list[float]:
    """Grade many completions concurrently (a thread pool over sandboxed subprocesses), in input order."""
    if len(completions) != len(references):
        raise ValueError(f"{len(completions)} completions but {len(references)} references")
    for reference in references:
        _check_reference(reference)
    if not completions:
        return []
    isolation()  # probe once, before the threads start
    workers = max_workers or max(1, min(len(completions), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda pair: grade_code(pair[0], pair[1], limits=limits),
                             zip(completions, references)))
