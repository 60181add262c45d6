"""The TrOPD paper in miniature: TrOPD vs OPD, EOPD, REOPOLD and the ablations, with seeds and 95% CIs.

    python benchmarks/paper_mini.py             # full: SmolLM2-135M teacher, 2 mismatch settings, 3 seeds
    python benchmarks/paper_mini.py --quick     # minutes: tiny random models, checks the pipeline end to end
    python benchmarks/paper_mini.py --settings mild:24:10,strong:18:10,severe:12:10   # the mismatch knob
    python benchmarks/paper_mini.py --steps 100 --prompts-per-step 64 --max-new-tokens 512   # a GPU machine

Protocol (identical for every method): for each mismatch setting, one fixed starting student is built once
(the teacher with ``student_layers`` of its layers kept, then healed by ``heal_steps`` of supervised KD on
teacher answers); every method then trains from that same checkpoint for the same number of steps, prompts,
rollouts, tokens and learning rate, for each seed, on the train split of the task suite, and is evaluated on
its held-out split. No method gets method-specific tuning: all use the objectives' defaults (docs/method.md §5).

Writes ``<out>/paper_mini.json`` (``runs`` and ``summary``), ``<out>/paper_mini.md`` (the table) and
``<out>/paper_mini_<setting>.png`` (curves over steps per method).

Collapse criterion (stated in the outputs too): a run is *collapsed* when the distinct-token ratio of its
greedy held-out answers falls below half the teacher's, or its final sampling entropy is below 0.1 nats.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

COLLAPSE_RULE = ("collapsed = greedy held-out distinct-token ratio < 0.5 x the teacher's, "
                 "or final student sampling entropy < 0.1 nats")

#: (label, objective, objective kwargs, extra config keys). Defaults of every objective are docs/method.md §5's.
METHODS = (
    ("opd", "opd", {}, {}),
    ("eopd", "eopd", {}, {}),
    ("clip_outlier", "clip_outlier", {}, {}),
    ("mask_outlier", "mask_outlier", {}, {}),
    ("fkl", "fkl", {}, {}),
    ("fkl_outlier", "fkl_outlier", {}, {}),
    ("tropd", "tropd", {}, {}),
    ("tropd_mask", "tropd", {"outlier": "mask"}, {}),
    ("tropd_clip", "tropd", {"outlier": "clip"}, {}),
)
#: Methods that are the same computation as another (docs/method.md §3), so one run serves both rows: REOPOLD as run in
#: the paper is clip_outlier's reward floor, and TrOPD without guidance is fkl_outlier. The registry keeps both
#: names; tests pin that they give identical losses.
ALIASES = {"reopold": "clip_outlier", "tropd_noguide": "fkl_outlier"}

#: t_{0.975, n-1} for 95% confidence intervals of a mean over n seeds.
T975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}


@dataclass
class Setting:
    name: str
    student_layers: int
    heal_steps: int


@dataclass
class Plan:
    teacher: str
    settings: list[Setting]
    seeds: list[int]
    steps: int
    eval_every: int
    base: dict = field(default_factory=dict)
    methods: tuple = METHODS


def parse_setting(spec: str, parser: argparse.ArgumentParser) -> Setting:
    """``NAME:KEPT_LAYERS:HEAL_STEPS`` -> Setting; a malformed spec stops with an error naming it."""
    parts = spec.split(":")
    if len(parts) != 3 or not parts[0] or not all(x.isdigit() for x in parts[1:]) or int(parts[1]) < 1:
        parser.error(f"--settings: {spec!r} is not NAME:KEPT_LAYERS:HEAL_STEPS (e.g. strong:18:10, layers >= 1)")
    return Setting(parts[0], int(parts[1]), int(parts[2]))


def full_plan(seeds: int, steps: int) -> Plan:
    """SmolLM2-135M-Instruct teacher; students of 24 ('mild') and 18 ('strong') of its 30 layers, each healed
    by 10 steps of supervised KD; 2 prompts x 2 rollouts per step, the embedded default's learning rate,
    24-token responses (sized so that the 54 runs fit in about an hour on 2 CPU cores)."""
    base = {
        "objective": {"kwargs": {}},
        "rollout": {"max_new_tokens": 24, "rollouts_per_prompt": 2},
        "data": {"prompts": "mcq", "eval_prompts": 6},
        "train": {"prompts_per_step": 2, "micro_batch_size": 8, "lr": 1e-4, "save_every": 0, "progress": False},
    }
    return Plan("smollm2", [Setting("mild", 24, 10), Setting("strong", 18, 10)], list(range(seeds)), steps,
                max(1, steps // 2), base)


def quick_plan(workdir: Path) -> Plan:
    """Tiny random teacher (6 layers) and students of 4 / 2 of its layers: the whole pipeline in minutes."""
    from tests.helpers import tiny_llama, tiny_tokenizer

    teacher_dir = workdir / "tiny-teacher"
    tiny_llama(vocab_size=96, hidden=48, layers=6, seed=7).save_pretrained(teacher_dir)
    tiny_tokenizer(96).save_pretrained(teacher_dir)
    base = {
        "model": {"device": "cpu"},
        "objective": {"kwargs": {"top_k": 16}},
        "rollout": {"max_new_tokens": 8, "rollouts_per_prompt": 2},
        "data": {"prompts": "mcq", "eval_prompts": 4},
        "train": {"prompts_per_step": 2, "micro_batch_size": 4, "lr": 1e-3, "save_every": 0, "progress": False},
    }
    return Plan(str(teacher_dir), [Setting("mild", 4, 2), Setting("strong", 2, 2)], [0, 1], 4, 2, base)


def _config(plan: Plan, out_dir: Path, overrides: dict, **sections):
    from tropd.train.config import load_config

    data = yaml.safe_load(yaml.safe_dump(plan.base))
    data.setdefault("model", {})["teacher"] = plan.teacher
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    data["train"]["output_dir"] = str(out_dir)
    path = out_dir.parent / f"{out_dir.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return load_config(path).with_overrides(**overrides)


def heal(plan: Plan, setting: Setting, work: Path) -> str:
    """The fixed starting student of a setting: pruned teacher + supervised KD; returns its checkpoint path."""
    from tropd.train.run import train_from_config

    run = work / f"start-{setting.name}"
    done = run / "summary.json"
    if done.is_file():  # an earlier invocation with the same --workdir built it
        return json.loads(done.read_text())["checkpoint"]
    shutil.rmtree(run, ignore_errors=True)
    cfg = _config(plan, run, {"guidance.enabled": False, "data.eval_prompts": 0},
                  model={"student_layers": setting.student_layers}, objective={"name": "sft", "kwargs": {}},
                  train={"steps": setting.heal_steps, "seed": 1234})
    summary = train_from_config(cfg, console=lambda *_: None)
    return summary["checkpoint"]


def shared_eval(plan: Plan, work: Path):
    """One held-out evaluation for every run: the teacher's reference answers are computed once."""
    from tropd.eval.distill import DistillEval
    from tropd.models import prepare_tokenizer
    from tropd.tasks.encoding import encode_prompt
    from tropd.train.prompts import prompts_for
    from tropd.models import load_named_model, resolve_device

    cfg = _config(plan, work / "eval-config", {})
    teacher, tok = load_named_model(plan.teacher, device=resolve_device(cfg.model.device))
    prepare_tokenizer(tok)
    held_out = prompts_for(cfg.data.prompts, "test", 0)[: cfg.data.eval_prompts]
    return DistillEval(teacher, tok, [encode_prompt(p, tok) for p in held_out], cfg.rollout.max_new_tokens, held_out)


