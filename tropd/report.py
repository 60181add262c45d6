"""Plots and a markdown summary of a run, from its ``metrics.jsonl`` (``tropd report RUN_DIR``).

Each figure stacks one panel per group of quantities that share a unit and a scale (losses, fractions,
token counts, ...), so no small quantity is flattened against a large one; every panel names its unit on the
y axis and marks the end of the SFT warm-up (the step where the logged ``phase`` changes) with a dashed line.
``summary.md`` says first which steps were skipped as non-finite (if any), compares the first and last step of
each phase separately (warm-up, then the objective), then lists the held-out evaluations. Non-finite values are
logged as ``null``: they are gaps in the plots and ``NaN`` in the tables. A plot leaves out what a step did not
compute: a loss region at a step with that one region (it is the loss itself, as an SFT step's
``loss_guidance``), fractions of the student's tokens at a step without any (an SFT step).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from tropd.train.tracking import read_metrics  # noqa: E402

LOSS_KEYS = ("loss", "loss_trust", "loss_outlier", "loss_guidance", "loss_pg", "loss_fkl")
#: Fractions of the student's tokens: not computed (not drawn) at a step with no student token (an SFT step).
STUDENT_FRACTION_KEYS = ("trust_frac", "p_trust", "frac_masked")

#: (file stem, title, panels) of each figure; a panel is (y-axis label, metric keys). A panel is drawn when at
#: least one of its keys was logged with a number, a figure when at least one of its panels is.
FIGURES = (
    ("loss", "loss per region", (("loss (nats/token)", LOSS_KEYS),)),
    ("trust", "trust region", (("fraction of tokens", ("trust_frac", "p_trust", "frac_masked")),)),
    ("reward", "K1 reward quantiles and reverse-KL estimate", (
        ("K1 reward log p_T − log p_S (nats)", ("reward_min", "reward_p01", "reward_p50")),
        ("reverse KL, K1 estimate (nats/token)", ("k1_rkl",)),
    )),
    ("grad_norm", "gradient norm (before clipping)", (("gradient L2 norm", ("grad_norm",)),)),
    ("entropy", "student entropy", (("entropy (nats/token)", ("student_entropy",)),)),
    ("length", "response length, guidance and ending rates", (
        ("length (tokens)", ("rollout/response_len_mean", "rollout/guidance_len_mean", "rollout/guidance_cap")),
        ("fraction of rows", ("rollout/eos_rate", "rollout/truncation_rate", "rollout/guided_share")),
    )),
    ("throughput", "throughput and step time", (
        ("throughput (tokens/s)", ("tokens_per_second",)),
        ("time (s)", ("step_time", "rollout_time")),
    )),
    ("eval", "held-out evaluation", (
        ("teacher-text NLL (nats/token)", ("eval/teacher_text_nll",)),
        ("distinct-token ratio", ("eval/distinct_ratio", "eval/teacher_distinct_ratio")),
        ("task score (mean grade, 0–1)", ("eval/task_score",)),
    )),
)

#: Reference lines (a cap, the teacher's own value), drawn dotted so they read apart from the measured series.
REFERENCE_KEYS = ("rollout/guidance_cap", "eval/teacher_distinct_ratio")

#: Rows of the per-phase tables in summary.md: (key, unit); a row appears when the phase logged the key.
SUMMARY_KEYS = (
    ("loss", "nats/token"), ("loss_guidance", "nats/token"), ("k1_rkl", "nats/token"), ("trust_frac", "fraction"),
    ("reward_p01", "nats"), ("student_entropy", "nats/token"), ("grad_norm", ""),
    ("rollout/response_len_mean", "tokens"), ("rollout/guidance_len_mean", "tokens"), ("rollout/eos_rate", "fraction"),
    ("tokens_per_second", "tokens/s"),
)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key``; a ``null`` (non-finite) value becomes NaN, a gap in the plotted line."""
    pts = [(r["step"], float(r[key]) if _is_number(r[key]) else math.nan) for r in records
           if key in r and _is_number(r.get("step")) and (r[key] is None or _is_number(r[key]))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _has_data(records: list[dict], key: str) -> bool:
    return any(math.isfinite(v) for v in _series(_drawn(records, key), key)[1])


def _drawn(records: list[dict], key: str) -> list[dict]:
    """The records whose ``key`` a plot draws: a loss region only at steps with several regions (a step with
    one region, such as an SFT step's ``loss_guidance``, logs the loss itself twice, and the region's line would
    hide ``loss``); a fraction of student tokens only at steps with student tokens."""
    if key in LOSS_KEYS[1:]:
        return [r for r in records if key not in r or any(k in r for k in LOSS_KEYS[1:] if k != key)]
    if key in STUDENT_FRACTION_KEYS:
        return [r for r in records if not (_is_number(r.get("student_tokens")) and r["student_tokens"] == 0)]
    return records


def phases(records: list[dict]) -> list[tuple[str, list[dict]]]:
    """The training-step records (those with a ``phase`` or a ``loss``) grouped into consecutive runs of one
    phase, in log order: ``[("sft", [...]), ("tropd", [...])]``. Records without a phase count as "training"."""
    groups: list[tuple[str, list[dict]]] = []
    for r in records:
        if not _is_number(r.get("step")) or ("phase" not in r and "loss" not in r):
            continue
        name = str(r.get("phase") or "training")
        if groups and groups[-1][0] == name:
            groups[-1][1].append(r)
        else:
            groups.append((name, [r]))
    return groups


def phase_boundaries(records: list[dict]) -> list[tuple[int, str, str]]:
    """``(last step of a phase, that phase, the next phase)`` for each phase change."""
    groups = phases(records)
    return [(a[-1]["step"], name, nxt) for (name, a), (nxt, _) in zip(groups, groups[1:])]


def _boundary_label(step: int, prev: str, nxt: str) -> str:
    return f"end of SFT warm-up (step {step})" if prev == "sft" else f"{prev} → {nxt} (step {step})"


def build_figures(records: list[dict]) -> dict[str, plt.Figure]:
    """One figure per entry of :data:`FIGURES` with data, keyed by file stem (the caller saves and closes them).

    Panels share the step axis; each carries its y label and a dashed vertical line at every phase change."""
    boundaries = phase_boundaries(records)
    figures = {}
    for stem, title, panels in FIGURES:
        drawn = [(label, [k for k in keys if _has_data(records, k)]) for label, keys in panels]
        drawn = [(label, keys) for label, keys in drawn if keys]
        if not drawn:
            continue
        fig, axes = plt.subplots(len(drawn), 1, sharex=True, squeeze=False, figsize=(8, 0.6 + 2.3 * len(drawn)))
        for ax, (ylabel, keys) in zip(axes[:, 0], drawn):
            for key in keys:
                xs, ys = _series(_drawn(records, key), key)
                ax.plot(xs, ys, marker="o" if len(xs) <= 12 else None, markersize=4, label=key,
                        linestyle=":" if key in REFERENCE_KEYS else "-")
            for step, prev, nxt in boundaries:
                ax.axvline(step, color="0.35", linestyle="--", linewidth=1, label=_boundary_label(step, prev, nxt))
            ax.set_ylabel(ylabel, fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        axes[0, 0].set_title(title)
        axes[-1, 0].set_xlabel("step")
        axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        figures[stem] = fig
    return figures


def _phase_title(name: str, index: int, count: int) -> str:
    if name == "sft" and index < count - 1:
        return "SFT warm-up"
    return f"objective {name}" if name not in ("sft", "training") else name


def _phase_tables(groups: list[tuple[str, list[dict]]]) -> list[str]:
    lines = []
    described = ", then ".join(f"{_phase_title(n, i, len(groups))} (steps {g[0]['step']}–{g[-1]['step']})"
                               for i, (n, g) in enumerate(groups))
    lines += [f"{sum(len(g) for _, g in groups)} training steps logged: {described}.", ""]
    for i, (name, group) in enumerate(groups):
        first, last = group[0], group[-1]
        lines += [f"## {_phase_title(name, i, len(groups))}: steps {first['step']}–{last['step']} "
                  f"({len(group)} logged)", "",
                  f"| metric | unit | first (step {first['step']}) | last (step {last['step']}) |", "|---|---|---|---|"]
        for key, unit in SUMMARY_KEYS:
            if any(key in r for r in group):
                lines.append(f"| {key} | {unit} | {_fmt(first, key)} | {_fmt(last, key)} |")
        lines.append("")
    return lines


def _skipped_steps(steps: list[dict]) -> list[str]:
    """A paragraph on the steps skipped as non-finite (their weights unchanged), first in the summary: a run
    whose steps were all skipped did not train, whatever its tables show."""
    skipped = [r for r in steps if r.get("nonfinite")]
    if not skipped:
        return []
    shown = ", ".join(str(r["step"]) for r in skipped[:20]) + (", ..." if len(skipped) > 20 else "")
    cause = next((r["nonfinite_reason"] for r in reversed(skipped) if r.get("nonfinite_reason")), "not logged")
    verdict = (f"**No step trained**: every one of the {len(steps)} logged steps was skipped"
               if len(skipped) == len(steps) else f"**{len(skipped)} of {len(steps)} logged steps were skipped**")
    return [f"{verdict} for a non-finite loss or gradient (the weights stayed as they were): steps {shown}. "
            f"Last cause: {cause}", ""]


def write_report(run_dir: str | Path) -> Path:
    """Write ``<run>/report/*.png`` and ``<run>/report/summary.md``; returns the markdown path."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for stem, fig in build_figures(records).items():
        try:
            fig.savefig(out / f"{stem}.png", dpi=100)
        finally:
            plt.close(fig)
        images.append(stem)

    lines = [f"# Run report: {run_dir.name}", ""]
    groups = phases(records)
    lines += _skipped_steps([r for _, g in groups for r in g])
    if groups:
        lines += _phase_tables(groups)
    evals = [r for r in records if _is_number(r.get("step")) and any(k.startswith("eval/") for k in r)]
    if evals:
        keys = _eval_keys(evals)
        ends = {g[-1]["step"]: f"end of {_phase_title(n, i, len(groups))}" for i, (n, g) in enumerate(groups)}
        if groups:
            ends[groups[-1][1][-1]["step"]] = "end of training"
        lines += ["## Held-out evaluation", "", "| step | when | " + " | ".join(keys) + " |",
                  "|---|---|" + "---|" * len(keys)]
        for r in evals:
            when = "before training" if r["step"] == 0 else ends.get(r["step"]) or _during(r["step"], groups)
            lines.append(f"| {r['step']} | {when} | " + " | ".join(_fmt(r, "eval/" + k) for k in keys) + " |")
        lines.append("")
        for r in (evals[0], evals[-1]) if len(evals) > 1 else evals:
            if r.get("eval/sample") is not None:
                sample = " ".join(str(r["eval/sample"]).split()).replace("`", "'")[:300]
                lines += [f"Student sample at step {r['step']}: " + (f"`{sample}`" if sample else "(empty)"), ""]
    if any(ln.startswith("|") and "| NaN |" in ln for ln in lines):
        lines += ["NaN: the value was not finite (logged as null).", ""]
    lines += [f"![{s}]({s}.png)" for s in images]
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _during(step: int, groups: list[tuple[str, list[dict]]]) -> str:
    """The "when" of an evaluation that is not at a phase's end: the phase whose steps span it."""
    for i, (name, group) in enumerate(groups):
        if group[0]["step"] <= step <= group[-1]["step"]:
            return f"during {_phase_title(name, i, len(groups))}"
    if groups and step > groups[-1][1][-1]["step"]:
        return "after training"
    return "between phases" if groups else "no training step logged"


def _eval_keys(evals: list[dict]) -> list[str]:
    """Eval metrics logged with a number (or a null) at least once; the text sample is not a column."""
    return sorted({k[5:] for r in evals for k, v in r.items()
                   if k.startswith("eval/") and k != "eval/sample" and (v is None or _is_number(v))})


def _fmt(record: dict, key: str) -> str:
    """A table cell: blank when ``key`` was not logged, NaN when it was logged as null."""
    if key not in record:
        return ""
    v = record[key]
    if v is None:
        return "NaN"
    return f"{v:.4g}" if _is_number(v) else str(v)
