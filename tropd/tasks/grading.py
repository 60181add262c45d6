"""One entry point for every grader: ``grade(domain, completion, reference) -> float in [0, 1]``.

==========  =========================================================  ==========================================
domain      reference                                                  score
==========  =========================================================  ==========================================
``math``    ``{"answer": str}``                                        1/0, math-verify equivalence
``code``    ``{"tests": str, "entry_point": str}`` (+ ``setup``,        1/0, all tests ran and passed in the
            ``timeout_s``)                                             sandbox
``if``      ``{"constraints": [...]}`` (+ ``loose``, ``partial``)       prompt-level strict by default
``mcq``     ``{"answer": "B"}`` (+ ``choices``)                         1/0, extracted letter
==========  =========================================================  ==========================================

A malformed *reference* raises ``ValueError`` (a caller's bug); a malformed *completion* scores 0.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

from tropd.tasks.code import grade_code, grade_code_many
from tropd.tasks.instruct import grade_if
from tropd.tasks.math import grade_math
from tropd.tasks.mcq import grade_mcq
from tropd.tasks.types import DOMAINS

GRADERS: dict[str, Callable[[str, Mapping[str, Any]], float]] = {
    "math": grade_math,
    "code": grade_code,
    "if": grade_if,
    "mcq": grade_mcq,
}
assert tuple(GRADERS) == DOMAINS


def _grader(domain: str) -> Callable[[str, Mapping[str, Any]], float]:
    if domain not in GRADERS:
        raise ValueError(f"unknown grading domain {domain!r}; allowed: {', '.join(GRADERS)}")
    return GRADERS[domain]


def grade(domain: str, completion: str, reference: Mapping[str, Any]) -> float:
    """Score ``completion`` against ``reference`` with the grader of ``domain`` (a float in ``[0, 1]``).

    Raises:
        ValueError: ``domain`` is not one of ``math``, ``code``, ``if``, ``mcq``, or ``reference`` is malformed.
        TypeError: ``completion`` is not a string or ``reference`` not a mapping.
    """
    grader = _grader(domain)
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    if not isinstance(reference, Mapping):
        raise TypeError(f"reference must be a mapping, got {type(reference).__name__}")
    return float(grader(completion, reference))


def grade_batch(domains: str | Sequence[str], completions: Sequence[str],
                references: Sequence[Mapping[str, Any]], *, max_workers: int | None = None) -> list[float]:
    """Grade many completions; code runs concurrently in sandboxes, the rest in the calling thread.

    ``domains`` is one domain for all, or one per completion. Results are in input order.
    """
    if isinstance(domains, str):
        domains = [domains] * len(completions)
    if not len(domains) == len(completions) == len(references):
        raise ValueError(f"lengths differ: {len(domains)} domains, {len(completions)} completions, "
                         f"{len(references)} references")
    for domain in set(domains):
        _grader(domain)
    scores: list[float | None] = [None] * len(completions)
    code_idx = [i for i, d in enumerate(domains) if d == "code"]
    if code_idx:
        code_scores = grade_code_many([completions[i] for i in code_idx], [references[i] for i in code_idx],
                                      max_workers=max_workers or os.cpu_count() or 1)
        for i, score in zip(code_idx, code_scores):
            scores[i] = score
    for i, domain in enumerate(domains):
        if domain != "code":  # math-verify keeps its signal-based timeout in the main thread
            scores[i] = grade(domain, completions[i], references[i])
    return [float(s) for s in scores]  # type: ignore[arg-type]


__all__ = ["GRADERS", "grade", "grade_batch"]
