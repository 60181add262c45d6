"""Gym statistics: t distribution, mean CIs, paired tests, the collapse rule, summaries, report and plot."""

from __future__ import annotations

import math

import pytest

from tropd.gym import stats
from tropd.gym.stats import (
    COLLAPSE_RULE,
    betainc,
    collapse_reasons,
    collapsed,
    comparisons,
    mean_ci,
    paired_test,
    plot,
    summarise,
    t_cdf,
    t_ppf,
    t_sf2,
    write_markdown,
)

T_975_2 = 4.302652729749464  # t_{0.975} with 2 dof (table value)

# ----------------------------------------------------------------------------------------------- t distribution


@pytest.mark.parametrize(("t", "dof"), [(2.262, 9), (2.776, 4), (12.706, 1), (2.228, 10), (1.960, 100_000)])
def test_t_two_sided_p_matches_table(t, dof):
    assert t_sf2(t, dof) == pytest.approx(0.05, abs=1e-3)
    assert t_sf2(-t, dof) == pytest.approx(0.05, abs=1e-3)


@pytest.mark.parametrize("t", [-30.0, -2.5, -0.3, 0.0, 0.7, 1.0, 4.0, 100.0])
def test_t_cdf_closed_forms(t):
    # dof 1 is the Cauchy distribution; dof 2 has CDF 1/2 + t / (2 sqrt(2 + t^2)).
    assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
    assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


def test_betainc_closed_forms_and_bounds():
    for x in (0.0, 0.01, 0.3, 0.5, 0.77, 0.999, 1.0):
        assert betainc(1, 1, x) == pytest.approx(x, abs=1e-13)
        assert betainc(3.5, 1, x) == pytest.approx(x**3.5, abs=1e-13)
        assert betainc(1, 2.5, x) == pytest.approx(1 - (1 - x) ** 2.5, abs=1e-13)
    assert betainc(2, 3, 0.4) + betainc(3, 2, 0.6) == pytest.approx(1.0, abs=1e-13)  # symmetry
    with pytest.raises(ValueError):
        betainc(1, 1, 1.5)


@pytest.mark.parametrize(("dof", "expected"), [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)])
def test_t_ppf_table_and_inverse(dof, expected):
    q = t_ppf(0.975, dof)
    assert q == pytest.approx(expected, abs=1e-3)
    assert t_cdf(q, dof) == pytest.approx(0.975, abs=1e-10)
    assert t_ppf(0.025, dof) == pytest.approx(-q, abs=1e-10)


# ----------------------------------------------------------------------------------------------- mean_ci


def test_mean_ci_hand_computation():
    # [1, 2, 3, 4]: mean 2.5, s = sqrt(5/3), half-width = t_{0.975,3} * s / 2 with t_{0.975,3} = 3.182446.
    mean, hw = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert mean == pytest.approx(2.5)
    assert hw == pytest.approx(3.182446 * math.sqrt(5 / 3) / 2, abs=1e-5)
    assert mean_ci([1.0, math.nan, 2.0, 3.0, 4.0]) == pytest.approx((mean, hw))  # NaN ignored


def test_mean_ci_small_samples():
    mean, hw = mean_ci([0.3])
    assert mean == 0.3 and math.isnan(hw)
    assert all(math.isnan(v) for v in mean_ci([]))
    assert all(math.isnan(v) for v in mean_ci([math.nan]))


# ----------------------------------------------------------------------------------------------- paired_test


def test_paired_test_three_positive_differences():
    a, b = [2.0, 4.0, 6.0], [1.0, 2.0, 3.0]  # differences 1, 2, 3: mean 2, s = 1
    r = paired_test(a, b)
    assert r["n"] == 3
    assert r["mean_diff"] == pytest.approx(2.0)
    assert r["half_width"] == pytest.approx(T_975_2 / math.sqrt(3), abs=1e-9)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((2 - r["half_width"], 2 + r["half_width"]))
    t = 2 / (1 / math.sqrt(3))
    assert r["t"] == pytest.approx(t)
    assert r["p_t"] == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-10)  # dof-2 closed form
    assert r["p_perm"] == pytest.approx(2 / 8)  # only all-plus and all-minus are as extreme


