"""Statistics, a markdown report and a plot for the distillation gym's grid of runs (mismatch × method × seed).

A *run record* is one dict per training run (as read from JSON)::

    {"mismatch": 0.5, "method": "tropd", "seed": 3,
     "eval_steps": [0, 25, 50, ...],   # steps at which the held-out eval ran (0 = before training)
     "accuracy": [0.41, 0.52, ...],    # held-out exact-match accuracy in [0, 1] at each eval step
     "distinct": [0.8, ...],           # distinct-token ratio of the greedy held-out answers at each eval step
     "teacher_nll": [1.2, ...],        # mean teacher NLL/token of the student's held-out answers at each eval step
     "entropy": [0.9, ...],            # mean student sampling entropy (nats/token) per TRAINING step
     "grad_norm": [1.3, ...],          # gradient norm per TRAINING step (NaN for skipped steps)
     "steps": 200, "wall_s": 41.2}

``distinct``, ``teacher_nll``, ``entropy``, ``grad_norm`` and ``wall_s`` may be missing (their statistics are
then NaN and the collapse branches that need them are false). The *context* dict describes the setting::

    {"teacher_accuracy": 0.97, "teacher_distinct": 0.75, "heldout_problems": 600,
     "mismatch_start": {"0.5": {"accuracy": 0.4, "teacher_nll": 1.1}, ...}, ...}

``mismatch`` is the knob's value (a share in [0, 1]; any label works, e.g. ``"alt"``); ``mismatch_start`` is keyed
by :func:`level_name` of it.

Conventions: "final" is the last eval point of a run; "AUC" is the plain mean of a run's accuracy over its eval
points; every per-(mismatch, method) mean is over seeds, with a 95% Student-t confidence interval
(:func:`mean_ci`). Paired comparisons pair two methods' runs by seed (:func:`paired_test`). NaNs are ignored
everywhere. The t distribution is computed here (regularized incomplete beta function, continued fraction), so
the module needs only numpy and, for :func:`plot`, matplotlib.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

#: The collapse rule applied by :func:`collapsed`, as printed in the report.
COLLAPSE_RULE = (
    "A run collapsed if (a) its final held-out accuracy is more than 0.2 (absolute) below its own peak accuracy "
    "over all its eval points, or (b) its final distinct-token ratio is below half the teacher's, or (c) its mean "
    "sampling entropy over the last 10% of its training steps (at least one step) is below 0.05 nats/token while its "
    "final accuracy is not above its start (a student that became confident and better has converged, not "
    "collapsed)."
)
COLLAPSE_ACC_DROP = 0.2
COLLAPSE_DISTINCT_FRAC = 0.5
COLLAPSE_ENTROPY = 0.05
COLLAPSE_TAIL_FRAC = 0.1

#: Methods drawn with thicker lines in :func:`plot`.
HIGHLIGHT = ("tropd", "opd")

# ---------------------------------------------------------------------------------------------------------------
# Student t distribution
# ---------------------------------------------------------------------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes ``betacf``)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 100_000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise RuntimeError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function ``I_x(a, b) = B(x; a, b) / B(a, b)`` for ``a, b > 0``, ``0 <= x <= 1``.

    ``I_x = x^a (1-x)^b / (a B(a, b)) * CF(a, b, x)`` with the continued fraction CF, used directly when
    ``x < (a+1)/(a+b+2)`` and through the symmetry ``I_x(a, b) = 1 - I_{1-x}(b, a)`` otherwise (fast convergence)."""
    if not (a > 0 and b > 0) or not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs a, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    if x == 0.0 or x == 1.0:
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_sf2(t: float, dof: float) -> float:
    """Two-sided tail probability ``P(|T| >= |t|)`` of Student's t with ``dof`` degrees of freedom:
    ``I_{dof/(dof+t^2)}(dof/2, 1/2)``. ``t = ±inf`` gives 0, NaN gives NaN."""
    if math.isnan(t) or not dof > 0:
        return math.nan
    if math.isinf(t):
        return 0.0
    return betainc(dof / 2.0, 0.5, dof / (dof + t * t))


