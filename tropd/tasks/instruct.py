"""Instruction-following grader: verifiable constraints on the form of a response (IFEval-style).

A reference is ``{"constraints": [spec, ...]}`` where every spec is a dict with a ``"type"`` and that type's
parameters (:data:`CONSTRAINT_TYPES` lists them; ``docs/tasks.md`` documents each). Optional reference keys:

* ``"loose"`` (bool, default ``False``): IFEval's loose check. A constraint also passes when it holds for the
  response with its first line, its last line, or both removed, and/or with every ``*`` removed.
* ``"partial"`` (bool, default ``False``): score the fraction of constraints met (IFEval's instruction-level
  accuracy) instead of 1/0 for all of them met (prompt-level accuracy, the default).

So the default score is IFEval's **prompt-level strict** accuracy. :func:`evaluate` returns all four numbers.
An empty (whitespace-only) response meets no constraint.

Counting rules: a word is a maximal run of ``\\w`` characters (``don't`` is two words, as in IFEval); sentences
end at ``.``, ``!`` or ``?`` followed by whitespace or the end (abbreviations count as ends); paragraphs are
separated by blank lines; a bullet is a line starting with ``*``, ``-`` or ``•`` then a space; keywords match
whole words, case-insensitively; ``starts_with``/``ends_with`` compare case-insensitively after stripping.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

Spec = Mapping[str, Any]


def count_words(text: str) -> int:
    """Number of ``\\w+`` runs."""
    return len(re.findall(r"\w+", text))


def count_sentences(text: str) -> int:
    """Sentences: pieces ending at ``.``/``!``/``?`` + whitespace (or the end) that contain a word character."""
    pieces = re.split(r"(?<=[.!?])\s+|\n\s*\n", text.strip())
    return sum(1 for piece in pieces if re.search(r"\w", piece))


def paragraphs(text: str) -> list[str]:
    """Non-empty blocks separated by blank lines."""
    return [p for p in re.split(r"\n[ \t]*\n", text.strip()) if p.strip()]


def count_bullets(text: str) -> int:
    """Lines that start (after indentation) with ``*``, ``-`` or ``•`` followed by a space."""
    return len(re.findall(r"^[ \t]*[*\-•][ \t]+\S", text, re.MULTILINE))


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE) is not None


def _count_word(text: str, word: str) -> int:
    return len(re.findall(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE))


def _strip_fences(text: str) -> str:
    text = text.strip()
    text = re.sub(r"^```[A-Za-z]*[ \t]*\n?", "", text)
    text = re.sub(r"\n?```$", "", text)
    return text.strip()


def _is_json(text: str) -> bool:
    try:
        json.loads(_strip_fences(text))
    except ValueError:
        return False
    return True


def _check_relation(count: int, spec: Spec) -> bool:
    return count >= spec["value"] if spec.get("relation", "at_least") == "at_least" else count <= spec["value"]


@dataclass(frozen=True)
class ConstraintType:
    """One verifiable constraint: its parameters, checker and the instruction text used in prompts."""

    name: str
    params: Mapping[str, str]  # parameter -> kind: "int" (>0), "str", "words", "relation"
    check: Callable[[str, Spec], bool]
    describe: Callable[[Spec], str]


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _words_list(spec: Spec) -> str:
    return ", ".join(f'"{w}"' for w in spec["keywords"])


CONSTRAINT_TYPES: dict[str, ConstraintType] = {c.name: c for c in [
    ConstraintType("max_words", {"value": "int"}, lambda t, s: count_words(t) <= s["value"],
                   lambda s: f"Use at most {s['value']} words."),
    ConstraintType("min_words", {"value": "int"}, lambda t, s: count_words(t) >= s["value"],
                   lambda s: f"Use at least {s['value']} words."),
    ConstraintType("max_sentences", {"value": "int"}, lambda t, s: count_sentences(t) <= s["value"],
                   lambda s: f"Use at most {s['value']} sentences."),
    ConstraintType("min_sentences", {"value": "int"}, lambda t, s: count_sentences(t) >= s["value"],
                   lambda s: f"Use at least {s['value']} sentences."),
    ConstraintType("paragraphs", {"value": "int"}, lambda t, s: len(paragraphs(t)) == s["value"],
                   lambda s: f"Write exactly {s['value']} paragraphs, separated by blank lines."),
    ConstraintType("bullet_points", {"value": "int"}, lambda t, s: count_bullets(t) == s["value"],
                   lambda s: f"Include exactly {_plural(s['value'], 'markdown bullet point')} "
                             "(lines starting with \"* \")."),
    ConstraintType("include_keywords", {"keywords": "words"},
                   lambda t, s: all(_has_word(t, w) for w in s["keywords"]),
                   lambda s: f"Include the keywords {_words_list(s)}."),
    ConstraintType("forbidden_words", {"keywords": "words"},
                   lambda t, s: not any(_has_word(t, w) for w in s["keywords"]),
                   lambda s: f"Do not use the words {_words_list(s)}."),
    ConstraintType("keyword_frequency", {"keyword": "str", "relation": "relation", "value": "int"},
                   lambda t, s: _check_relation(_count_word(t, s["keyword"]), s),
                   lambda s: f"Use the word \"{s['keyword']}\" "
                             f"{s.get('relation', 'at_least').replace('_', ' ')} {s['value']} "
                             f"time{'s' if s['value'] != 1 else ''}."),
    ConstraintType("json_format", {}, lambda t, s: _is_json(t),
                   lambda s: "Format the whole output as valid JSON (you may wrap it in a ```json block)."),
    ConstraintType("lowercase", {}, lambda t, s: t == t.lower(),
                   lambda s: "Write everything in lowercase letters; no capital letters at all."),
    ConstraintType("uppercase", {}, lambda t, s: t == t.upper(),
                   lambda s: "Write everything in capital letters."),
    ConstraintType("starts_with", {"value": "str"},
                   lambda t, s: t.strip().lower().startswith(s["value"].strip().lower()),
                   lambda s: f"Start your response with the exact words \"{s['value']}\"."),
    ConstraintType("ends_with", {"value": "str"},
                   lambda t, s: t.strip().lower().endswith(s["value"].strip().lower()),
                   lambda s: f"End your response with the exact phrase \"{s['value']}\", with nothing after it."),
    ConstraintType("no_commas", {}, lambda t, s: "," not in t,
                   lambda s: "Do not use any commas."),
    ConstraintType("title", {}, lambda t, s: re.search(r"<<[^\n<>]+>>", t) is not None,
                   lambda s: "Give your answer a title wrapped in double angular brackets, like <<my title>>."),
    ConstraintType("placeholders", {"value": "int"},
                   lambda t, s: len(re.findall(r"\[[^\[\]\n]+\]", t)) >= s["value"],
                   lambda s: f"Include at least {_plural(s['value'], 'placeholder')} in square brackets, like [name]."),
    ConstraintType("highlights", {"value": "int"},
                   lambda t, s: len([h for h in re.findall(r"\*([^\n*]+)\*", t) if h.strip()]) >= s["value"],
                   lambda s: f"Highlight at least {_plural(s['value'], 'section')} with markdown, "
                             "like *highlighted section*."),
    ConstraintType("quotation", {},
                   lambda t, s: len(t.strip()) > 1 and t.strip()[0] == '"' and t.strip()[-1] == '"',
                   lambda s: "Wrap your entire response in double quotation marks."),
    ConstraintType("postscript", {"marker": "str"},
                   lambda t, s: re.search(rf"^[ \t]*{re.escape(s['marker'])}", t, re.MULTILINE | re.IGNORECASE)
                   is not None,
                   lambda s: f"At the end of your response, add a postscript starting with \"{s['marker']}\"."),
    ConstraintType("sections", {"value": "int", "marker": "str"},
                   lambda t, s: len(re.findall(rf"(?<!\w){re.escape(s['marker'])}\s*\d+", t, re.IGNORECASE))
                   >= s["value"],
                   lambda s: f"Divide your response into {s['value']} sections, marking the beginning of each "
                             f"with \"{s['marker']} X\" (X = 1, 2, ...)."),
]}


class SpecError(ValueError):
    """An invalid constraint spec; ``field`` is the path of the offending field (``constraints[1].value``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def validate_constraint(spec: Any, where: str = "constraint") -> None:
    """Raise :class:`SpecError` naming the field (``where`` is its prefix) when ``spec`` is not valid."""
    if not isinstance(spec, Mapping):
        raise SpecError(where, f"expected an object with a 'type', got {type(spec).__name__}")
    kind = spec.get("type")
    if kind not in CONSTRAINT_TYPES:
        raise SpecError(f"{where}.type", f"unknown constraint type {kind!r}; known: {sorted(CONSTRAINT_TYPES)}")
    for param, rule in CONSTRAINT_TYPES[kind].params.items():
        if param not in spec:
            if param == "relation":
                continue  # defaults to "at_least"
            raise SpecError(f"{where}.{param}",
                            f"missing (constraint {kind!r} needs {sorted(CONSTRAINT_TYPES[kind].params)})")
        value = spec[param]
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool) and value > 0,
            "str": isinstance(value, str) and value.strip() != "",
            "words": isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(w, str) and w.strip() for w in value),
            "relation": value in ("at_least", "at_most"),
        }[rule]
        if not ok:
            expected = {"int": "a positive integer", "str": "a non-empty string",
                        "words": "a non-empty list of non-empty strings",
                        "relation": "'at_least' or 'at_most'"}[rule]
            raise SpecError(f"{where}.{param}", f"expected {expected}, got {value!r}")