def test_paired_test_exact_sign_flip_mixed_signs():
    # |differences| = 1..4, sum 6: |10 - 2 S| >= 6 for flipped-subset sums S <= 2 or >= 8: 6 of 16 assignments.
    r = paired_test([2.0, 0.0, 3.0, 4.0], [1.0, 2.0, 0.0, 0.0])
    assert r["p_perm"] == pytest.approx(6 / 16)
    swapped = paired_test([1.0, 2.0, 0.0, 0.0], [2.0, 0.0, 3.0, 4.0])
    assert swapped["mean_diff"] == pytest.approx(-r["mean_diff"])
    assert swapped["p_perm"] == r["p_perm"] and swapped["p_t"] == pytest.approx(r["p_t"])


def test_paired_test_identical_inputs():
    r = paired_test([0.3, 0.5, 0.7], [0.3, 0.5, 0.7])
    assert r["mean_diff"] == 0 and r["half_width"] == 0
    assert r["p_t"] == 1.0 and r["p_perm"] == 1.0


def test_paired_test_drops_nan_pairs_and_checks_lengths():
    r = paired_test([2.0, math.nan, 4.0, 6.0], [1.0, 5.0, 2.0, 3.0])
    assert r["n"] == 3 and r["p_perm"] == pytest.approx(0.25)
    with pytest.raises(ValueError):
        paired_test([1.0, 2.0], [1.0])


def test_paired_test_random_flips_for_many_seeds():
    n = 20  # > 16: 20000 seeded random flips; only 2 of 2^20 assignments are as extreme as all-positive
    r = paired_test([1.0 + 0.01 * i for i in range(n)], [0.0] * n)
    assert r["p_perm"] == pytest.approx(1 / 20_001, rel=0.5)
    assert paired_test([1.0 + 0.01 * i for i in range(n)], [0.0] * n) == r  # seeded: reproducible
    mixed = paired_test([(-1.0) ** i for i in range(n)], [0.0] * n)  # mean 0: every assignment is as extreme
    assert mixed["p_perm"] == 1.0


# ----------------------------------------------------------------------------------------------- collapse rule

CONTEXT = {"teacher_accuracy": 0.97, "teacher_distinct": 0.75, "heldout_problems": 600,
           "mismatch_start": {"teacher": {"accuracy": 0.4, "teacher_nll": 0.5},
                              "alt": {"accuracy": 0.2, "teacher_nll": 1.1}}}


def _healthy(**overrides) -> dict:
    run = {"mismatch": "alt", "method": "tropd", "seed": 0, "eval_steps": [0, 50, 100],
           "accuracy": [0.4, 0.6, 0.55], "distinct": [0.7, 0.7, 0.7], "teacher_nll": [1.0, 0.8, 0.7],
           "entropy": [0.5] * 20, "grad_norm": [1.0] * 20, "steps": 20, "wall_s": 10.0}
    return {**run, **overrides}


