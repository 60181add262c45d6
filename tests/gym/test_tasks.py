"""Gym task families: seeded generation, disjoint splits, valid traces in both styles, noisy traces, grading."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tropd.gym import tasks
from tropd.gym.tasks import (
    ANSWER_MARKER,
    FAMILIES,
    STYLES,
    Addition,
    ModChain,
    Problem,
    SortDigits,
    get_family,
    grade,
    make_dataset,
    split_of,
)

NAMES = sorted(FAMILIES)
N = 200  # problems per family in the per-problem checks


@pytest.fixture(scope="module")
def samples() -> dict[str, list[Problem]]:
    return {name: get_family(name).problems("train", N, seed=3) for name in NAMES}


def _result(step: str) -> str:
    return step.rsplit("=", 1)[1]


# --------------------------------------------------------------------------------------------- generation


def test_registry_has_three_families_with_defaults():
    assert len(FAMILIES) >= 3
    for name, cls in FAMILIES.items():
        fam = cls()
        assert fam.name == name
        lo, hi = cls.difficulty_range
        assert lo <= fam.difficulty == cls.default_difficulty <= hi


@pytest.mark.parametrize("name", NAMES)
def test_problems_deterministic_distinct_and_prefix_stable(name):
    fam = get_family(name)
    a = fam.problems("train", 300, seed=7)
    assert a == get_family(name).problems("train", 300, seed=7)
    assert len(a) == 300 and len({p.key for p in a}) == 300
    assert fam.problems("train", 120, seed=7) == a[:120]
    b = fam.problems("train", 300, seed=8)
    assert len({p.key for p in a} & {p.key for p in b}) < 150  # another seed, mostly other problems


@pytest.mark.parametrize("name", NAMES)
def test_splits_disjoint_and_labelled(name):
    fam = get_family(name)
    split = {s: fam.problems(s, 300, seed=0) for s in ("train", "valid", "heldout")}
    for s, problems in split.items():
        assert all(p.split == s for p in problems)
    for a, b in (("train", "valid"), ("train", "heldout"), ("valid", "heldout")):
        assert not {p.key for p in split[a]} & {p.key for p in split[b]}
        assert not {p.prompt for p in split[a]} & {p.prompt for p in split[b]}


@pytest.mark.parametrize("name", NAMES)
def test_heldout_and_valid_are_each_about_a_tenth_of_the_space(name):
    fam = get_family(name)
    step = fam.space_size() // 3000
    splits = [fam.problem_at(i * step).split for i in range(3000)]
    for s in ("heldout", "valid"):
        assert 0.07 < splits.count(s) / 3000 < 0.13, s


def test_split_is_the_documented_hash_and_ignores_difficulty():
    import hashlib

    keys = ["add:345+678="] + [p.key for name in NAMES for p in get_family(name).problems("train", 100, seed=9)]
    keys += [p.key for name in NAMES for p in get_family(name).problems("heldout", 100, seed=9)]
    for key in keys:
        h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
        assert split_of(key) == {0: "heldout", 1: "valid"}.get(h % 10, "train")
    small_held = {p.key for p in Addition(2).problems("heldout", 200, seed=1)}
    big_train = {p.key for p in Addition(3).problems("train", 20000, seed=1)}
    assert small_held and not small_held & big_train


def test_exhausting_a_split_names_family_and_count():
    fam = Addition(2)
    n_held = sum(fam.problem_at(i).split == "heldout" for i in range(fam.space_size()))
    assert len(fam.problems("heldout", n_held, seed=5)) == n_held
    with pytest.raises(ValueError, match=rf"'add'.*only {n_held} 'heldout'"):
        fam.problems("heldout", n_held + 1, seed=5)
    with pytest.raises(ValueError, match=rf"'add'.*only {fam.space_size()} problems"):
        fam.problems("train", fam.space_size() + 1)


@pytest.mark.parametrize("kwargs, match", [
    ({"split": "test", "n": 1}, "split"),
    ({"split": "train", "n": -1}, "n must"),
    ({"split": "train", "n": 2.0}, "n must"),
    ({"split": "train", "n": 1, "seed": "x"}, "seed"),
])
def test_problems_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModChain().problems(**kwargs)


@pytest.mark.parametrize("name, bad", [("add", 1), ("add", 7), ("modchain", 1), ("sort", 2), ("sort", True)])
def test_bad_difficulty_names_family(name, bad):
    with pytest.raises(ValueError, match=rf"'{name}'.*difficulty"):
        get_family(name, bad)


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown task family 'mul'"):
        get_family("mul")


def test_difficulty_changes_the_space():
    assert {len(str(x)) for p in Addition(5).problems("train", 100) for x in p.data} >= {5}
    assert all(p.prompt.count("(") == 4 for p in ModChain(4).problems("train", 50))
    assert all(len(p.answer) == 7 for p in SortDigits(7).problems("train", 50))


# --------------------------------------------------------------------------------------------- answers and traces


def test_answers_are_correct(samples):
    for p in samples["add"] + samples["modchain"]:
        assert p.answer == str(eval(p.prompt[:-1]))  # our own digits-and-operators prompts
    for p in samples["sort"]:
        assert p.prompt.startswith("sort ") and p.answer == "".join(sorted(p.prompt[5:-1]))


def test_docstring_examples():
    add, mod, srt = Addition(), ModChain(), SortDigits()
    p = Problem("add", "345+678=", "1023", (345, 678))
    assert add.completion(p) == "5+8=13 4+7+1=12 3+6+1=10 #### 1023"
    assert add.completion(p, "alt") == "3+6=9 34+67=101 345+678=1023 #### 1023"
    (p,) = [q for q in (mod.problem_at(i) for i in range(mod.space_size())) if q.prompt == "((3*4)+5)%7="]
    assert mod.completion(p) == "3*4=12 12%7=5 5+5=10 10%7=3 #### 3"
    assert mod.completion(p, "alt") == "3*4=12 12+5=17 17%7=3 #### 3"
    p = srt.problem_at(53142)
    assert p.prompt == "sort 53142="
    assert srt.completion(p) == "1|5342 12|534 123|54 1234|5 #### 12345"
    assert srt.completion(p, "alt") == "3142|5 312|45 12|345 1|2345 #### 12345"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("style", STYLES)
def test_every_style_completes_with_the_answer_and_grades_one(samples, name, style):
    fam = get_family(name)
    for p in samples[name]:
        trace = fam.trace(p, style)
        assert ANSWER_MARKER not in trace and "  " not in trace and trace == trace.strip()
        c = fam.completion(p, style)
        assert c == f"{trace} #### {p.answer}"
        assert grade(p, c) == 1.0 and fam.grade(p, c) == 1.0
        assert tasks.completion(p, style) == c and tasks.trace(p, style) == trace


def test_arithmetic_steps_are_true_equations(samples):
    for name in ("add", "modchain"):
        fam = get_family(name)
        for p in samples[name]:
            for style in STYLES:
                for step in fam.steps(p, style):
                    lhs, rhs = step.split("=")
                    assert eval(lhs) == int(rhs), (p.prompt, style, step)


def test_addition_traces_reach_the_answer(samples):
    fam = Addition()
    for p in samples["add"]:
        results = [int(_result(s)) for s in fam.steps(p, "teacher")]
        digits = "".join(str(r % 10) for r in reversed(results))
        assert str(int(str(results[-1] // 10) + digits)) == p.answer  # column digits plus the last carry
        carries = [0] + [r // 10 for r in results[:-1]]
        for step, carry in zip(fam.steps(p, "teacher"), carries):  # each column adds the previous carry
            assert step.split("=")[0].count("+") == 1 + (carry > 0)
        assert _result(fam.steps(p, "alt")[-1]) == p.answer


def test_modchain_traces_reach_the_answer(samples):
    fam = ModChain()
    for p in samples["modchain"]:
        teacher, alt = fam.steps(p, "teacher"), fam.steps(p, "alt")
        assert len(teacher) == 2 * fam.difficulty and len(alt) == fam.difficulty + 1
        assert all("%" in s for s in teacher[1::2]) and sum("%" in s for s in alt) == 1
        assert _result(teacher[-1]) == p.answer == _result(alt[-1])
        for reduce_step, next_step in zip(teacher[1::2], teacher[2::2]):  # chained: the next op starts at it
            assert re.match(rf"{_result(reduce_step)}[+*]", next_step)


def test_sort_traces_are_selection_sorts(samples):
    fam = SortDigits()
    for p in samples["sort"]:
        digits = p.prompt[5:-1]
        for k, step in enumerate(fam.steps(p, "teacher"), start=1):
            done, rest = step.split("|")
            assert done == p.answer[:k] and sorted(done + rest) == sorted(digits)
        for k, step in enumerate(fam.steps(p, "alt"), start=1):
            rest, done = step.split("|")
            assert done == p.answer[-k:] and sorted(done + rest) == sorted(digits)
        assert fam.steps(p, "teacher")[-1].replace("|", "") == p.answer == fam.steps(p, "alt")[-1].replace("|", "")


@pytest.mark.parametrize("name", NAMES)
def test_alt_differs_from_teacher(samples, name):
    fam = get_family(name)
    assert all(fam.trace(p, "alt") != fam.trace(p, "teacher") for p in samples[name])


@pytest.mark.parametrize("name", NAMES)
def test_default_difficulty_is_short(samples, name):
    fam = get_family(name)
    for p in samples[name]:
        assert len(p.prompt) + len(fam.completion(p)) <= 60
        assert len(p.prompt) + len(fam.completion(p, "alt")) <= 60


def test_trace_rejects_bad_style_and_foreign_problem(samples):
    p = samples["add"][0]
    with pytest.raises(ValueError, match="'add'.*style"):
        Addition().trace(p, "fancy")
    with pytest.raises(ValueError, match="'sort' cannot trace a problem of 'add'"):
        SortDigits().completion(p)


# --------------------------------------------------------------------------------------------- grading


def _wrong(answer: str) -> str:
    return str(int(answer) + 1) if answer[0] != "0" or len(answer) == 1 else "1" + answer


@pytest.mark.parametrize("name", NAMES)
def test_wrong_answer_grades_zero(samples, name):
    fam = get_family(name)
    for p in samples[name][:50]:
        trace = fam.trace(p)
        assert grade(p, f"{trace} #### {_wrong(p.answer)}") == 0.0
        assert grade(p, f"{trace} #### {p.answer}0") == 0.0
        assert grade(p, f"{trace} #### {p.answer}.") == 0.0
        assert grade(p, f"{trace} {p.answer}") == 0.0  # no marker
        assert grade(p, f"{trace} ####\n  {p.answer} \n") == 1.0  # surrounding whitespace is stripped


def test_grade_edge_cases():
    p = Addition().problem_at(0)  # 10+10=, answer "20"
    assert p.answer == "20"
    cases = {
        "": 0.0, "20": 0.0, "####": 0.0, "#### ": 0.0, "####20": 1.0, "#### 20": 1.0, "x #### 20 ": 1.0,
        "#### 21 #### 20": 1.0, "#### 20 #### 21": 0.0, "#### 20 ####": 0.0, "##### 20": 1.0, "### 20": 0.0,
        "#### 2 0": 0.0, "#### +20": 0.0, "#### 020": 0.0, "#### 20<eos>": 0.0,
    }
    for text, expected in cases.items():
        assert grade(p, text) == expected, text
    for junk in (None, 20, b"#### 20", ["#### 20"]):
        assert grade(p, junk) == 0.0


@given(st.text())
@settings(max_examples=300, deadline=None)
def test_grade_never_raises_and_the_last_marker_wins(text):
    p = ModChain().problem_at(1234)
    assert grade(p, text) in (0.0, 1.0)
    assert grade(p, f"{text} #### {p.answer}") == 1.0
    if ANSWER_MARKER not in text:
        assert grade(p, f"#### {p.answer} {text}") == float(text.strip() == "")


# --------------------------------------------------------------------------------------------- noisy traces


def _diff(a: str, b: str) -> list[bool]:
    sa, sb = a.split(" "), b.split(" ")
    assert len(sa) == len(sb)
    return [x != y for x, y in zip(sa, sb)]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("noise", [0.1, 0.3, 0.7])
def test_noisy_rate_matches_and_answer_stays(samples, name, noise):
    fam = get_family(name)
    flags = []
    for p in samples[name]:
        c = fam.noisy_completion(p, noise, seed=11)
        assert grade(p, c) == 1.0 and c.endswith(f" #### {p.answer}")
        noisy = fam.noisy_trace(p, noise, seed=11)
        assert len(noisy) == len(fam.trace(p))
        flags += _diff(noisy, fam.trace(p))
    rate = sum(flags) / len(flags)
    assert abs(rate - noise) < 4 * math.sqrt(noise * (1 - noise) / len(flags)), rate


@pytest.mark.parametrize("name", NAMES)
def test_noise_extremes_seeds_and_nesting(samples, name):
    fam = get_family(name)
    for p in samples[name][:60]:
        teacher = fam.trace(p)
        assert fam.noisy_trace(p, 0.0, seed=1) == teacher
        assert all(_diff(fam.noisy_trace(p, 1.0, seed=1), teacher))
        assert fam.noisy_trace(p, 0.5, seed=4) == fam.noisy_trace(p, 0.5, seed=4)
        low, high = fam.noisy_trace(p, 0.2, seed=4).split(" "), fam.noisy_trace(p, 0.6, seed=4).split(" ")
        for step_low, step_high, step in zip(low, high, teacher.split(" ")):
            assert step_low == step or step_low == step_high  # corrupted at 0.2 => same corruption at 0.6
    seeds = {tuple(fam.noisy_trace(p, 0.5, seed=s) for p in samples[name][:20]) for s in range(3)}
    assert len(seeds) == 3


def test_corrupted_arithmetic_steps_are_false_and_well_formed(samples):
    for name in ("add", "modchain"):
        fam = get_family(name)
        for p in samples[name]:
            for step in fam.noisy_trace(p, 1.0, seed=2).split(" "):
                lhs, rhs = step.split("=")
                assert eval(lhs) != int(rhs)
                assert not re.search(r"(?<!\d)0\d", rhs)  # no leading zero


@pytest.mark.parametrize("noise", [-0.1, 1.5, float("nan"), "0.3", None])
def test_noise_out_of_range(samples, noise):
    with pytest.raises(ValueError, match="'sort'.*noise"):
        SortDigits().noisy_trace(samples["sort"][0], noise)


# --------------------------------------------------------------------------------------------- mixed datasets


def test_make_dataset_interleaves_deterministically():
    data = make_dataset(["add", "sort", "modchain"], "train", 100, seed=2)
    assert data == make_dataset(["add", "sort", "modchain"], "train", 100, seed=2)
    assert len(data) == 100 and len({p.key for p in data}) == 100
    assert [p.family for p in data[:6]] == ["add", "sort", "modchain"] * 2
    counts = {name: sum(p.family == name for p in data) for name in NAMES}
    assert counts == {"add": 34, "sort": 33, "modchain": 33}
    assert all(p.split == "train" for p in data)
    assert [p for p in data if p.family == "sort"] == SortDigits().problems("train", 33, seed=2)
    held = make_dataset(["add", "sort", "modchain"], "heldout", 60, seed=2)
    assert not {p.key for p in held} & {p.key for p in data}
    assert make_dataset(["sort"], "train", 0) == []


def test_make_dataset_accepts_instances_and_rejects_bad_lists():
    data = make_dataset([Addition(5), "sort"], "heldout", 10, seed=0)
    assert data[0].family == "add" and len(data[0].prompt) > 9
    for bad, match in (([], "non-empty"), ("add", "non-empty"), (["add", "add"], "once"),
                       (["add", Addition(2)], "once"), (["nope"], "unknown")):
        with pytest.raises(ValueError, match=match):
            make_dataset(bad, "train", 4)
    with pytest.raises(ValueError, match="'add'.*only"):
        make_dataset([Addition(2)], "heldout", 5000)
