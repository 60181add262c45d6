"""The registry of task suites: :func:`get_suite`, :func:`list_suites`, and the generated-suite machinery.

Splits of generated suites are hash-based on the *canonical problem key* (template and numbers, not names or
option order): ``sha256(family | key)`` decides once and for all whether a problem is train or test, so the
splits are disjoint for every seed, and suites of one family (``math``, ``math-l1``...) agree on them.
``examples(split, n, seed)`` draws with ``random.Random(f"{suite}|{split}|{seed}")``, skips problems of the
other split and duplicates, and returns the same list for the same arguments.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any, Callable

from tropd.tasks import code_gen, instruct_gen, math_gen, mcq_gen
from tropd.tasks.humaneval import HumanEvalSuite
from tropd.tasks.types import Example, Split, TaskSuite

TEST_FRACTION = 0.2
MAX_FRUITLESS_DRAWS = 5000


def split_of(family: str, key: str, test_fraction: float = TEST_FRACTION) -> Split:
    """The split of a canonical problem: ``"test"`` for a ``test_fraction`` share of keys by hash."""
    digest = hashlib.sha256(f"{family}|{key}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


def problem_id(family: str, key: str) -> str:
    """Stable id of a canonical problem: ``"<family>/<12 hex digits>"``."""
    return f"{family}/{hashlib.sha256(f'{family}|{key}'.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class Draft:
    """A drawn problem before the split filter: canonical key, prompt, reference, meta."""

    key: str
    prompt: str
    reference: dict[str, Any]
    meta: dict[str, Any]


class GeneratedSuite(TaskSuite):
    """A suite whose problems come from a seeded sampler ``draw(rng) -> Draft | None``."""

    def __init__(self, name: str, family: str, domain: str, draw: Callable[[random.Random], Draft | None],
                 description: str, test_fraction: float = TEST_FRACTION) -> None:
        self.name = name
        self.family = family
        self.domain = domain
        self.description = description
        self._draw = draw
        self.test_fraction = test_fraction

    def examples(self, split: Split, n: int, seed: int = 0) -> list[Example]:
        self._check_split(split, n)
        rng = random.Random(f"{self.name}|{split}|{seed}")
        out: list[Example] = []
        seen: set[str] = set()
        fruitless = 0  # consecutive draws that gave nothing new: the split is (nearly) exhausted
        while len(out) < n:
            if fruitless >= MAX_FRUITLESS_DRAWS:
                raise ValueError(f"suite {self.name!r} found only {len(out)} distinct {split} problems "
                                 f"({MAX_FRUITLESS_DRAWS} draws in a row found no new one); ask for fewer than {n}")
            draft = self._draw(rng)
            if draft is None or draft.key in seen or split_of(self.family, draft.key, self.test_fraction) != split:
                fruitless += 1
                continue
            fruitless = 0
            seen.add(draft.key)
            out.append(Example(draft.prompt, self.domain, draft.reference, problem_id(self.family, draft.key),
                               dict(draft.meta)))
        return out


def _math_draw(levels: tuple[int, ...]) -> Callable[[random.Random], Draft | None]:
    def draw(rng: random.Random) -> Draft | None:
        problem = math_gen.sample_problem(rng, levels)
        if problem is None:
            return None
        return Draft(problem.key, problem.text + math_gen.PROMPT_SUFFIX,
                     {"answer": math_gen.format_number(problem.answer)},
                     {"template": problem.template, "level": problem.level})

    return draw


def _code_draw(rng: random.Random) -> Draft | None:
    problem = code_gen.sample_problem(rng)
    if problem is None:
        return None
    return Draft(problem.key, problem.prompt, {"tests": problem.tests, "entry_point": problem.entry_point},
                 {"template": problem.template})


def _if_draw(rng: random.Random) -> Draft:
    problem = instruct_gen.sample_problem(rng)
    return Draft(problem.key, problem.prompt, {"constraints": [dict(c) for c in problem.constraints]},
                 {"types": [c["type"] for c in problem.constraints]})


def _mcq_draw(rng: random.Random) -> Draft | None:
    problem = mcq_gen.sample_problem(rng)
    if problem is None:
        return None
    prompt, letter, options = mcq_gen.render(problem, rng)
    return Draft(problem.key, prompt, {"answer": letter, "choices": options}, {"family": problem.family})


def _build() -> dict[str, TaskSuite]:
    suites: list[TaskSuite] = [
        GeneratedSuite("math", "math", "math", _math_draw((1, 2, 3)),
                       "multi-step arithmetic word problems, difficulty levels 1-3 mixed"),
        *[GeneratedSuite(f"math-l{level}", "math", "math", _math_draw((level,)),
                         f"multi-step arithmetic word problems, difficulty level {level} only") for level in (1, 2, 3)],
        GeneratedSuite("code", "code", "code", _code_draw,
                       "write-a-Python-function problems with hidden unit tests (14 templates)"),
        HumanEvalSuite(),
        GeneratedSuite("if", "if", "if", _if_draw, "writing tasks with 1-3 verifiable format constraints"),
        GeneratedSuite("mcq", "mcq", "mcq", _mcq_draw,
                       "STEM multiple choice: unit conversions, physics, chemistry, arithmetic"),
    ]
    return {suite.name: suite for suite in suites}


_SUITES: dict[str, TaskSuite] = _build()


def list_suites() -> list[str]:
    """Names of the registered suites."""
    return list(_SUITES)


def get_suite(name: str) -> TaskSuite:
    """The suite called ``name`` (``ValueError`` listing the known names otherwise)."""
    try:
        return _SUITES[name]
    except KeyError:
        raise ValueError(f"unknown task suite {name!r}; known: {', '.join(_SUITES)}") from None
