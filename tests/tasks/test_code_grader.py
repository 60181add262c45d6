"""Code grader: program extraction, assembly with setup, HumanEval canonical solutions, batch grading."""

from __future__ import annotations

import pytest

from tropd.tasks import grade, grade_batch
from tropd.tasks.code import build_program, extract_code
from tropd.tasks.humaneval import load_humaneval, to_example

ADD_TESTS = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
ADD_REF = {"tests": ADD_TESTS, "entry_point": "add"}


@pytest.mark.parametrize("completion,expected", [
    ("```python\ndef add(a, b):\n    return a + b\n```", 1.0),
    ("Here you go:\n```py\ndef add(a, b):\n    return a + b\n```\nHope it helps.", 1.0),
    ("def add(a, b):\n    return a + b\n", 1.0),  # no fence: the whole completion is code
    ("```python\ndef add(a, b):\n    return a + b\n", 1.0),  # unterminated fence (truncated generation)
    # the last block that defines the entry point wins over a later usage example
    ("```python\ndef add(a, b):\n    return a + b\n```\nUsage:\n```python\nprint(add(1, 2))\n```", 1.0),
    ("```python\ndef add(a, b):\n    return a - b\n```\nOops, fixed:\n"
     "```python\ndef add(a, b):\n    return a + b\n```", 1.0),
    ("```python\ndef add(a, b):\n    return a + b\n```\nOops:\n```python\ndef add(a, b):\n    return a - b\n```", 0.0),
    ("```python\ndef add(a, b):\n    return a - b\n```", 0.0),
    ("```python\ndef plus(a, b):\n    return a + b\n```", 0.0),  # wrong name
    ("```python\ndef add(a, b)\n    return a + b\n```", 0.0),  # syntax error
    ("I cannot solve this.", 0.0),
    ("", 0.0),
])
def test_code_grading_table(completion: str, expected: float) -> None:
    assert grade("code", completion, ADD_REF) == expected


def test_plain_assert_tests() -> None:
    reference = {"tests": "assert add(1, 1) == 2\nassert add(0, 5) == 5\n", "entry_point": "add"}
    assert grade("code", "def add(a, b):\n    return a + b\n", reference) == 1.0
    assert grade("code", "def add(a, b):\n    return a * b\n", reference) == 0.0


def test_extract_code_prefers_python_blocks() -> None:
    text = "```bash\npip install x\n```\n```python\ndef f():\n    pass\n```"
    assert extract_code(text, "f").startswith("def f")


def test_setup_is_prepended_and_continuations_are_supported() -> None:
    reference = {"tests": "def check(candidate):\n    assert candidate([1, 2]) == 3\n", "entry_point": "total",
                 "setup": "from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    \"\"\"Sum.\"\"\"\n"}
    full = "```python\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n```"
    body = "    return sum(xs)\n"
    assert build_program(full, reference).startswith("from typing import List")
    assert grade("code", full, reference) == 1.0  # List comes from the setup
    assert grade("code", body, reference) == 1.0  # HumanEval-style continuation
    assert grade("code", "    return 0\n", reference) == 0.0


def test_malformed_reference_raises() -> None:
    with pytest.raises(ValueError, match="entry_point"):
        grade("code", "def f(): pass", {"tests": "assert True"})
    with pytest.raises(ValueError, match="tests"):
        grade("code", "def f(): pass", {"entry_point": "f"})


HUMANEVAL_IDS = (0, 2, 32, 53, 101, 163)  # 32 calls a helper defined in its prompt


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail() -> None:
    records = load_humaneval()
    assert len(records) == 164
    chosen = [records[i] for i in HUMANEVAL_IDS]
    examples = [to_example(r) for r in chosen]
    canonical = [r["canonical_solution"] for r in chosen]  # function bodies: continuations of the prompt
    fenced = [f"```python\n{r['prompt']}{r['canonical_solution']}```" for r in chosen]  # whole functions
    wrong = ["    return None\n"] * len(chosen)
    n = len(chosen)
    scores = grade_batch("code", canonical + fenced + wrong, [e.reference for e in examples] * 3, max_workers=2)
    assert scores[:n] == [1.0] * n
    assert scores[n:2 * n] == [1.0] * n
    assert scores[2 * n:] == [0.0] * n


def test_generated_code_problem_tests_reject_a_constant_answer() -> None:
    from tropd.tasks import get_suite

    example = get_suite("code").examples("test", 1, seed=3)[0]
    first_assert = next(line for line in example.reference["tests"].splitlines() if "assert" in line)
    constant = first_assert.split(" == ", 1)[1]
    program = f"def {example.reference['entry_point']}(*args):\n    return {constant}\n"
    assert grade("code", program, example.reference) == 0.0


SOLUTIONS = {  # what a correct model answer looks like, for fixed parameters of some templates
    ("sum_divisible", (3, False)): "def sum_divisible(nums):\n    return sum(x for x in nums if x % 3 == 0)\n",
    ("caesar", (2, "backward")): ("def caesar(s):\n    return ''.join(chr((ord(c) - 97 - 2) % 26 + 97) "
                                  "if 'a' <= c <= 'z' else c for c in s)\n"),
    ("rotate", (3, "right")): "def rotate(xs):\n    if not xs:\n        return []\n    k = 3 % len(xs)\n"
                              "    return xs[-k:] + xs[:-k] if k else list(xs)\n",
    ("fizz", (3, 5, "Fizz", "Buzz")): ("def fizz(n):\n    out = []\n    for i in range(1, n + 1):\n"
                                       "        w = ('Fizz' if i % 3 == 0 else '') + ('Buzz' if i % 5 == 0 else '')\n"
                                       "        out.append(w or str(i))\n    return out\n"),
    ("rle", ("count-char",)): ("import itertools\ndef rle(s):\n"
                               "    return ''.join(f'{len(list(g))}{k}' for k, g in itertools.groupby(s))\n"),
}


def test_generated_problems_are_solvable_from_their_description() -> None:
    from tropd.tasks.code_gen import TEMPLATES, build_problem

    problems = [build_problem(TEMPLATES[name], params) for name, params in SOLUTIONS]
    references = [{"tests": p.tests, "entry_point": p.entry_point} for p in problems]
    assert grade_batch("code", list(SOLUTIONS.values()), references, max_workers=2) == [1.0] * len(SOLUTIONS)
