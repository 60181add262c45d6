"""Plots and a markdown summary of a run, from its ``metrics.jsonl`` (``tropd report RUN_DIR``)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tropd.train.tracking import read_metrics  # noqa: E402

#: (file stem, title, metric keys) of each plot; a plot is drawn when at least one of its keys was logged.
PANELS = (
    ("loss", "loss per region", ("loss", "loss_trust", "loss_outlier", "loss_guidance", "loss_pg", "loss_fkl")),
    ("trust", "trust region", ("trust_frac", "p_trust", "frac_masked")),
    ("reward", "K1 reward quantiles and reverse-KL estimate", ("reward_min", "reward_p01", "reward_p50", "k1_rkl")),
    ("grad_norm", "gradient norm (before clipping)", ("grad_norm",)),
    ("entropy", "student entropy", ("student_entropy",)),
    ("length", "response length and guidance", ("rollout/response_len_mean", "rollout/guidance_len_mean",
                                                "rollout/guidance_cap")),
    ("eval", "held-out evaluation", ("eval/teacher_text_nll", "eval/distinct_ratio", "eval/task_score")),
)


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def write_report(run_dir: str | Path) -> Path:
    """Write ``<run>/report/*.png`` and ``<run>/report/summary.md``; returns the markdown path."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for stem, title, keys in PANELS:
        present = [k for k in keys if _series(records, k)[0]]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for key in present:
            xs, ys = _series(records, key)
            ax.plot(xs, ys, marker="o" if len(xs) < 6 else None, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{stem}.png", dpi=100)
        plt.close(fig)
        images.append(stem)

    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    lines = [f"# Run report: {run_dir.name}", ""]
    if steps:
        first, last = steps[0], steps[-1]
        lines += ["| metric | first step | last step |", "|---|---|---|"]
        for key in ("loss", "k1_rkl", "trust_frac", "reward_p01", "student_entropy", "grad_norm",
                    "rollout/response_len_mean", "rollout/eos_rate", "tokens_per_second"):
            if key in last:
                lines.append(f"| {key} | {_fmt(first.get(key))} | {_fmt(last.get(key))} |")
        lines.append("")
        lines.append(f"{len(steps)} steps logged (phases: {', '.join(sorted({r.get('phase', '?') for r in steps}))}).")
        lines.append("")
    if evals:
        lines += ["## Held-out evaluation", "", "| step | " + " | ".join(_eval_keys(evals)) + " |",
                  "|---|" + "---|" * len(_eval_keys(evals))]
        for r in evals:
            lines.append(f"| {r['step']} | " + " | ".join(_fmt(r.get('eval/' + k)) for k in _eval_keys(evals)) + " |")
        lines.append("")
        for r in (evals[0], evals[-1]):
            if r.get("eval/sample") is not None:
                lines.append(f"Student sample at step {r['step']}: `{str(r['eval/sample'])[:300]!s}`")
                lines.append("")
    lines += [f"![{s}]({s}.png)" for s in images]
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _eval_keys(evals: list[dict]) -> list[str]:
    keys = sorted({k[5:] for r in evals for k, v in r.items() if k.startswith("eval/") and isinstance(v, (int, float))})
    return keys


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) else ("" if v is None else str(v))
