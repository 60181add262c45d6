"""Task suites: registry, determinism, disjoint splits, gradeable references."""

from __future__ import annotations

import pytest

from tropd.tasks import Example, get_suite, grade, list_suites
from tropd.tasks.suites import split_of

GENERATED = ["math", "math-l1", "math-l2", "math-l3", "code", "if", "mcq"]


def test_registry() -> None:
    names = list_suites()
    assert set(GENERATED) | {"humaneval"} == set(names)
    domains = {get_suite(n).domain for n in names}
    assert domains == {"math", "code", "if", "mcq"}
    with pytest.raises(ValueError, match="math"):
        get_suite("nope")


@pytest.mark.parametrize("name", GENERATED)
def test_examples_are_deterministic_and_seed_dependent(name: str) -> None:
    suite = get_suite(name)
    first = suite.examples("train", 20, seed=7)
    again = suite.examples("train", 20, seed=7)
    other = suite.examples("train", 20, seed=8)
    assert first == again
    assert [e.id for e in first] != [e.id for e in other]
    assert len({e.id for e in first}) == 20  # distinct problems
    for example in first:
        assert isinstance(example, Example) and example.domain == suite.domain and example.prompt.strip()


@pytest.mark.parametrize("name", GENERATED)
def test_splits_are_disjoint(name: str) -> None:
    suite = get_suite(name)
    train = {e.id for seed in (0, 1) for e in suite.examples("train", 150, seed=seed)}
    test = {e.id for seed in (0, 1) for e in suite.examples("test", 60, seed=seed)}
    assert train and test and not train & test


def test_split_is_a_property_of_the_problem_not_the_seed() -> None:
    family_keys = [("math", f"shopping|1|{i},2,3,4") for i in range(400)]
    splits = [split_of(f, k) for f, k in family_keys]
    assert splits == [split_of(f, k) for f, k in family_keys]
    assert 0.1 < splits.count("test") / len(splits) < 0.3


def test_math_levels_share_the_family_split() -> None:
    level1_test = {e.id for e in get_suite("math-l1").examples("test", 40, seed=0)}
    mixed_train = {e.id for e in get_suite("math").examples("train", 400, seed=0)}
    assert not level1_test & mixed_train
    assert {e.meta["level"] for e in get_suite("math-l3").examples("train", 10)} == {3}


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="split"):
        get_suite("math").examples("validation", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        get_suite("math").examples("train", -1)
    with pytest.raises(ValueError, match="test"):
        get_suite("humaneval").examples("train", 1)
    with pytest.raises(ValueError, match="164"):
        get_suite("humaneval").examples("test", 500)
    assert get_suite("math").examples("train", 0) == []


def test_math_references_grade_their_own_answers() -> None:
    for example in get_suite("math").examples("test", 60, seed=2):
        assert "\\boxed{}" in example.prompt
        answer = example.reference["answer"]
        assert grade("math", f"Reasoning... so the answer is \\boxed{{{answer}}}.", example.reference) == 1.0
        assert grade("math", "Reasoning... \\boxed{0.123456}", example.reference) == 0.0


def test_mcq_references_point_at_the_correct_option() -> None:
    from tropd.tasks.mcq_gen import FAMILIES

    examples = get_suite("mcq").examples("train", 300, seed=4)
    assert {e.meta["family"] for e in examples} == set(FAMILIES)
    letters = {e.reference["answer"] for e in examples}
    assert letters == set("ABCD")  # the correct option is shuffled
    for example in examples[:50]:
        letter = example.reference["answer"]
        option = example.reference["choices"]["ABCD".index(letter)]
        assert f"{letter}) {option}" in example.prompt
        assert grade("mcq", f"Working... Answer: {letter}", example.reference) == 1.0
        wrong = "A" if letter != "A" else "B"
        assert grade("mcq", f"Answer: {wrong}", example.reference) == 0.0


def test_mcq_correct_options_are_right() -> None:
    """Spot-check the generator's arithmetic on families with closed forms."""
    import re
    from fractions import Fraction

    for example in get_suite("mcq").examples("train", 300, seed=9):
        correct = example.reference["choices"]["ABCD".index(example.reference["answer"])]
        question = example.prompt.split("\n")[0]
        numbers = [Fraction(x) for x in re.findall(r"\d+(?:\.\d+)?", question)]
        if example.meta["family"] == "force":
            assert Fraction(correct.split()[0]) == numbers[0] * numbers[1]
        if example.meta["family"] == "percent":
            assert Fraction(correct) == numbers[0] * numbers[1] / 100
        if example.meta["family"] == "ohm":
            assert Fraction(correct.split()[0]) == numbers[0] * numbers[1]


def test_code_examples_have_hidden_tests_and_entry_point() -> None:
    for example in get_suite("code").examples("train", 30, seed=1):
        tests = example.reference["tests"]
        assert tests.startswith("def check(candidate):") and tests.count("assert") >= 5
        assert f"`{example.reference['entry_point']}(" in example.prompt
        assert "```python" in example.prompt


def test_humaneval_sample_is_seeded_and_ordered() -> None:
    suite = get_suite("humaneval")
    a = suite.examples("test", 10, seed=1)
    assert a == suite.examples("test", 10, seed=1)
    assert [e.id for e in a] == sorted((e.id for e in a), key=lambda i: int(i.split("/")[1]))
    assert len(suite.examples("test", 164)) == 164


def test_math_answers_recomputed_from_the_text() -> None:
    """Independent recomputation for two templates whose level-1 text states every number."""
    import re
    from fractions import Fraction

    checked = 0
    for example in get_suite("math-l1").examples("train", 200, seed=3):
        nums = [int(x) for x in re.findall(r"\d+", example.prompt.split("\n")[0])]
        answer = Fraction(example.reference["answer"])
        if example.meta["template"] == "shopping":
            a, p, b, q = nums
            assert answer == a * p + b * q
            checked += 1
        elif example.meta["template"] == "wages":
            rate, hours, days = nums
            assert answer == rate * hours * days
            checked += 1
    assert checked >= 10


def test_math_answers_are_short_exact_numbers() -> None:
    from fractions import Fraction

    for example in get_suite("math").examples("train", 300, seed=6):
        value = Fraction(example.reference["answer"])
        assert value > 0 and (value * 100).denominator == 1