def run_method(plan: Plan, setting: Setting, start: str, label: str, objective: str, kwargs: dict,
               extra: dict, seed: int, work: Path, eval_fn, keep_checkpoints: bool = False,
               collect_only: bool = False) -> dict | None:
    """Train one (method, seed) from the setting's start, or reuse its finished run under ``work``.

    With ``collect_only`` nothing is trained or deleted: a run not finished under ``work`` gives None."""
    run = work / setting.name / f"{label}-seed{seed}"
    if not (run / "summary.json").is_file():
        if collect_only:
            return None
        shutil.rmtree(run, ignore_errors=True)  # a run cut off earlier restarts; its seed makes it identical
        _train_method(plan, start, run, objective, kwargs, extra, seed, eval_fn)
    if not (keep_checkpoints or collect_only):  # ~1 GB per run for a 360M student; only the metrics are needed
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
    return collect_run(run, objective, label, seed, setting)


def _train_method(plan: Plan, start: str, run: Path, objective: str, kwargs: dict, extra: dict, seed: int,
                  eval_fn) -> None:
    from tropd.objectives import objective_keywords
    from tropd.train.run import train_from_config

    shared = {k: v for k, v in plan.base.get("objective", {}).get("kwargs", {}).items()
              if k in objective_keywords(objective)}  # e.g. top_k only for objectives that read the top-k
    objective_kwargs = {**shared, **kwargs}
    cfg = _config(plan, run, extra, model={"student": start},
                  objective={"name": objective, "kwargs": objective_kwargs},
                  train={"steps": plan.steps, "seed": seed, "eval_every": plan.eval_every})
    train_from_config(cfg, console=lambda *_: None, eval_fn=eval_fn)