def test_collapse_rule_branches():
    assert "0.2" in COLLAPSE_RULE and "half the teacher" in COLLAPSE_RULE and "0.05" in COLLAPSE_RULE
    assert not collapsed(_healthy(), CONTEXT)
    # (a) final more than 0.2 below the run's own peak
    assert collapsed(_healthy(accuracy=[0.4, 0.8, 0.55]), CONTEXT)
    assert not collapsed(_healthy(accuracy=[0.4, 0.8, 0.61]), CONTEXT)
    assert collapsed(_healthy(accuracy=[0.7, 0.5, 0.45]), CONTEXT)  # the step-0 eval counts as a peak
    # (b) final distinct ratio below half the teacher's (0.375)
    assert collapsed(_healthy(distinct=[0.7, 0.7, 0.37]), CONTEXT)
    assert not collapsed(_healthy(distinct=[0.1, 0.1, 0.38]), CONTEXT)
    # (c) mean entropy of the last 10% of training steps (here 2 of 20) below 0.05, final accuracy not above the
    # start (0.4): a student that became confident and better has converged
    worse = [0.4, 0.5, 0.38]
    assert collapsed(_healthy(accuracy=worse, entropy=[0.5] * 18 + [0.01, 0.01]), CONTEXT)
    assert collapsed(_healthy(accuracy=[0.4, 0.5, 0.4], entropy=[0.5] * 18 + [0.01, 0.01]), CONTEXT)
    assert not collapsed(_healthy(entropy=[0.5] * 18 + [0.01, 0.01]), CONTEXT)  # final 0.55 > start 0.4
    assert not collapsed(_healthy(accuracy=worse, entropy=[0.5] * 19 + [0.01]), CONTEXT)  # tail mean 0.255
    assert not collapsed(_healthy(accuracy=worse, entropy=[0.01] * 18 + [0.5, 0.5]), CONTEXT)  # early: fine
    assert collapsed(_healthy(accuracy=worse, entropy=[0.5, 0.5, 0.04]), CONTEXT)  # short runs: at least one step


def test_collapse_reasons_name_each_branch_and_missing_data_is_not_collapse():
    run = _healthy(accuracy=[0.4, 0.8, 0.35], distinct=[0.7, 0.7, 0.2], entropy=[0.01] * 20)
    assert len(collapse_reasons(run, CONTEXT)) == 3
    bare = {k: v for k, v in _healthy().items() if k not in ("distinct", "entropy")}
    assert not collapsed(bare, {})


# ----------------------------------------------------------------------------------------------- summarise

FINALS = {("teacher", "opd"): [0.5, 0.6, 0.7], ("teacher", "tropd"): [0.6, 0.7, 0.8],
          ("alt", "opd"): [0.3, 0.4, 0.5], ("alt", "tropd"): [0.4, 0.5, 0.6]}


def _synthetic_runs() -> list[dict]:
    runs = []
    for (mismatch, method), finals in FINALS.items():
        start = CONTEXT["mismatch_start"][mismatch]["accuracy"]
        for seed, final in enumerate(finals):
            collapse = mismatch == "alt" and method == "tropd" and seed == 1
            runs.append({"mismatch": mismatch, "method": method, "seed": seed, "eval_steps": [0, 50, 100],
                         "accuracy": [start, (start + final) / 2, final],
                         "distinct": [0.7, 0.7, 0.2 if collapse else 0.6 + 0.1 * seed],
                         "teacher_nll": [1.0, 0.9, 0.5 + 0.1 * seed],
                         "entropy": [0.5] * 10,
                         "grad_norm": [1.0 + seed, 2.0 + seed, math.nan, 10.0 * (seed + 1)],
                         "steps": 10, "wall_s": 5.0 + seed})
    return runs


def test_summarise_known_means():
    rows = summarise(_synthetic_runs(), CONTEXT)
    assert [(r["mismatch"], r["method"]) for r in rows] == list(FINALS)
    hw = T_975_2 * 0.1 / math.sqrt(3)  # the finals of every cell are m - 0.1, m, m + 0.1
    for r in rows:
        start = CONTEXT["mismatch_start"][r["mismatch"]]["accuracy"]
        final = sum(FINALS[(r["mismatch"], r["method"])]) / 3
        assert r["n"] == 3 and r["seeds"] == [0, 1, 2]
        assert r["final_acc"] == pytest.approx(final) and r["final_acc_ci"] == pytest.approx(hw)
        assert r["best_acc"] == pytest.approx(final)
        assert r["gain"] == pytest.approx(final - start) and r["gain_ci"] == pytest.approx(hw)
        assert r["auc"] == pytest.approx((start + final) / 2) and r["auc_ci"] == pytest.approx(hw / 2)
        assert r["collapsed"] == (1 if (r["mismatch"], r["method"]) == ("alt", "tropd") else 0)
        # grad norms 1,2,10 | 2,3,20 | 3,4,30 (NaN dropped): p50 3, p99 at index 7.92 of the sorted 9 -> 29.2
        assert (r["grad_p50"], r["grad_p99"], r["grad_max"]) == pytest.approx((3.0, 29.2, 30.0))
        distinct = (0.6 + 0.2 + 0.8) / 3 if r["collapsed"] else 0.7  # seed 1 of the collapsed cell ends at 0.2
        assert r["final_teacher_nll"] == pytest.approx(0.6) and r["final_distinct"] == pytest.approx(distinct)
        assert r["wall_s"] == pytest.approx(6.0)


