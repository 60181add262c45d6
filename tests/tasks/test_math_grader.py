"""Math grader: final-answer extraction and math-verify equivalence on tricky cases."""

from __future__ import annotations

import threading

import pytest

from tropd.tasks import grade
from tropd.tasks.math import extract_final_answer

CASES = [
    # (completion, gold answer, expected score)
    (r"So the result is \boxed{\frac{1}{2}}.", "0.5", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{1/2}", "0.5", 1.0),
    ("The total is #### 1,250", "1250", 1.0),
    (r"\boxed{1,250}", "1250", 1.0),
    ("The answer is 3.0", "3", 1.0),
    ("It costs $1,250.50 in the end", "1250.5", 1.0),
    (r"\boxed{4} ... wait, I made an error, it is \boxed{5}", "5", 1.0),  # last boxed wins
    (r"\boxed{4} ... wait, I made an error, it is \boxed{5}", "4", 0.0),
    (r"first \boxed{5} then #### 4", "4", 1.0),  # the last marked answer wins, whatever its marker
    ("#### 4\nlater: \\boxed{5}", "5", 1.0),
    ("We get 12 apples, then 7 more.", "7", 1.0),  # no marker: the last number
    ("We get 12 apples, then 7 more.", "12", 0.0),
    (r"\boxed{12\text{ dollars}}", "12", 1.0),
    (r"\boxed{\$12}", "12", 1.0),
    (r"\boxed{x = 7}", "7", 1.0),
    (r"\boxed{-3}", "-3", 1.0),
    (r"\boxed{3}", "-3", 0.0),
    ("#### 42.", "42", 1.0),
    ("3/4 of the cake", "0.75", 1.0),
    (r"so it is $\frac{3}{4}$ of it", "0.75", 1.0),
    (r"\boxed{\frac{6}{8}}", "3/4", 1.0),
    (r"\boxed{0.75}", "0.7", 0.0),
    (r"\boxed{2^{10}}", "1024", 1.0),
    ("no digits at all", "1", 0.0),
    ("", "1", 0.0),
    (r"\boxed{}", "1", 0.0),
    (r"\boxed{\frac{1}{2}", "0.5", 1.0),  # unbalanced box: no marked answer; the last number is \frac{1}{2}
    (r"\boxed{\frac{1}{3}", "0.5", 0.0),
]


@pytest.mark.parametrize("completion,gold,expected", CASES)
def test_math_grading_table(completion: str, gold: str, expected: float) -> None:
    assert grade("math", completion, {"answer": gold}) == expected


@pytest.mark.parametrize("completion,expected", [
    (r"text \boxed{\frac{1}{2}} text", r"\frac{1}{2}"),
    (r"\boxed{a{b}c} and \fbox{9}", "9"),
    ("#### 1,250 dollars\n", "1,250 dollars"),
    ("x = 3, y = 4.5", "4.5"),
    ("numbers 1,000,000 and -7", "-7"),
    ("ratio 3/4", "3/4"),
    (r"\boxed 42", "42"),
    ("nothing", None),
])
def test_extract_final_answer(completion: str, expected: str | None) -> None:
    assert extract_final_answer(completion) == expected


def test_gold_may_be_a_number() -> None:
    assert grade("math", r"\boxed{12}", {"answer": 12}) == 1.0


def test_missing_answer_is_a_reference_error() -> None:
    with pytest.raises(ValueError, match="answer"):
        grade("math", r"\boxed{1}", {})


def test_grading_works_outside_the_main_thread() -> None:
    """math-verify's signal alarm cannot run in worker threads; the grader must disable it there."""
    results: list[object] = []

    def work() -> None:
        try:
            results.append(grade("math", r"\boxed{\frac{2}{4}}", {"answer": "0.5"}))
            results.append(grade("math", r"\boxed{2^{100000000}}", {"answer": "1"}))  # refused, not evaluated
        except Exception as exc:  # noqa: BLE001
            results.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=30)
    assert results == [1.0, 0.0]
