"""Instruction-following grader: each constraint type, strict vs loose, prompt vs instruction level."""

from __future__ import annotations

import json

import pytest

from tropd.tasks import grade
from tropd.tasks.instruct import (CONSTRAINT_TYPES, SpecError, count_sentences, count_words, evaluate,
                                  validate_spec)

LOREM = "The river runs north. It is cold! Do you swim? We do."

CASES = [
    # (response, constraint, strict outcome)
    ("one two three", {"type": "max_words", "value": 3}, True),
    ("one two three four", {"type": "max_words", "value": 3}, False),
    ("don't stop", {"type": "min_words", "value": 3}, True),  # "don't" is two words, as in IFEval
    (LOREM, {"type": "max_sentences", "value": 4}, True),
    (LOREM, {"type": "max_sentences", "value": 3}, False),
    (LOREM, {"type": "min_sentences", "value": 4}, True),
    ("First part.\n\nSecond part.\n\n\nThird.", {"type": "paragraphs", "value": 3}, True),
    ("First part.\nSecond line, same paragraph.", {"type": "paragraphs", "value": 2}, False),
    ("* a\n* b\n- c", {"type": "bullet_points", "value": 3}, True),
    ("* a\n* b\n**bold** text", {"type": "bullet_points", "value": 3}, False),
    ("The Honeybee hive hums.", {"type": "include_keywords", "keywords": ["hive", "honeybee"]}, True),
    ("The hives hum.", {"type": "include_keywords", "keywords": ["hive"]}, False),  # whole words only
    ("This is fine.", {"type": "forbidden_words", "keywords": ["really", "very"]}, True),
    ("This is Really fine.", {"type": "forbidden_words", "keywords": ["really"]}, False),
    ("tea, tea and more Tea", {"type": "keyword_frequency", "keyword": "tea", "relation": "at_least", "value": 3},
     True),
    ("tea, tea and more Tea", {"type": "keyword_frequency", "keyword": "tea", "relation": "at_most", "value": 2},
     False),
    ('{"a": 1, "b": [2, 3]}', {"type": "json_format"}, True),
    ('```json\n{"a": 1}\n```', {"type": "json_format"}, True),
    ("{'a': 1}", {"type": "json_format"}, False),
    ("all lower case here.", {"type": "lowercase"}, True),
    ("Not all lower.", {"type": "lowercase"}, False),
    ("ALL UPPER 123.", {"type": "uppercase"}, True),
    ("  Here is my answer.", {"type": "starts_with", "value": "here is"}, True),
    ("Well, here is my answer.", {"type": "starts_with", "value": "Here is"}, False),
    ("Bye. That is all.  ", {"type": "ends_with", "value": "That is all."}, True),
    ("That is all. Bye.", {"type": "ends_with", "value": "That is all."}, False),
    ("no commas at all", {"type": "no_commas"}, True),
    ("one, two", {"type": "no_commas"}, False),
    ("<<A Title>>\nbody", {"type": "title"}, True),
    ("<A Title>\nbody", {"type": "title"}, False),
    ("Dear [name], at [address].", {"type": "placeholders", "value": 2}, True),
    ("Dear [name].", {"type": "placeholders", "value": 2}, False),
    ("*one* and *two*", {"type": "highlights", "value": 2}, True),
    ("*one* and ** ", {"type": "highlights", "value": 2}, False),
    ('"quoted answer"', {"type": "quotation"}, True),
    ('"unbalanced', {"type": "quotation"}, False),
    ("Main text.\n\nP.S. remember this", {"type": "postscript", "marker": "P.S."}, True),
    ("Main text. PS remember", {"type": "postscript", "marker": "P.S."}, False),
    ("Section 1\nintro\nSection 2\nend", {"type": "sections", "value": 2, "marker": "Section"}, True),
    ("Section 1\nintro", {"type": "sections", "value": 2, "marker": "Section"}, False),
]


def test_every_constraint_type_is_covered() -> None:
    assert {case[1]["type"] for case in CASES} == set(CONSTRAINT_TYPES)


@pytest.mark.parametrize("response,constraint,expected", CASES)
def test_constraint_table(response: str, constraint: dict, expected: bool) -> None:
    assert grade("if", response, {"constraints": [constraint]}) == float(expected)


def test_counting_helpers() -> None:
    assert count_words("Hello, world! It's 2024.") == 5
    assert count_sentences("One. Two! Three? Four") == 4
    assert count_sentences("") == 0


def test_prompt_level_is_all_or_nothing_and_partial_is_the_fraction() -> None:
    reference = {"constraints": [{"type": "lowercase"}, {"type": "max_words", "value": 2}, {"type": "no_commas"}]}
    response = "three small words"
    assert grade("if", response, reference) == 0.0
    assert grade("if", response, {**reference, "partial": True}) == pytest.approx(2 / 3)


def test_loose_removes_first_and_last_lines_and_asterisks() -> None:
    reference = {"constraints": [{"type": "json_format"}]}
    response = 'Sure! Here is the JSON:\n{"topic": "tea"}\nHope this helps.'
    assert grade("if", response, reference) == 0.0
    assert grade("if", response, {**reference, "loose": True}) == 1.0
    lowercase = {"constraints": [{"type": "starts_with", "value": "the answer"}]}
    assert grade("if", "**The answer** is here", lowercase) == 0.0
    assert grade("if", "**The answer** is here", {**lowercase, "loose": True}) == 1.0


def test_evaluate_reports_all_four_accuracies() -> None:
    reference = {"constraints": [{"type": "json_format"}, {"type": "uppercase"}]}
    result = evaluate('Intro line\n{"A": 1}', reference)
    assert result.strict == (False, False)
    assert result.loose == (True, True)
    assert (result.prompt_strict, result.prompt_loose) == (0.0, 1.0)
    assert (result.instruction_strict, result.instruction_loose) == (0.0, 1.0)


def test_empty_response_meets_nothing() -> None:
    assert grade("if", "   ", {"constraints": [{"type": "max_words", "value": 10}], "partial": True}) == 0.0


@pytest.mark.parametrize("reference,field", [
    ({}, "constraints"),
    ({"constraints": []}, "constraints"),
    ({"constraints": [{"type": "nope"}]}, "constraints[0].type"),
    ({"constraints": [{"type": "max_words"}]}, "constraints[0].value"),
    ({"constraints": [{"type": "max_words", "value": 0}]}, "constraints[0].value"),
    ({"constraints": [{"type": "lowercase"}, {"type": "include_keywords", "keywords": []}]}, "constraints[1].keywords"),
    ({"constraints": [{"type": "keyword_frequency", "keyword": "a", "value": 1, "relation": "about"}]},
     "constraints[0].relation"),
    ({"constraints": [{"type": "lowercase"}], "loose": "yes"}, "loose"),
])
def test_invalid_specs_name_the_field(reference: dict, field: str) -> None:
    with pytest.raises(SpecError) as info:
        validate_spec(reference)
    assert info.value.field == field
    with pytest.raises(ValueError):
        grade("if", "text", reference)


def test_generated_prompts_have_valid_compatible_constraints() -> None:
    from tropd.tasks import get_suite
    from tropd.tasks.instruct_gen import _conflicts

    for example in get_suite("if").examples("train", 200, seed=5):
        validate_spec(example.reference)
        kinds = [c["type"] for c in example.reference["constraints"]]
        assert 1 <= len(kinds) <= 3
        assert not any(_conflicts(a, b) for i, a in enumerate(kinds) for b in kinds[i + 1:])
        assert json.dumps(example.reference)  # serialisable