def collect_run(run: Path, objective: str, label: str, seed: int, setting: Setting) -> dict:
    """One finished run's entry of ``runs``, read back from its ``summary.json`` and ``metrics.jsonl``."""
    from tropd.train.tracking import read_metrics

    summary = json.loads((run / "summary.json").read_text())
    records = read_metrics(run)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/teacher_text_nll" in r]
    after, before = summary["eval_after"], summary["eval_before"]
    grad_norms = sorted(r["grad_norm"] for r in steps)
    p99 = grad_norms[min(len(grad_norms) - 1, math.ceil(0.99 * len(grad_norms)) - 1)]
    tail = steps[-3:]
    entropy = sum(r.get("student_entropy", 0.0) for r in tail) / len(tail)
    collapsed = (after["distinct_ratio"] < 0.5 * after["teacher_distinct_ratio"]) or entropy < 0.1
    return {
        "objective": objective, "method": label, "seed": seed, "setting": setting.name,
        "student_layers": setting.student_layers,
        "task_score": after.get("task_score"), "teacher_text_nll": after["teacher_text_nll"],
        "distinct_ratio": after["distinct_ratio"], "teacher_distinct_ratio": after["teacher_distinct_ratio"],
        "k1_rkl": sum(r.get("k1_rkl", 0.0) for r in tail) / len(tail), "grad_norm_p99": p99,
        "entropy": entropy, "collapsed": bool(collapsed), "wall_time_s": summary["wall_time_s"],
        "start": {k: before.get(k) for k in ("task_score", "teacher_text_nll", "distinct_ratio")},
        "curves": {
            "step": [r["step"] for r in steps],
            "grad_norm": [r["grad_norm"] for r in steps],
            "entropy": [r.get("student_entropy") for r in steps],
            "trust_frac": [r.get("trust_frac") for r in steps],
            "eval_step": [r["step"] for r in evals],
            "teacher_text_nll": [r["eval/teacher_text_nll"] for r in evals],
            "task_score": [r.get("eval/task_score") for r in evals],
        },
    }


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% t-interval (0 for a single value)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, 0.0
    return m, T975.get(len(values), 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def summarise(runs: list[dict]) -> list[dict]:
    out = []
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["setting"], r["method"]), []).append(r)
    for (setting, method), rs in groups.items():
        row = {"setting": setting, "method": method, "objective": rs[0]["objective"], "seeds": len(rs)}
        for key, name in (("task_score", "score"), ("teacher_text_nll", "teacher_text_nll"), ("k1_rkl", "k1_rkl"),
                          ("grad_norm_p99", "grad_norm_p99"), ("entropy", "entropy"),
                          ("distinct_ratio", "distinct_ratio")):
            vals = [r[key] for r in rs if r[key] is not None]
            if vals:
                row[f"{name}_mean"], row[f"{name}_ci95"] = mean_ci(vals)
        row["collapsed"] = sum(r["collapsed"] for r in rs)
        out.append(row)
    return out