def t_cdf(t: float, dof: float) -> float:
    """CDF of Student's t: ``1 - p2/2`` for ``t >= 0`` and ``p2/2`` for ``t < 0``, where ``p2 = t_sf2(t, dof)``."""
    half = 0.5 * t_sf2(t, dof)
    return 1.0 - half if t >= 0 else half


@lru_cache(maxsize=1024)
def t_ppf(q: float, dof: float) -> float:
    """Quantile of Student's t (inverse of :func:`t_cdf`), by bisection to ~1e-12: ``t_ppf(0.975, 9) ≈ 2.2622``.
    Uses the symmetry ``t_ppf(q) = -t_ppf(1 - q)``."""
    if not 0.0 < q < 1.0 or not dof > 0:
        raise ValueError(f"t_ppf needs 0 < q < 1 and dof > 0, got q={q}, dof={dof}")
    if q < 0.5:
        return -t_ppf(1.0 - q, dof)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, dof) < q:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, dof) < q else (lo, mid)
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------------------------------------------------------
# Means, confidence intervals, paired tests
# ---------------------------------------------------------------------------------------------------------------


def _finite(values: Iterable[Any]) -> list[float]:
    """The values as floats, NaN and None dropped (±inf kept: it is a value, not a missing one)."""
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def mean_ci(values: Iterable[float], level: float = 0.95) -> tuple[float, float]:
    """``(mean, half_width)`` of the non-NaN values: ``half_width = t_{(1+level)/2, n-1} * s / sqrt(n)`` with the
    sample standard deviation ``s`` (``n - 1`` in the denominator). ``n = 1`` → half-width NaN; ``n = 0`` → both
    NaN."""
    xs = _finite(values)
    n = len(xs)
    if n == 0:
        return math.nan, math.nan
    mean = math.fsum(xs) / n
    if n == 1:
        return mean, math.nan
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, t_ppf((1.0 + level) / 2.0, n - 1) * sd / math.sqrt(n)