def test_summarise_gain_falls_back_to_context_start_and_rejects_duplicates():
    run = _healthy(eval_steps=[25, 50, 100], mismatch="alt")  # no eval at step 0: start from the context (0.2)
    (row,) = summarise([run], CONTEXT)
    assert row["gain"] == pytest.approx(0.55 - 0.2) and math.isnan(row["gain_ci"]) and row["n"] == 1
    with pytest.raises(ValueError, match="duplicate"):
        summarise([_healthy(), _healthy()], CONTEXT)


# ----------------------------------------------------------------------------------------------- comparisons


def test_comparisons_per_mismatch_and_metric():
    comps = comparisons(_synthetic_runs(), a="tropd", b="opd")
    assert [(c["mismatch"], c["metric"]) for c in comps] == [
        ("teacher", "final_accuracy"), ("teacher", "accuracy_auc"), ("alt", "final_accuracy"), ("alt", "accuracy_auc")]
    for c in comps:
        assert c["n"] == 3 and c["seeds"] == [0, 1, 2]
        assert c["mean_diff"] == pytest.approx(0.1 if c["metric"] == "final_accuracy" else 0.05)
        assert c["better"] == "tropd" and c["ci_excludes_zero"]
        assert c["p_perm"] == pytest.approx(0.25)
    reverse = comparisons(_synthetic_runs(), a="opd", b="tropd")
    assert all(c["better"] == "tropd" and c["mean_diff"] < 0 for c in reverse)


def test_comparisons_use_only_common_seeds():
    runs = [r for r in _synthetic_runs() if not (r["method"] == "opd" and r["seed"] == 2)]
    runs += [_healthy(mismatch="noisy", method="tropd")]  # no opd at this level: skipped
    comps = comparisons(runs)
    assert {c["mismatch"] for c in comps} == {"teacher", "alt"}
    assert all(c["n"] == 2 and c["seeds"] == [0, 1] for c in comps)


# ----------------------------------------------------------------------------------------------- report and plot


def test_write_markdown(tmp_path):
    runs = _synthetic_runs() + [_healthy(mismatch="teacher", method="gkd", accuracy=[0.4, 0.5, 0.413])]
    summary = summarise(runs, CONTEXT)
    path = tmp_path / "report.md"
    meta = {"command": "python -m tropd gym --quick", "machine": "2-core CPU", "duration": 125.0, "plot": "acc.png"}
    write_markdown(summary, comparisons(runs), CONTEXT, path, meta)
    text = path.read_text()
    for needle in ("tropd", "opd", "gkd", "python -m tropd gym --quick", "2-core CPU", "2 min 5 s", "97.0",
                   "## Mismatch teacher", "## Mismatch alt", "![held-out accuracy over training](acc.png)",
                   COLLAPSE_RULE, "| gkd | 1 | 41.3 |", "70.0 ± 24.8", "40.0 ± 24.8", "+30.0 ± 24.8", "1/3"):
        assert needle in text, needle
    teacher_table = text.split("## Mismatch teacher")[1].split("## Mismatch alt")[0]
    rows = [ln for ln in teacher_table.splitlines() if ln.startswith("| ") and "method" not in ln]
    order = [ln.split("|")[1].strip() for ln in rows]
    assert order == ["tropd", "opd", "gkd"]  # best final accuracy first
    comp_section = text.split("## Paired comparison")[1]
    assert "| teacher | tropd − opd | final_accuracy | 3 | +10.0 |" in comp_section and "0.250" in comp_section


