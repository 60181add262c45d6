"""Multiple-choice grader: find the option letter a completion chose and compare it with the reference.

Reference: ``{"answer": "B"}``, optionally ``"choices": [...]`` (or ``"num_choices": n``) which limits the
letters to the first ``n`` (default A-J).

Extraction (:func:`extract_choice`), uppercase letters only, in two tiers:

1. explicit answers: ``Answer: B``, ``the answer is (B)``, ``correct answer is **B**``, ``answer: option B``,
   ``\\boxed{B}``; the last one in the text wins;
2. otherwise weaker signs: a parenthesised letter ``(B)``, a bold ``**B**``, or a letter standing alone at the
   very end (``... so B.``); again the last one wins.

The tiers keep an explicit "Answer: B" from being overridden by a later mention such as "(C) is wrong".
"""

from __future__ import annotations

import re
import string
from typing import Any, Mapping

DEFAULT_LETTERS = "ABCDEFGHIJ"


def _letters(reference: Mapping[str, Any] | None) -> str:
    if reference:
        if isinstance(reference.get("choices"), (list, tuple)) and reference["choices"]:
            return string.ascii_uppercase[: len(reference["choices"])]
        if isinstance(reference.get("num_choices"), int) and reference["num_choices"] > 0:
            return string.ascii_uppercase[: reference["num_choices"]]
    return DEFAULT_LETTERS


def extract_choice(completion: str, letters: str = DEFAULT_LETTERS) -> str | None:
    """The chosen option letter, or ``None`` when the completion names none of ``letters``."""
    cls = f"[{re.escape(letters)}]"
    strong = [
        rf"(?i:answer)\s*(?:(?i:is)|:|=)?\s*(?:(?i:option)\s*)?[:\s]*[(\[*]*\s*({cls})(?![\w])",
        rf"\\boxed\{{\s*(?:\\text\{{\s*)?\(?({cls})\)?\s*\}}",
    ]
    weak = [
        rf"\(({cls})\)",
        rf"\*\*({cls})\*\*",
        rf"(?<![\w])({cls})[\s.)*:!]*\Z",
    ]
    for tier in (strong, weak):
        hits = [(m.start(1), m.group(1)) for pattern in tier for m in re.finditer(pattern, completion)]
        if hits:
            return max(hits)[1]
    return None


def grade_mcq(completion: str, reference: Mapping[str, Any]) -> float:
    """1.0 when the extracted letter equals ``reference["answer"]`` (case-insensitive), else 0.0."""
    answer = reference.get("answer")
    letters = _letters(reference)
    if not isinstance(answer, str) or answer.strip().upper() not in letters or len(answer.strip()) != 1:
        raise ValueError(f"mcq reference 'answer' must be one letter of {letters!r}, got {answer!r}")
    chosen = extract_choice(completion, letters)
    return 1.0 if chosen == answer.strip().upper() else 0.0
