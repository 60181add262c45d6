"""pass@k against brute-force enumeration, avg@n, and per-task aggregation."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tropd.eval.metrics import avg_at_n, count_correct, pass_at_k, summarize


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of the k-subsets of n samples (c correct) that contain at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_known_values() -> None:
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    assert pass_at_k(5, 1, 5) == 1.0
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)


@given(n=st.integers(1, 400), data=st.data())
def test_stable_for_large_n(n: int, data: st.DataObject) -> None:
    c = data.draw(st.integers(0, n))
    k = data.draw(st.integers(1, n))
    value = pass_at_k(n, c, k)
    assert 0.0 <= value <= 1.0 and math.isfinite(value)
    exact = 1.0 - math.comb(n - c, k) / math.comb(n, k)  # exact integers, one rounding
    assert value == pytest.approx(exact, abs=1e-9)
    if k < n:
        assert pass_at_k(n, c, k + 1) >= value - 1e-12  # more tries never hurt


@pytest.mark.parametrize("n,c,k", [(0, 0, 1), (5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_invalid_arguments(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_avg_at_n_and_count_correct() -> None:
    assert avg_at_n([1.0, 0.0, 0.5, 0.5]) == 0.5
    assert count_correct([1.0, 0.999, 0.5, 1.0]) == 2
    assert count_correct([0.6, 0.4], threshold=0.5) == 1
    with pytest.raises(ValueError):
        avg_at_n([])


def test_summarize_averages_per_problem() -> None:
    results = {
        "math": {"p1": [1.0, 1.0, 0.0, 0.0], "p2": [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]},
        "if": {"q": [0.5, 1.0]},
    }
    summary = summarize(results, ks=(1, 2))
    math_row = summary["math"]
    assert math_row["avg@n"] == pytest.approx((0.5 + 0.0) / 2)  # each problem weighs the same
    assert math_row["pass@1"] == pytest.approx(0.25)
    assert math_row["pass@2"] == pytest.approx((brute_force_pass_at_k(4, 2, 2) + 0.0) / 2)
    assert math_row["problems"] == 2 and math_row["samples"] == 10
    assert summary["if"]["avg@n"] == 0.75 and summary["if"]["pass@1"] == 0.5
    with pytest.raises(ValueError, match="pass@5"):
        summarize(results, ks=(5,))
