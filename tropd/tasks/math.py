"""Math grader: extract the final answer of a completion and check it against the reference with math-verify.

Extraction (:func:`extract_final_answer`): the contents of ``\\boxed{...}`` / ``\\fbox{...}`` and the text after
``####`` are candidates, and the **last** one in the completion wins; with neither, the last number (integers,
decimals, ``1,250``-style thousands, ``a/b``, ``\\frac{a}{b}``) is the answer.

Equivalence is math-verify's (``parse`` + ``verify``): ``1/2 = 0.5 = \\frac{1}{2}``, ``1,250 = 1250``, ``3.0 = 3``.
math-verify bounds its own time with ``signal.alarm``, which works only in the main thread; in any other thread
the graders pass ``None`` (no alarm) and instead refuse answers that look expensive to evaluate (very long,
or huge powers/factorials) with a score of 0.
"""

from __future__ import annotations

import logging
import re
import threading
from functools import lru_cache
from typing import Any, Mapping

MAX_ANSWER_CHARS = 300
_TIMEOUT_S = 5
_EXPENSIVE = re.compile(r"(\^|\*\*)\s*[{(]?\s*-?\d{3,}|\d{3,}\s*!|(\^|\*\*)[^\n]*(\^|\*\*)")
_NUMBER = re.compile(
    r"\\d?frac\{\s*-?\d+\s*\}\{\s*-?\d+\s*\}"  # \frac{a}{b}
    r"|-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?![\d.]))?"  # 1,250  3.5  -7  3/4
    r"|-?\.\d+"
)


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """The balanced ``{...}`` content starting at ``text[start] == '{'``, and the index after it."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
    return None


def _marked_answers(text: str) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for match in re.finditer(r"\\(?:boxed|fbox)\s*(\{)?", text):
        if match.group(1):
            inner = _braced(text, match.end() - 1)
            if inner is not None:
                found.append((match.start(), inner[0]))
        else:  # "\boxed 42"
            tail = re.match(r"\s*([^\s$]+)", text[match.end():])
            if tail:
                found.append((match.start(), tail.group(1)))
    for match in re.finditer(r"####[ \t]*([^\n]*)", text):
        found.append((match.start(), match.group(1)))
    return found


def extract_final_answer(completion: str) -> str | None:
    """The final answer text of a completion, or ``None`` when it has neither a marked answer nor a number."""
    marked = _marked_answers(completion)
    if marked:
        answer = max(marked, key=lambda item: item[0])[1].strip()
        answer = answer.rstrip(".").strip()
        return answer or None
    numbers = _NUMBER.findall(completion)
    return numbers[-1].strip() if numbers else None


class _NoTimeoutWarning(logging.Filter):
    """Drops math-verify's "Timeout is disabled" warning: outside the main thread we bound work ourselves."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


@lru_cache(maxsize=1)
def _math_verify():
    from math_verify import parse, verify

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_NoTimeoutWarning())
    return parse, verify


def _timeout() -> int | None:
    return _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _parse_all(text: str, timeout: int | None) -> list[Any]:
    """math-verify parses of ``text`` both as LaTeX (``$...$``) and as a plain expression."""
    parse, _ = _math_verify()
    parsed: list[Any] = []
    for candidate in (f"${text}$", text):
        parsed.extend(parse(candidate, parsing_timeout=timeout))
    return parsed


def answers_match(gold: str, predicted: str) -> bool:
    """Whether ``predicted`` equals ``gold`` by math-verify (both are answer strings, not whole completions)."""
    timeout = _timeout()
    if len(predicted) > MAX_ANSWER_CHARS:
        return False
    if timeout is None and _EXPENSIVE.search(predicted):
        return False  # no alarm available in this thread: do not risk an unbounded sympy evaluation
    _, verify = _math_verify()
    gold_parsed = _parse_all(gold, timeout)
    predicted_parsed = _parse_all(predicted, timeout)
    if not gold_parsed or not predicted_parsed:
        return gold.strip() == predicted.strip()
    try:
        return bool(verify(gold_parsed, predicted_parsed, timeout_seconds=timeout))
    except Exception:  # noqa: BLE001 - math-verify raising on odd input is a non-match
        return False


def grade_math(completion: str, reference: Mapping[str, Any]) -> float:
    """1.0 when the completion's final answer equals ``reference["answer"]``, else 0.0."""
    if "answer" not in reference:
        raise ValueError(f"math reference needs an 'answer'; got keys {sorted(reference)}")
    gold = str(reference["answer"]).strip()
    if not gold:
        raise ValueError("math reference 'answer' is empty")
    predicted = extract_final_answer(completion)
    if predicted is None:
        return 0.0
    return 1.0 if answers_match(gold, predicted) else 0.0