def validate_spec(reference: Any, where: str = "") -> None:
    """Validate an ``if`` reference (``{"constraints": [...]}`` plus optional ``loose``/``partial``).

    Raises :class:`SpecError` whose ``field`` is e.g. ``constraints[1].value`` (prefixed by ``where.``).
    """
    prefix = f"{where}." if where else ""
    if not isinstance(reference, Mapping):
        raise SpecError(where or "reference", "expected an object with 'constraints'")
    constraints = reference.get("constraints")
    if not isinstance(constraints, (list, tuple)) or not constraints:
        raise SpecError(f"{prefix}constraints", "expected a non-empty list of constraint objects")
    for i, spec in enumerate(constraints):
        validate_constraint(spec, f"{prefix}constraints[{i}]")
    for flag in ("loose", "partial"):
        if flag in reference and not isinstance(reference[flag], bool):
            raise SpecError(f"{prefix}{flag}", "expected true or false")


def describe(spec: Spec) -> str:
    """The instruction sentence a prompt uses for a constraint."""
    validate_constraint(spec)
    return CONSTRAINT_TYPES[spec["type"]].describe(spec)


def loose_variants(response: str) -> list[str]:
    """The response and its IFEval loose variants (first/last/both lines removed, ``*`` removed), non-empty."""
    lines = response.split("\n")
    cut = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    variants = cut + [v.replace("*", "") for v in cut]
    return [v for v in variants if v.strip()]