def write_table(summary: list[dict], meta: dict, path: Path) -> None:
    lines = [f"# Paper in miniature ({meta['mode']})", "",
             f"Teacher `{meta['teacher']}`; {meta['steps']} steps per run; seeds {meta['seeds']}; "
             f"training wall time {meta['wall_time_s']:.0f} s summed over the runs on {meta['machine']}.", "",
             f"Score = held-out task score ({meta['suite']}, greedy). Lower teacher-text NLL = closer to the teacher. "
             f"Mean ± 95% CI over seeds. {COLLAPSE_RULE}. Command: `{meta['command']}`. "
             "What the numbers do and do not show: docs/results.md §3.", ""]
    for setting in dict.fromkeys(r["setting"] for r in summary):
        rows = [r for r in summary if r["setting"] == setting]
        start = meta["start"][setting]
        lines += [f"## Setting `{setting}` (student layers: {meta['layers'][setting]})", "",
                  "The starting student, before any method trains: "
                  + ", ".join(f"{k.replace('_', ' ')} {'n/a' if v is None else f'{v:.3f}'}" for k, v in start.items())
                  + ".", "",
                  "| method | score | teacher-text NLL | K1 rKL | grad-norm p99 | entropy | distinct | collapsed |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: r.get("teacher_text_nll_mean", 0.0)):
            cell = lambda k: (f"{r[k + '_mean']:.3f} ± {r[k + '_ci95']:.3f}" if k + "_mean" in r else "n/a")  # noqa: E731
            lines.append(f"| {r['method']} | {cell('score')} | {cell('teacher_text_nll')} | {cell('k1_rkl')} | "
                         f"{cell('grad_norm_p99')} | {cell('entropy')} | {cell('distinct_ratio')} | "
                         f"{r['collapsed']}/{r['seeds']} |")
        lines.append("")
    path.write_text("\n".join(lines))


def plot(runs: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for setting in dict.fromkeys(r["setting"] for r in runs):
        fig, axes = plt.subplots(1, 5, figsize=(22, 3.6))
        methods = dict.fromkeys(r["method"] for r in runs if "same_run_as" not in r)  # aliases: same curves
        for i, method in enumerate(methods):
            rs = [r for r in runs if r["setting"] == setting and r["method"] == method]
            style = {"color": plt.get_cmap("tab10")(i % 10), "lw": 2.0 if method.startswith("tropd") else 1.2}
            for ax, (xkey, ykey) in zip(axes, (("eval_step", "task_score"), ("eval_step", "teacher_text_nll"),
                                               ("step", "grad_norm"), ("step", "entropy"), ("step", "trust_frac"))):
                series = [r["curves"][ykey] for r in rs]
                if not series or any(v is None for s in series for v in s):
                    continue
                mean = [statistics.fmean(v) for v in zip(*series)]
                ax.plot(rs[0]["curves"][xkey], mean, label=method, **style)
        for ax, title in zip(axes, ("held-out task score", "held-out teacher-text NLL", "grad norm",
                                    "student entropy", "trust fraction")):
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[2].set_yscale("log")
        axes[0].legend(fontsize=6)
        fig.suptitle(f"setting {setting} (mean over seeds)")
        fig.tight_layout()
        name = f"paper_mini_{setting}.png"
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        files.append(name)
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny random models, 2 seeds, a few steps (CI)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--prompts-per-step", type=int, default=None, help="scale up on a GPU (full mode: 2)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="scale up on a GPU (full mode: 24)")
    p.add_argument("--methods", default=None, help="comma-separated subset of the method labels")
    p.add_argument("--settings", default=None,
                   help="the mismatch knob: comma-separated NAME:KEPT_LAYERS:HEAL_STEPS, e.g. "
                        "'mild:24:10,strong:18:10,severe:12:10' (full mode's default: the first two)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--workdir", default=None,
                   help="where runs go (default: a temporary folder); finished runs found there are reused, "
                        "so rerunning the same command after an interruption continues where it stopped")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each method run's final checkpoint (about 1 GB each in full mode)")
    p.add_argument("--collect", action="store_true",
                   help="train nothing: rebuild the results from the finished runs under --workdir")
    args = p.parse_args(argv)

    import platform

    import torch

    if args.collect and not args.workdir:
        p.error("--collect needs --workdir (the folder of an earlier run)")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="paper_mini_"))
    plan = quick_plan(work) if args.quick else full_plan(args.seeds, args.steps)
    if args.prompts_per_step:
        plan.base["train"]["prompts_per_step"] = args.prompts_per_step
    if args.max_new_tokens:
        plan.base["rollout"]["max_new_tokens"] = args.max_new_tokens
    if args.settings:
        plan.settings = [parse_setting(spec, p) for spec in args.settings.split(",")]
    if args.methods:
        wanted = [ALIASES.get(m, m) for m in args.methods.split(",")]
        unknown = sorted(set(wanted) - {m[0] for m in METHODS})
        if unknown:
            p.error(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(m[0] for m in METHODS)}")
        plan.methods = tuple(m for m in METHODS if m[0] in wanted)
    # Finished runs under --workdir are reused, so they must come from the same plan (seeds and methods aside).
    fingerprint = {"teacher": plan.teacher, "settings": [vars(s) for s in plan.settings], "steps": plan.steps,
                   "eval_every": plan.eval_every, "base": plan.base}
    stamp = work / "plan.json"
    if stamp.is_file() and json.loads(stamp.read_text()) != fingerprint:
        p.error(f"--workdir {work} holds runs of a different plan (see {stamp}); use a new --workdir")
    if not args.collect:
        work.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps(fingerprint, indent=1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs = []
    evaluate = None if args.collect else shared_eval(plan, work)
    for setting in plan.settings:
        start = None if args.collect else heal(plan, setting, work)
        for label, objective, kwargs, extra in plan.methods:
            for seed in plan.seeds:
                r = run_method(plan, setting, start, label, objective, kwargs, extra, seed, work, evaluate,
                               args.keep_checkpoints, args.collect)
                if r is None:
                    continue
                runs.append(r)
                runs += [{**r, "method": alias, "objective": alias.split("_noguide")[0], "same_run_as": label}
                         for alias, target in ALIASES.items() if target == label]
                print(f"[{time.perf_counter() - t0:7.0f}s] {setting.name:6s} {label:14s} seed {seed}: "
                      f"score={r['task_score']} nll={r['teacher_text_nll']:.3f} k1={r['k1_rkl']:.3f} "
                      f"entropy={r['entropy']:.2f} collapsed={r['collapsed']}", flush=True)
    summary = summarise(runs)
    meta = {"mode": "quick" if args.quick else "full", "teacher": plan.teacher if not args.quick else "tiny random",
            "steps": plan.steps, "seeds": plan.seeds, "suite": plan.base["data"]["prompts"],
            "layers": {s.name: s.student_layers for s in plan.settings},
            "heal_steps": {s.name: s.heal_steps for s in plan.settings},
            "start": {r["setting"]: r["start"] for r in runs},  # same checkpoint and greedy eval in a setting
            "wall_time_s": sum(r["wall_time_s"] for r in runs if "same_run_as" not in r),
            "invocation_s": time.perf_counter() - t0,
            "runs_found": len(runs), "collected": bool(args.collect),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
            "collapse_criterion": COLLAPSE_RULE, "command": " ".join(["python benchmarks/paper_mini.py", *sys.argv[1:]])}
    stem = "paper_mini_quick" if args.quick else "paper_mini"
    if not args.quick:
        meta["plots"] = plot(runs, out)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "runs": runs, "summary": summary}, indent=2))
    write_table(summary, meta, out / f"{stem}.md")
    print((out / f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