def test_knob_table_and_plot_for_numeric_mismatch(tmp_path):
    """With the knob's numeric values the report has one row per method across the values (final accuracy and
    gain), the context's starts are found by the value's name, and the plot puts the values on a numeric axis."""
    runs = [_healthy(mismatch=m, method=meth, seed=s, eval_steps=[0, 50],
                     accuracy=[0.5 - m / 4, 0.5 - m / 4 + (0.2 if meth == "opd" else 0.1) - 0.01 * s])
            for m in (0.0, 0.4, 1.0) for meth in ("opd", "tropd") for s in range(3)]
    context = {**CONTEXT, "mismatch_start": {"0": {"accuracy": 0.5}, "0.4": {"accuracy": 0.4},
                                             "1": {"accuracy": 0.25}}}
    assert stats.start_accuracy({**runs[0], "eval_steps": [50]}, context) == 0.5
    summary = summarise(runs, context)
    path = tmp_path / "r.md"
    write_markdown(summary, comparisons(runs), context, path, {})
    text = path.read_text()
    knob = text.split("## Final accuracy along the mismatch knob")[1].split("## Mismatch 0")[0]
    assert "| method | mismatch 0 | mismatch 0.4 | mismatch 1 |" in knob
    assert "| opd | 69.0 ± 2.5 (+19.0 ± 2.5) | 59.0 ± 2.5 (+19.0 ± 2.5) | 44.0 ± 2.5 (+19.0 ± 2.5) |" in knob
    assert "## Mismatch 0.4" in text and "| 0.4 | tropd − opd |" in text
    plot(runs, tmp_path / "k.png", context)
    assert _is_png(tmp_path / "k.png")


def test_write_markdown_without_comparisons(tmp_path):
    runs = [_healthy(method="gkd")]
    path = tmp_path / "r.md"
    write_markdown(summarise(runs, {}), comparisons(runs), {}, path, {})
    assert "No paired comparison" in path.read_text() and "| gkd | 1 | 55.0 |" in path.read_text()


def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_writes_png(tmp_path):
    path = tmp_path / "acc.png"
    plot(_synthetic_runs() + [_healthy(mismatch="teacher", method="gkd")], path, context=CONTEXT)
    assert _is_png(path)


def test_plot_single_seed_and_uneven_eval_steps(tmp_path):
    path = tmp_path / "one.png"
    runs = [_healthy(method="opd"), _healthy(method="tropd", seed=0),
            _healthy(method="tropd", seed=1, eval_steps=[0, 50], accuracy=[0.4, 0.7])]
    plot(runs, path)
    assert _is_png(path)
    steps, mean, se = stats._curve(runs[1:])
    assert list(steps) == [0, 50, 100] and mean[1] == pytest.approx(0.65)
    assert math.isnan(se[2]) and se[1] == pytest.approx(0.05)  # one seed at step 100: no band there


def test_quick_plot_of_all_zero_accuracies_has_a_readable_axis_and_whole_step_ticks():
    """`tropd gym --quick`: 4 steps, evaluated at 0, 2 and 4, every accuracy 0 (tiny models). The accuracy axes
    read 0-5 % (not ±0.04 %), the step axes tick whole steps only."""
    import matplotlib.pyplot as plt

    runs = [_healthy(mismatch=m, method=meth, seed=0, eval_steps=[0, 2, 4], accuracy=[0.0, 0.0, 0.0], steps=4)
            for m in (0.0, 1.0) for meth in ("opd", "tropd")]
    fig = stats.build_plot(runs)
    try:
        fig.canvas.draw()
        top, *curves = fig.axes
        for ax in (top, *curves):
            assert ax.get_ylim() == pytest.approx((0.0, 5.0)), ax.get_title()
        for ax in curves:
            low, high = ax.get_xlim()
            ticks = [t for t in ax.get_xticks() if low <= t <= high]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
    finally:
        plt.close(fig)