def check_constraints(response: str, constraints: Sequence[Spec], *, loose: bool = False) -> list[bool]:
    """Whether each constraint holds for ``response`` (strict, or loose over :func:`loose_variants`)."""
    for i, spec in enumerate(constraints):
        validate_constraint(spec, f"constraints[{i}]")
    if not response.strip():
        return [False] * len(constraints)
    variants = loose_variants(response) if loose else [response]
    return [any(CONSTRAINT_TYPES[spec["type"]].check(v, spec) for v in variants) for spec in constraints]


@dataclass(frozen=True)
class IFResult:
    """Per-constraint outcomes and IFEval's four accuracies for one response."""

    strict: tuple[bool, ...]
    loose: tuple[bool, ...]

    @property
    def prompt_strict(self) -> float:
        return float(all(self.strict))

    @property
    def prompt_loose(self) -> float:
        return float(all(self.loose))

    @property
    def instruction_strict(self) -> float:
        return sum(self.strict) / len(self.strict)

    @property
    def instruction_loose(self) -> float:
        return sum(self.loose) / len(self.loose)


def evaluate(response: str, reference: Mapping[str, Any]) -> IFResult:
    """Strict and loose outcomes of every constraint in ``reference["constraints"]``."""
    validate_spec(reference)
    constraints = reference["constraints"]
    return IFResult(tuple(check_constraints(response, constraints)),
                    tuple(check_constraints(response, constraints, loose=True)))


def grade_if(completion: str, reference: Mapping[str, Any]) -> float:
    """Prompt-level strict accuracy by default; ``reference["loose"]``/``["partial"]`` select the others."""
    validate_spec(reference)
    met = check_constraints(completion, reference["constraints"], loose=bool(reference.get("loose", False)))
    if reference.get("partial", False):
        return sum(met) / len(met)
    return float(all(met))
