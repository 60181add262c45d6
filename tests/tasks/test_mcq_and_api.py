"""Multiple-choice grader and the public ``grade`` contract."""

from __future__ import annotations

import pytest

from tropd.tasks import grade, grade_batch
from tropd.tasks.mcq import extract_choice

MCQ_CASES = [
    ("Answer: B", "B", 1.0),
    ("the answer is (C).", "C", 1.0),
    ("The correct answer is **D**", "D", 1.0),
    ("answer: option A", "A", 1.0),
    ("ANSWER: C", "C", 1.0),
    (r"\boxed{C}", "C", 1.0),
    (r"\boxed{\text{B}}", "B", 1.0),
    ("I think (A) is wrong and (B) is right", "B", 1.0),  # weak tier: last parenthesised letter
    ("Answer: B. Option (C) would need twice the mass.", "B", 1.0),  # explicit answer beats a later mention
    ("Answer: A\nOn reflection, Answer: D", "D", 1.0),  # last explicit answer wins
    ("so the final choice is\nD.", "D", 1.0),  # standalone letter at the very end
    ("(A) 5 (B) 6 (C) 7 (D) 8. So C.", "C", 1.0),
    ("The answer is a bit unclear; B", "B", 1.0),  # lowercase "a" is not an option letter
    ("Answer: b", "B", 0.0),  # letters are uppercase only
    ("answer is E", "A", 0.0),  # E is not among four choices
    ("I do not know.", "A", 0.0),
    ("", "A", 0.0),
    ("Answer: A", "B", 0.0),
]


@pytest.mark.parametrize("completion,answer,expected", MCQ_CASES)
def test_mcq_table(completion: str, answer: str, expected: float) -> None:
    reference = {"answer": answer, "choices": ["w", "x", "y", "z"]}
    assert grade("mcq", completion, reference) == expected


def test_mcq_without_choices_accepts_letters_up_to_j() -> None:
    assert grade("mcq", "Answer: E", {"answer": "E"}) == 1.0
    assert extract_choice("Answer: K") is None


def test_mcq_reference_must_be_a_valid_letter() -> None:
    with pytest.raises(ValueError, match="letter"):
        grade("mcq", "Answer: A", {"answer": "E", "choices": ["a", "b", "c", "d"]})
    with pytest.raises(ValueError):
        grade("mcq", "Answer: A", {"answer": "AB"})


def test_unknown_domain_names_the_allowed_ones() -> None:
    with pytest.raises(ValueError) as info:
        grade("chess", "e4", {})
    for domain in ("math", "code", "if", "mcq"):
        assert domain in str(info.value)


@pytest.mark.parametrize("domain,completion,reference", [
    ("math", r"\boxed{2}", {"answer": "2"}),
    ("mcq", "Answer: A", {"answer": "A"}),
    ("if", "short", {"constraints": [{"type": "max_words", "value": 5}]}),
    ("code", "def f():\n    return 1\n", {"tests": "assert f() == 1\n", "entry_point": "f"}),
])
def test_grade_returns_a_float_in_unit_interval(domain: str, completion: str, reference: dict) -> None:
    score = grade(domain, completion, reference)
    assert isinstance(score, float) and score == 1.0


def test_grade_rejects_non_string_completions() -> None:
    with pytest.raises(TypeError):
        grade("math", None, {"answer": "1"})  # type: ignore[arg-type]


def test_grade_batch_mixes_domains_in_order() -> None:
    domains = ["math", "code", "mcq", "code", "if"]
    completions = [r"\boxed{3}", "def f():\n    return 2\n", "Answer: C", "def f():\n    return 1\n", "hello"]
    references = [{"answer": "3"}, {"tests": "assert f() == 1\n", "entry_point": "f"}, {"answer": "C"},
                  {"tests": "assert f() == 1\n", "entry_point": "f"},
                  {"constraints": [{"type": "lowercase"}]}]
    assert grade_batch(domains, completions, references, max_workers=2) == [1.0, 0.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        grade_batch("math", ["a"], [])