def _sign_flip_p(d: np.ndarray, n_random: int, seed: int) -> float:
    """Two-sided sign-flip p-value of ``|mean(d)|``: the share of sign assignments ``s`` with
    ``|sum(s * d)| >= |sum(d)|``. Exact over all ``2^n`` assignments for ``n <= 16``; otherwise
    ``(1 + hits) / (1 + n_random)`` over ``n_random`` seeded random assignments."""
    n = len(d)
    if n == 0:
        return math.nan
    scale = float(np.abs(d).sum())
    observed = abs(float(d.sum())) - 1e-12 * max(scale, 1e-300)  # ties count as "as extreme"
    if n <= 16:
        bits = (np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1
        sums = np.abs((1 - 2 * bits) @ d)
        return float(np.count_nonzero(sums >= observed)) / 2**n
    signs = np.random.default_rng(seed).choice(np.array([-1.0, 1.0]), size=(n_random, n))
    hits = np.count_nonzero(np.abs(signs @ d) >= observed)
    return (1.0 + hits) / (1.0 + n_random)


def paired_test(a: Sequence[float], b: Sequence[float], *, n_random: int = 20_000, seed: int = 0) -> dict[str, Any]:
    """Paired comparison of ``a`` and ``b`` (same index = same seed); pairs with a NaN on either side are dropped.

    With the differences ``d_i = a_i - b_i`` (n pairs), mean ``d̄`` and sample standard deviation ``s``:

    * ``mean_diff = d̄``, ``half_width = t_{0.975, n-1} s / sqrt(n)``, ``ci = (d̄ - half_width, d̄ + half_width)``;
    * paired t-test: ``t = d̄ / (s / sqrt(n))``, ``p_t = P(|T_{n-1}| >= |t|)`` (two-sided); if ``s = 0`` then
      ``t = 0, p_t = 1`` when ``d̄ = 0``, else ``t = ±inf, p_t = 0``; ``n < 2`` → NaN;
    * sign-flip permutation test: ``p_perm`` = share of sign assignments whose ``|Σ ± d_i|`` is at least the
      observed ``|Σ d_i|`` (exact for ``n <= 16``, else ``n_random`` random flips seeded with ``seed``).

    Returns ``{"n", "mean_diff", "half_width", "ci_low", "ci_high", "t", "dof", "p_t", "p_perm"}``."""
    if len(a) != len(b):
        raise ValueError(f"paired_test needs equal lengths, got {len(a)} and {len(b)}")
    pairs = [(float(x), float(y)) for x, y in zip(a, b) if not (math.isnan(float(x)) or math.isnan(float(y)))]
    d = np.array([x - y for x, y in pairs], dtype=float)
    n = len(d)
    mean, hw = mean_ci(d.tolist())
    t = p_t = math.nan
    if n >= 2:
        sd = float(np.std(d, ddof=1))
        if sd > 0:
            t = mean / (sd / math.sqrt(n))
            p_t = t_sf2(t, n - 1)
        else:
            t, p_t = (0.0, 1.0) if mean == 0 else (math.copysign(math.inf, mean), 0.0)
    return {"n": n, "mean_diff": mean, "half_width": hw, "ci_low": mean - hw, "ci_high": mean + hw,
            "t": t, "dof": n - 1 if n >= 2 else math.nan, "p_t": p_t, "p_perm": _sign_flip_p(d, n_random, seed)}


# ---------------------------------------------------------------------------------------------------------------
# Per-run quantities
# ---------------------------------------------------------------------------------------------------------------


def _last(values: Sequence[float] | None) -> float:
    return float(values[-1]) if values else math.nan


def final_accuracy(run: dict) -> float:
    """Accuracy at the run's last eval point."""
    return _last(run.get("accuracy"))


def accuracy_auc(run: dict) -> float:
    """Area under the accuracy curve, as the mean accuracy over the run's eval points (NaNs ignored)."""
    return mean_ci(run.get("accuracy") or [])[0]


def level_name(mismatch: Any) -> str:
    """A mismatch level as text: a number in ``g`` format (``0.25``, ``1``), anything else as given."""
    if isinstance(mismatch, (int, float)) and not isinstance(mismatch, bool):
        return f"{float(mismatch):g}"
    return str(mismatch)


def start_accuracy(run: dict, context: dict | None = None) -> float:
    """Accuracy at step 0: the eval at ``eval_steps == 0``, else
    ``context["mismatch_start"][level_name(mismatch)]["accuracy"]``, else NaN."""
    steps, acc = run.get("eval_steps") or [], run.get("accuracy") or []
    if 0 in steps and steps.index(0) < len(acc):
        return float(acc[steps.index(0)])
    start = ((context or {}).get("mismatch_start") or {}).get(level_name(run.get("mismatch")), {})
    return float(start.get("accuracy", math.nan))


def collapse_reasons(run: dict, context: dict) -> list[str]:
    """The branches of :data:`COLLAPSE_RULE` that hold for ``run`` (empty: not collapsed). A branch whose data is
    missing (no ``distinct``, no ``teacher_distinct``, no ``entropy``) is false."""
    reasons = []
    acc = _finite(run.get("accuracy") or [])
    final = final_accuracy(run)
    if acc and final < max(acc) - COLLAPSE_ACC_DROP:
        reasons.append(f"final accuracy {final:.3f} < peak {max(acc):.3f} - {COLLAPSE_ACC_DROP}")
    teacher_distinct = float(context.get("teacher_distinct", math.nan))
    distinct = _last(run.get("distinct"))
    if distinct < COLLAPSE_DISTINCT_FRAC * teacher_distinct:
        reasons.append(f"final distinct {distinct:.3f} < {COLLAPSE_DISTINCT_FRAC} × teacher {teacher_distinct:.3f}")
    entropy = run.get("entropy") or []
    tail = mean_ci(entropy[-max(1, math.ceil(COLLAPSE_TAIL_FRAC * len(entropy))):])[0] if entropy else math.nan
    if tail < COLLAPSE_ENTROPY and not final > start_accuracy(run, context):
        reasons.append(f"late entropy {tail:.4f} < {COLLAPSE_ENTROPY} nats, final accuracy not above the start")
    return reasons


def collapsed(run: dict, context: dict) -> bool:
    """Whether ``run`` collapsed under :data:`COLLAPSE_RULE` (see :func:`collapse_reasons`)."""
    return bool(collapse_reasons(run, context))


# ---------------------------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------------------------


def group_runs(runs: Iterable[dict]) -> dict[tuple[str, str], dict[int, dict]]:
    """``{(mismatch, method): {seed: run}}`` in order of first appearance; a repeated (mismatch, method, seed) is
    an error (``ValueError``)."""
    groups: dict[tuple[str, str], dict[int, dict]] = {}
    for run in runs:
        seeds = groups.setdefault((run["mismatch"], run["method"]), {})
        if run["seed"] in seeds:
            raise ValueError(f"duplicate run: mismatch={run['mismatch']} method={run['method']} seed={run['seed']}")
        seeds[run["seed"]] = run
    return groups


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    """(p50, p99, max) of the finite values (numpy's linear interpolation); NaNs if none."""
    xs = np.array(values, dtype=float)
    xs = xs[np.isfinite(xs)]
    if xs.size == 0:
        return math.nan, math.nan, math.nan
    return float(np.percentile(xs, 50)), float(np.percentile(xs, 99)), float(xs.max())


def summarise(runs: Iterable[dict], context: dict) -> list[dict[str, Any]]:
    """One row per (mismatch, method), in order of first appearance. Means are over seeds with 95% t half-widths
    (:func:`mean_ci`):

    ``mismatch, method, n, seeds`` (sorted), ``final_acc, final_acc_ci`` (last eval point), ``best_acc`` (mean of
    each seed's peak accuracy), ``gain, gain_ci`` (final − :func:`start_accuracy`), ``auc, auc_ci``
    (:func:`accuracy_auc`), ``collapsed`` (count of seeds, :func:`collapsed`), ``grad_p50, grad_p99, grad_max``
    (over all training steps of all seeds, NaN ignored), ``final_teacher_nll, final_distinct`` (means of the last
    eval values), ``wall_s`` (mean)."""
    rows = []
    for (mismatch, method), by_seed in group_runs(runs).items():
        rs = [by_seed[s] for s in sorted(by_seed)]
        final = mean_ci(final_accuracy(r) for r in rs)
        gain = mean_ci(final_accuracy(r) - start_accuracy(r, context) for r in rs)
        auc = mean_ci(accuracy_auc(r) for r in rs)
        p50, p99, gmax = _quantiles([g if g is not None else math.nan for r in rs for g in r.get("grad_norm") or []])
        rows.append({
            "mismatch": mismatch, "method": method, "n": len(rs), "seeds": sorted(by_seed),
            "final_acc": final[0], "final_acc_ci": final[1],
            "best_acc": mean_ci(max(_finite(r.get("accuracy") or []), default=math.nan) for r in rs)[0],
            "gain": gain[0], "gain_ci": gain[1], "auc": auc[0], "auc_ci": auc[1],
            "collapsed": sum(collapsed(r, context) for r in rs),
            "grad_p50": p50, "grad_p99": p99, "grad_max": gmax,
            "final_teacher_nll": mean_ci(_last(r.get("teacher_nll")) for r in rs)[0],
            "final_distinct": mean_ci(_last(r.get("distinct")) for r in rs)[0],
            "wall_s": mean_ci(r.get("wall_s", math.nan) for r in rs)[0],
        })
    return rows


#: (metric name in :func:`comparisons`, per-run value).
COMPARED = (("final_accuracy", final_accuracy), ("accuracy_auc", accuracy_auc))


def comparisons(runs: Iterable[dict], a: str = "tropd", b: str = "opd") -> list[dict[str, Any]]:
    """Method ``a`` against ``b``, per mismatch level (order of first appearance) and metric (final accuracy,
    accuracy AUC), by :func:`paired_test` over the seeds both methods ran (levels with none are skipped).

    Each row: ``mismatch, metric, a, b, seeds`` plus the :func:`paired_test` fields, ``better`` (``a`` if the
    mean difference a − b is > 0, ``b`` if < 0, else ``"tie"``) and ``ci_excludes_zero``."""
    groups = group_runs(runs)
    rows = []
    for mismatch in dict.fromkeys(m for m, _ in groups):
        ra, rb = groups.get((mismatch, a), {}), groups.get((mismatch, b), {})
        seeds = sorted(set(ra) & set(rb))
        if not seeds:
            continue
        for metric, value in COMPARED:
            test = paired_test([value(ra[s]) for s in seeds], [value(rb[s]) for s in seeds])
            diff = test["mean_diff"]
            rows.append({"mismatch": mismatch, "metric": metric, "a": a, "b": b, "seeds": seeds, **test,
                         "better": a if diff > 0 else b if diff < 0 else "tie",
                         "ci_excludes_zero": bool(test["ci_low"] > 0 or test["ci_high"] < 0)})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Markdown report
# ---------------------------------------------------------------------------------------------------------------


def _pct(mean: float, hw: float = math.nan, signed: bool = False) -> str:
    """A fraction as a percentage with one decimal, ``"41.3 ± 2.1"`` (``"41.3"`` without a half-width, ``–`` if
    NaN)."""
    if mean is None or math.isnan(mean):
        return "–"
    text = f"{100 * mean:+.1f}" if signed else f"{100 * mean:.1f}"
    return text if hw is None or math.isnan(hw) else f"{text} ± {100 * hw:.1f}"


def _num(x: Any, fmt: str = ".3g") -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and math.isnan(x):
        return "–"
    return format(x, fmt) if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def _p(p: float) -> str:
    return "–" if math.isnan(p) else "<0.001" if p < 0.001 else f"{p:.3f}"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return str(seconds)
    minutes, secs = divmod(float(seconds), 60.0)
    hours, minutes = divmod(int(minutes), 60)
    return (f"{hours} h {minutes} min" if hours else f"{minutes} min {secs:.0f} s" if minutes else f"{secs:.1f} s")


def _header(meta: dict, context: dict) -> list[str]:
    lines = ["# Distillation gym report", ""]
    for key in ("command", "machine", "duration"):
        if key in meta:
            value = _duration(meta[key]) if key == "duration" else meta[key]
            lines.append(f"- **{key}**: `{value}`" if key == "command" else f"- **{key}**: {value}")
    lines += [f"- **{k}**: {v}" for k, v in meta.items() if k not in ("command", "machine", "duration", "plot")]
    lines += ["", "## Setting", ""]
    if "teacher_accuracy" in context:
        lines.append(f"- teacher held-out accuracy: {_pct(context['teacher_accuracy'])}%")
    if "teacher_distinct" in context:
        lines.append(f"- teacher distinct-token ratio: {_num(context['teacher_distinct'])}")
    shown = ("teacher_accuracy", "teacher_distinct", "mismatch_start")
    lines += [f"- {k}: {_num(v)}" for k, v in context.items() if k not in shown and not isinstance(v, (dict, list))]
    starts = context.get("mismatch_start") or {}
    if starts:
        lines += ["", "| mismatch | start accuracy (%) | start teacher NLL (nats/token) |", "|---|---|---|"]
        lines += [f"| {m} | {_pct(s.get('accuracy', math.nan))} | {_num(s.get('teacher_nll', math.nan))} |"
                  for m, s in starts.items()]
    return lines + [""]


def _level_table(rows: list[dict]) -> list[str]:
    rows = sorted(rows, key=lambda r: math.inf if math.isnan(r["final_acc"]) else -r["final_acc"])  # best first
    lines = [("| method | n | final acc (%) | best acc (%) | Δ from start (pp) | AUC (%) | collapsed | "
              "final teacher NLL | final distinct | grad-norm p50 / p99 / max |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        grad = " / ".join(_num(r[k]) for k in ("grad_p50", "grad_p99", "grad_max"))
        lines.append(f"| {r['method']} | {r['n']} | {_pct(r['final_acc'], r['final_acc_ci'])} | "
                     f"{_pct(r['best_acc'])} | {_pct(r['gain'], r['gain_ci'], signed=True)} | "
                     f"{_pct(r['auc'], r['auc_ci'])} | {r['collapsed']}/{r['n']} | {_num(r['final_teacher_nll'])} | "
                     f"{_num(r['final_distinct'])} | {grad} |")
    return lines + [""]


def _knob_table(summary: list[dict]) -> list[str]:
    """Final accuracy (and gain from start) of every method at every mismatch level: the knob as a table."""
    levels = list(dict.fromkeys(r["mismatch"] for r in summary))
    if len(levels) < 2:
        return []
    cells = {(r["mismatch"], r["method"]): r for r in summary}
    lines = ["## Final accuracy along the mismatch knob", "",
             "Mean ± 95% t interval over seeds, in %; in parentheses, the gain over each run's start in points.", "",
             "| method | " + " | ".join(f"mismatch {level_name(m)}" for m in levels) + " |",
             "|---|" + "---|" * len(levels)]
    for method in dict.fromkeys(r["method"] for r in summary):
        row = [cells.get((m, method)) for m in levels]
        lines.append(f"| {method} | " + " | ".join(
            "–" if r is None else f"{_pct(r['final_acc'], r['final_acc_ci'])} ({_pct(r['gain'], r['gain_ci'], True)})"
            for r in row) + " |")
    return lines + [""]


def _comparison_table(comps: list[dict]) -> list[str]:
    if not comps:
        return ["No paired comparison: no mismatch level has seeds run by both methods.", ""]
    lines = [("Paired by seed; difference a − b in percentage points, 95% t interval, two-sided p-values of "
              "the paired t-test and of the sign-flip permutation test (exact for n ≤ 16)."), "",
             ("| mismatch | a − b | metric | n | difference (pp) | 95% CI (pp) | p (t-test) | p (sign-flip) | "
              "better | CI excludes 0 |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for c in comps:
        ci = "–" if math.isnan(c["half_width"]) else f"[{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}]"
        lines.append(f"| {level_name(c['mismatch'])} | {c['a']} − {c['b']} | {c['metric']} | {c['n']} | "
                     f"{_pct(c['mean_diff'], signed=True)} | {ci} | "
                     f"{_p(c['p_t'])} | {_p(c['p_perm'])} | {c['better']} | "
                     f"{'yes' if c['ci_excludes_zero'] else 'no'} |")
    return lines + [""]


def write_markdown(summary: list[dict], comps: list[dict], context: dict, path: str | Path, meta: dict) -> None:
    """Write the report to ``path``: the meta header (``command``, ``machine``, ``duration`` in seconds, then any
    other keys; ``meta["plot"]``, if given, is embedded as an image), the setting (teacher, each mismatch level's
    start), one table per mismatch level (methods by final accuracy, best first; ``n`` = seeds), the paired
    comparisons (:func:`comparisons`) and :data:`COLLAPSE_RULE`. Accuracies are percentages, ``mean ± 95% CI``."""
    lines = _header(meta, context)
    if meta.get("plot"):
        lines += [f"![held-out accuracy over training]({meta['plot']})", ""]
    lines += [("Accuracies in %, mean ± 95% t interval over seeds (no interval when n = 1); Δ from start = final − "
               "accuracy at step 0; AUC = mean accuracy over the eval points."), ""]
    lines += _knob_table(summary)
    for mismatch in dict.fromkeys(r["mismatch"] for r in summary):
        lines += [f"## Mismatch {level_name(mismatch)}", ""] + _level_table([r for r in summary
                                                                              if r["mismatch"] == mismatch])
    lines += ["## Paired comparison", ""] + _comparison_table(comps)
    lines += ["## Collapse rule", "", COLLAPSE_RULE, ""]
    Path(path).write_text("\n".join(lines))


# ---------------------------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------------------------


def _curve(rs: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, standard error) of accuracy over seeds at the union of eval steps; the standard error is
    ``std(ddof=1) / sqrt(k)`` over the k seeds with a value there, NaN when k < 2."""
    steps = sorted({s for r in rs for s in r.get("eval_steps") or []})
    at = [{s: float(a) for s, a in zip(r.get("eval_steps") or [], r.get("accuracy") or [])} for r in rs]
    mean, se = [], []
    for s in steps:
        xs = _finite(m.get(s, math.nan) for m in at)
        mean.append(math.fsum(xs) / len(xs) if xs else math.nan)
        se.append(float(np.std(xs, ddof=1)) / math.sqrt(len(xs)) if len(xs) >= 2 else math.nan)
    return np.array(steps, dtype=float), np.array(mean), np.array(se)


def plot(runs: Iterable[dict], path: str | Path, context: dict | None = None) -> None:
    """Write :func:`build_plot`'s figure as one PNG."""
    import matplotlib.pyplot as plt

    fig = build_plot(runs, context)
    try:
        fig.tight_layout()
        fig.savefig(path, dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)


def build_plot(runs: Iterable[dict], context: dict | None = None):
    """The accuracy figure (the caller saves and closes it). Top: final held-out accuracy (%) against the
    mismatch knob, one line per method (mean over seeds) with its 95% t-interval band (numeric levels on a numeric axis, others in order of first appearance).
    Bottom: a panel per mismatch level, accuracy against training step (mean, ±1 standard-error band). Colours
    are fixed per method, :data:`HIGHLIGHT` methods are thicker, the legend sits right of the panels; with
    ``context["teacher_accuracy"]`` a dotted teacher line is drawn. Step axes have whole-step ticks; an
    accuracy axis spans at least 5 points within 0-100% (every accuracy 0 reads 0-5%, not ±0.04%)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    groups = group_runs(runs)
    levels = list(dict.fromkeys(m for m, _ in groups))
    methods = list(dict.fromkeys(meth for _, meth in groups))
    numeric = all(isinstance(m, (int, float)) and not isinstance(m, bool) for m in levels)
    xs = {m: (float(m) if numeric else i) for i, m in enumerate(levels)}
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    colors = {m: cmap(i % cmap.N) for i, m in enumerate(methods)}
    n = max(1, len(levels))
    fig = plt.figure(figsize=(1.5 + 3.6 * max(2, n), 8.0))
    grid = fig.add_gridspec(2, n)
    top = fig.add_subplot(grid[0, :])
    curves = [fig.add_subplot(grid[1, i]) for i in range(n)]
    teacher = (context or {}).get("teacher_accuracy")
    try:
        for method in methods:
            at = [m for m in levels if (m, method) in groups]
            stats = [mean_ci(final_accuracy(r) for r in groups[(m, method)].values()) for m in at]
            x = np.array([xs[m] for m in at])
            mean = np.array([st[0] for st in stats])
            hw = np.array([st[1] for st in stats])
            wide = method in HIGHLIGHT
            top.plot(x, 100 * mean, color=colors[method], lw=2.6 if wide else 1.3, marker="o", markersize=4,
                     zorder=3 if wide else 2, label=method)
            if np.isfinite(hw).any():
                top.fill_between(x, 100 * (mean - hw), 100 * (mean + hw), color=colors[method], alpha=0.15,
                                 linewidth=0, zorder=1)
        top.set_xticks([xs[m] for m in levels], [level_name(m) for m in levels])
        top.set_xlabel("mismatch (share of alt-style traces in the student's SFT data)" if numeric else "mismatch")
        top.set_ylabel("final held-out accuracy (%)")
        top.set_title("final accuracy along the mismatch knob (mean over seeds, 95% t interval)")
        top.grid(alpha=0.3)
        for ax, level in zip(curves, levels):
            for method in methods:
                if (level, method) not in groups:
                    continue
                x, mean, se = _curve(list(groups[(level, method)].values()))
                wide = method in HIGHLIGHT
                ax.plot(x, 100 * mean, color=colors[method], lw=2.2 if wide else 1.1, zorder=3 if wide else 2,
                        marker="o" if len(x) <= 12 else None, markersize=2.5)
                if np.isfinite(se).any():
                    ax.fill_between(x, 100 * (mean - se), 100 * (mean + se), color=colors[method], alpha=0.18,
                                    linewidth=0, zorder=1)
            ax.set_title(f"mismatch {level_name(level)}", fontsize=9)
            ax.set_xlabel("training step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        curves[0].set_ylabel("held-out accuracy (%, ±1 SE)")
        for ax in [top, *curves]:
            if teacher is not None:
                ax.axhline(100 * teacher, color="0.3", linestyle=":", linewidth=1,
                           label="teacher" if ax is top else None)
            low, high = ax.get_ylim()
            if high - low < 5:  # e.g. every accuracy 0: show a readable range, not ±0.04%
                low = min(max(0.0, (low + high) / 2 - 2.5), 95.0)
                ax.set_ylim(low, low + 5.0)
        top.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, title="method", title_fontsize=8)
    except BaseException:
        plt.close(fig)
        raise
    return fig
