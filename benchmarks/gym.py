"""The distillation gym's experiments: does on-policy distillation lift a matched student here, and does TrOPD
beat OPD along a continuous teacher-student mismatch?

    python benchmarks/gym.py            # the full experiment (docs/gym.md): every method at every knob value
    python benchmarks/gym.py --sweep    # the learning-rate sweep on the validation split behind GymSpec.lrs
    python benchmarks/gym.py --mechanism   # why on-policy distillation fails from an annealed student (docs/gym.md)
    python benchmarks/gym.py --probes   # the settings tried to lift opd's matched gain (docs/gym.md's design table)
    python benchmarks/gym.py --probes budget   # the third design's shorter run budget, constant rate or linear decay
    python benchmarks/gym.py --probes collapse   # opd and tropd at knob 1 with warm-up or a lower peak rate
    python benchmarks/gym.py --quick    # tiny models, 4 steps: checks the pipeline end to end (seconds)

A teacher (Llama decoder trained from scratch, cached) and one starting student per value of the mismatch knob
(the share of alt-style traces in the student's SFT data; ``tropd/gym/run.py``) are built once; then every method
trains from each start with the same budget and its own learning rate (``GymSpec.lrs``): ``opd`` and ``tropd``
with ``--core-seeds`` seeds (run first), the other methods with ``--seeds``. Finished runs are kept under
``--workdir``: an interrupted invocation continues where it stopped. Writes ``<out>/<stem>.{json,md,png}``
(``gym``, ``gym_sweep`` or ``gym_quick``).

``--mechanism`` runs the contrasts of docs/gym.md's mechanism section (:data:`MECHANISM`): K1 ``opd``, the exact
on-policy reverse KL (``rkl_exact``), SFT on teacher samples and SFT on the student's own samples (``self_sft``,
no teacher) from an annealed start and from a constant-lr one (the first design's 600-step students); one
learning rate for all; writes ``gym_mechanism.{json,md}``.

``--probes`` trains ``opd`` from the matched student under each of :data:`PROBES` (one change each to the first
design's spec: learning rate, schedule, optimizer, batch shape, teacher; then the starting student's SFT steps,
which chose the gym's), evaluated on the validation split, and writes ``gym_probes.{json,md}``; ``--probes budget``
the same for :data:`BUDGET_PROBES` (``gym_probes_budget.{json,md}``); ``--probes collapse`` trains ``opd`` and
``tropd`` from the knob-1 student under each of :data:`COLLAPSE_PROBES` (``gym_probes_collapse.{json,md}``).

``--sweep`` trains every method at each of ``--sweep-lrs`` on the knob values ``--sweep-mismatch``, one seed,
evaluated on the validation split (never the held-out problems), and prints each method's best rate by mean
final validation accuracy over the knob values ``--sweep-choose-on`` (default: the matched student only, where
distillation is meant to work, as a practitioner tunes on their own setting; the other values are shown, not
used): the rates ``GymSpec.lrs`` holds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from benchmarks.machine import describe  # noqa: E402
from tropd.gym.run import ANNEALED, CONSTANT_RATE, FIRST_START, SECOND_BUDGET, TEACHER  # noqa: E402

#: condition -> (GymSpec changes, learning rate, methods) of ``--mechanism`` (ANNEALED: students trained to
#: convergence, as in the first gym; FIRST_START: the first design's constant-rate students, 600 steps), trained at a
#: constant rate as they were (CONSTANT_RATE; the committed results ran ``--steps 150``).
CONTRASTS = ("opd", "rkl_exact", "sft", "self_sft")
MECHANISM = {
    "annealed start": ({**ANNEALED, **CONSTANT_RATE}, 1e-4, CONTRASTS),
    "constant-lr start (600 steps)": ({**FIRST_START, **CONSTANT_RATE}, 1e-4, CONTRASTS),
}


#: label -> (GymSpec changes, learning rate, seeds) of ``--probes``: ``opd`` from the matched student, validation
#: split, with the second design's budget (300 steps at a constant rate). The first design's rows start from its
#: 600-step students and change one thing each; the last rows vary the starting student's SFT steps, which chose the
#: gym's 700.
FIRST = {**SECOND_BUDGET, **FIRST_START}
PROBES = {
    "the first gym (600-step student)": (FIRST, 5e-5, 2),
    "4-layer teacher": ({**FIRST, "teacher": replace(TEACHER, layers=4)}, 5e-5, 1),
    "lr 7e-5": (FIRST, 7e-5, 1),
    "lr 1e-4": (FIRST, 1e-4, 1),
    "linear decay from 1e-4": ({**FIRST, "lr_schedule": "linear"}, 1e-4, 1),
    "linear decay from 2e-4": ({**FIRST, "lr_schedule": "linear"}, 2e-4, 1),
    "Adam beta1 0.95": ({**FIRST, "betas": (0.95, 0.999)}, 5e-5, 1),
    "no gradient clipping": ({**FIRST, "grad_clip": 0.0}, 5e-5, 1),
    "64 prompts x 1 response": ({**FIRST, "prompts_per_step": 64, "rollouts_per_prompt": 1}, 5e-5, 1),
    "150 steps of 64 prompts x 2": ({**FIRST, "steps": 150, "prompts_per_step": 64, "eval_every": 50}, 1e-4, 1),
    "teacher trained to recover (0.1)": ({**FIRST, "teacher_recovery": 0.1}, 5e-5, 2),
    "student of 500 SFT steps": ({**SECOND_BUDGET, "student_steps": 500}, 5e-5, 1),
    "student of 700 SFT steps (the gym)": ({**SECOND_BUDGET, "student_steps": 700}, 5e-5, 2),
    "student of 800 SFT steps": ({**SECOND_BUDGET, "student_steps": 800}, 5e-5, 2),
    "student of 900 SFT steps": ({**SECOND_BUDGET, "student_steps": 900}, 5e-5, 2),
    "student of 1000 SFT steps": ({**SECOND_BUDGET, "student_steps": 1000}, 5e-5, 2),
}

#: label -> (GymSpec changes, learning rate, seeds) of ``--probes budget``: the third design's shorter budget (200
#: steps, evaluated every 50) from the gym's 700-step matched student, at a constant rate and with linear decay.
BUDGET_PROBES = {
    "200 steps, constant 1e-4": ({"lr_schedule": "constant"}, 1e-4, 2),
    "200 steps, linear decay from 2e-4": ({"lr_schedule": "linear"}, 2e-4, 2),
    "200 steps, linear decay from 3e-4": ({"lr_schedule": "linear"}, 3e-4, 2),
}
#: label -> (GymSpec changes, learning rate, seeds) of ``--probes collapse``: ``opd`` and ``tropd`` from the knob-1
#: student, where ``opd`` collapses within its first 50 steps (docs/gym.md): is the collapse the early, highest
#: rate's? None: each method's own rate (``GymSpec.lrs``), as in the experiment.
COLLAPSE_PROBES = {
    "the gym (linear decay from the peak)": ({}, None, 3),
    "20 warm-up steps to the peak": ({"lr_warmup_steps": 20}, None, 3),
    "50 warm-up steps to the peak": ({"lr_warmup_steps": 50}, None, 3),
    "half the peak (linear decay from 1e-4)": ({}, 1e-4, 3),
}

#: name -> (probes, methods, knob value, title of the report) of ``--probes NAME``
PROBE_SETS = {
    "design": (PROBES, ("opd",), 0.0, "What lifts opd's matched gain? One change to the gym at a time"),
    "budget": (BUDGET_PROBES, ("opd",), 0.0, "The third design's run budget: opd's matched gain in 200 steps"),
    "collapse": (COLLAPSE_PROBES, ("opd", "tropd"), 1.0,
                 "Is the collapse at knob 1 the early, highest rate's? opd and tropd with warm-up or a lower peak"),
}


def run_probes(spec, probe_set: str, workdir: Path, workers: int, quick: bool = False) -> dict:
    """The methods of ``probe_set`` (:data:`PROBE_SETS`) at its knob value under every entry of its probes, on the
    validation split; ``{label: run_gym result}`` (``quick``: the tiny spec's sizes stay, warm-up at most its steps
    - 1, one seed)."""
    from tropd.gym.run import run_gym

    probes, methods, mismatch, _ = PROBE_SETS[probe_set]
    out = {}
    for label, (changes, lr, seeds) in probes.items():
        if quick:
            changes = {k: min(v, spec.steps - 1) if k == "lr_warmup_steps" else v for k, v in changes.items()
                       if k not in ("teacher", "student_steps", "steps", "eval_every")}
        each = replace(spec, **changes) if lr is None else replace(spec, **changes, lr=lr, lrs=())
        out[label] = run_gym(each, {m: 1 if quick else seeds for m in methods}, (mismatch,), workdir,
                             workers=workers, split="valid")
    return out


def probes_table(results: dict, meta: dict, title: str) -> str:
    """One row per (probe, method): start, final accuracy per seed, mean gain, collapses (COLLAPSE_RULE); with
    ``tropd`` beside ``opd``, their paired difference of final accuracy (95% interval)."""
    from tropd.gym.stats import collapsed, comparisons, final_accuracy, level_name

    lines = [f"# {title}", "",
             f"- **command**: `{meta['command']}`", f"- **machine**: {meta['machine']}",
             f"- **duration**: {meta['duration'] / 60:.0f} min", "",
             "Each method from the student of the knob value and SFT steps the columns give; accuracy on the "
             "**validation** problems (never the held-out ones), per seed; gain = final − start in points; collapsed "
             "= runs that meet the gym's collapse rule (docs/gym.md); wall = seconds per run.", "",
             "| probe | method | knob | student | run budget | lr | start acc | final acc per seed | mean gain | "
             "collapsed | wall (s) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    paired = []
    for label, result in results.items():
        spec = result["context"]["spec"]
        budget = f"{spec['steps']} steps, {spec['lr_schedule']} rate"
        if spec.get("lr_warmup_steps"):
            budget += f" after {spec['lr_warmup_steps']} warm-up steps"
        for method in dict.fromkeys(r["method"] for r in result["runs"]):
            runs = sorted((r for r in result["runs"] if r["method"] == method), key=lambda r: r["seed"])
            finals = [final_accuracy(r) for r in runs]
            start = runs[0]["accuracy"][0]
            gain = 100 * (sum(finals) / len(runs) - start)
            wall = sum(r["wall_s"] for r in runs) / len(runs)
            down = sum(collapsed(r, result["context"]) for r in runs)
            lines.append(f"| {label} | {method} | {level_name(runs[0]['mismatch'])} | {spec['student_steps']} steps | "
                         f"{budget} | {runs[0]['lr']:g} | {100 * start:.1f} | "
                         f"{', '.join(f'{100 * f:.1f}' for f in finals)} | {gain:+.1f} | {down}/{len(runs)} | "
                         f"{wall:.0f} |")
        for c in comparisons(result["runs"]):  # tropd − opd, paired by seed
            if c["metric"] == "final_accuracy":
                paired.append(f"| {label} | {100 * c['mean_diff']:+.1f} [{100 * c['ci_low']:+.1f}, "
                              f"{100 * c['ci_high']:+.1f}] | {c['n']} |")
    if paired:
        lines += ["", "`tropd` − `opd`, final validation accuracy in points, paired by seed (95% interval):", "",
                  "| probe | tropd − opd | seeds |", "|---|---|---|", *paired]
    return "\n".join(lines + [""])


def run_mechanism(spec, seeds: int, workdir: Path, workers: int, quick: bool = False) -> dict:
    """Every :data:`MECHANISM` condition at knob value 0; ``{condition: {"runs", "context"}}`` (``quick``: the
    schedules and teachers change, the tiny spec's sizes stay)."""
    from tropd.gym.run import run_gym

    out = {}
    for condition, (changes, lr, methods) in MECHANISM.items():
        if quick:
            changes = {k: v for k, v in changes.items() if k not in ("student_steps", "student_lr")}
        each = replace(spec, **changes, lr=lr, lrs=())
        out[condition] = run_gym(each, {m: seeds for m in methods}, (0.0,), workdir, workers=workers)
    return out


def mechanism_table(results: dict, meta: dict) -> str:
    from tropd.gym.stats import summarise

    lines = ["# Why on-policy distillation fails from an annealed student: the gym's mechanism contrasts", "",
             f"- **command**: `{meta['command']}`", f"- **machine**: {meta['machine']}",
             f"- **duration**: {meta['duration'] / 60:.0f} min", f"- **budget**: {meta['budget']}", "",
             "Matched students (mismatch 0). Held-out accuracy in %, mean ± 95% t interval over seeds; gain = final "
             "− start, in points.", "",
             "| condition | start acc | method | n | final acc | gain | final teacher NLL | grad-norm p99 |",
             "|---|---|---|---|---|---|---|---|"]
    for condition, result in results.items():
        start = result["context"]["mismatch_start"]["0"]["accuracy"]
        for row in summarise(result["runs"], result["context"]):
            ci = row["gain_ci"]
            gain = f"{100 * row['gain']:+.1f}" + ("" if math.isnan(ci) else f" ± {100 * ci:.1f}")
            final = f"{100 * row['final_acc']:.1f}" + ("" if math.isnan(row["final_acc_ci"])
                                                       else f" ± {100 * row['final_acc_ci']:.1f}")
            lines.append(f"| {condition} | {100 * start:.1f} | {row['method']} | {row['n']} | {final} | {gain} | "
                         f"{row['final_teacher_nll']:.3f} | {row['grad_p99']:.3g} |")
    return "\n".join(lines + [""])


def best_rates(runs: list[dict], choose_on: tuple[float, ...] | None = None) -> dict[str, tuple[float, float]]:
    """``{method: (lr, mean final accuracy)}``: per method, the learning rate whose runs end with the highest mean
    final accuracy over the knob values ``choose_on`` (None: every value swept; ties: the smaller rate)."""
    from tropd.gym.stats import final_accuracy, mean_ci

    by: dict[tuple[str, float], list[float]] = {}
    for run in runs:
        if choose_on is not None and float(run["mismatch"]) not in choose_on:
            continue
        by.setdefault((run["method"], run["lr"]), []).append(final_accuracy(run))
    best: dict[str, tuple[float, float]] = {}
    for (method, lr), accs in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        mean = mean_ci(accs)[0]
        if method not in best or (not math.isnan(mean) and mean > best[method][1]):
            best[method] = (lr, mean)
    return best


def sweep_table(runs: list[dict], best: dict, meta: dict, choose_on: tuple[float, ...]) -> str:
    from tropd.gym.stats import final_accuracy, level_name

    rates = sorted({r["lr"] for r in runs})
    levels = sorted({r["mismatch"] for r in runs})
    cell = {(r["method"], r["lr"], r["mismatch"]): final_accuracy(r) for r in runs}
    lines = ["# Gym learning-rate sweep (validation split)", "", f"- **command**: `{meta['command']}`",
             f"- **machine**: {meta['machine']}", f"- **duration**: {meta['duration'] / 60:.0f} min (this invocation; "
             f"runs finished by earlier ones are reused), {sum(r['wall_s'] for r in runs) / 60:.0f} min of run time "
             "in all", f"- **budget**: {meta['budget']}", "",
             "Final accuracy (%) on the validation problems, one seed, per learning rate and knob value; the chosen "
             f"rate (best mean over knob values {', '.join(level_name(m) for m in choose_on)}) in bold.", "",
             "| method | " + " | ".join(f"lr {lr:g}: " + ", ".join(f"m={level_name(m)}" for m in levels)
                                       for lr in rates) + " | chosen |",
             "|---|" + "---|" * len(rates) + "---|"]
    for method in dict.fromkeys(r["method"] for r in runs):
        parts = []
        for lr in rates:
            text = ", ".join(f"{100 * cell[(method, lr, m)]:.1f}" if (method, lr, m) in cell else "–" for m in levels)
            parts.append(f"**{text}**" if best[method][0] == lr else text)
        lines.append(f"| {method} | " + " | ".join(parts) + f" | {best[method][0]:g} |")
    chosen = ", ".join(f'("{m}", {lr:g})' for m, (lr, _) in best.items())
    return "\n".join(lines + ["", f"`GymSpec.lrs = ({chosen},)`", ""])


def write_report(out: Path, stem: str, text: str, payload: dict) -> int:
    """``<out>/<stem>.md`` (``text``, also printed) and ``<out>/<stem>.json`` (``payload``, non-finite floats as
    null); returns the exit status 0."""
    from tropd.gym.run import _jsonable

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(_jsonable(payload), indent=1) + "\n")
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    from tropd.gym.run import (CORE, EXPERIMENT, MISMATCH, QUICK, GymSpec, check_mismatch, run_gym,
                               write_outputs)

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models, 4 steps, opd/tropd/gkd, one seed")
    p.add_argument("--sweep", action="store_true", help="the learning-rate sweep on the validation split")
    p.add_argument("--mechanism", action="store_true", help="the mechanism contrasts (docs/gym.md)")
    p.add_argument("--probes", nargs="?", const="design", choices=sorted(PROBE_SETS),
                   help="one change to the gym at a time, on the validation split: 'design' (PROBES, the default: "
                        "opd's matched gain), 'budget' (BUDGET_PROBES, the third design's run budget) or 'collapse' "
                        "(COLLAPSE_PROBES: opd and tropd at knob 1 with warm-up or a lower peak)")
    p.add_argument("--core-seeds", type=int, default=5, help="seeds of opd and tropd per knob value")
    p.add_argument("--seeds", type=int, default=3, help="seeds of every other method per knob value")
    p.add_argument("--inner-seeds", type=int, default=None,
                   help="seeds of every method but opd at knob values strictly inside (0, 1) (default: as at 0 and 1)")
    p.add_argument("--methods", default=",".join(EXPERIMENT), help="comma-separated methods")
    p.add_argument("--mismatch", default=",".join(f"{m:g}" for m in MISMATCH), help="comma-separated knob values")
    p.add_argument("--sweep-lrs", default="1e-4,2e-4,4e-4,8e-4", help="--sweep: learning rates tried per method")
    p.add_argument("--sweep-mismatch", default="0", help="--sweep: knob values the rates are tried on")
    p.add_argument("--sweep-choose-on", default="0", help="--sweep: knob values whose mean accuracy picks the rate")
    p.add_argument("--lr", type=float, default=None, help="one learning rate for every method (default: GymSpec.lrs)")
    p.add_argument("--steps", type=int, default=None, help=f"steps per run (default: GymSpec's {GymSpec.steps})")
    p.add_argument("--student-seed", type=int, default=None,
                   help=f"another set of starting students (GymSpec.student_seed; default {GymSpec.student_seed}): "
                        "does a finding hold from other starts?")
    p.add_argument("--stem", default=None, help="output name (default: gym, gym_sweep, gym_probes or gym_mechanism, "
                                                 "most with _quick under --quick, then _student_seed<N> under "
                                                 "--student-seed N: another set of students never overwrites the "
                                                 "default set's results)")
    p.add_argument("--workers", type=int, default=2, help="runs at once (one CPU thread each)")
    p.add_argument("--workdir", default=str(ROOT / "runs" / "gym-benchmark"), help="run folders (resumable)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the outputs")
    args = p.parse_args(argv)

    methods = ["opd", "tropd", "gkd"] if args.quick else args.methods.split(",")
    spec = (QUICK if args.quick else GymSpec()).with_budget(steps=args.steps, lr=args.lr)
    if args.student_seed is not None:
        spec = replace(spec, student_seed=args.student_seed)
    other_students = "" if args.student_seed in (None, GymSpec.student_seed) else f"_student_seed{args.student_seed}"
    workdir = Path(args.workdir) / ("quick" if args.quick else "full")
    start = time.perf_counter()
    command = " ".join(["python benchmarks/gym.py", *(sys.argv[1:] if argv is None else argv)])
    machine = f"{describe(load=False)}, {args.workers} runs at a time"
    if args.mechanism:
        results = run_mechanism(spec, 1 if args.quick else 2, workdir, args.workers, args.quick)
        meta = {"command": command, "machine": machine, "duration": round(time.perf_counter() - start, 1),
                "budget": f"{spec.steps} steps of {spec.prompts_per_step} prompts x {spec.rollouts_per_prompt} "
                          "rollouts, one learning rate for every method (the condition's)"}
        stem = args.stem or ("gym_mechanism_quick" if args.quick else "gym_mechanism") + other_students
        return write_report(Path(args.out), stem, mechanism_table(results, meta), {"meta": meta, "results": results})
    if args.probes:
        results = run_probes(spec, args.probes, workdir, args.workers, args.quick)
        meta = {"command": command, "machine": machine, "duration": round(time.perf_counter() - start, 1)}
        stem = args.stem or ("gym_probes" + ("" if args.probes == "design" else f"_{args.probes}")
                             + ("_quick" if args.quick else "") + other_students)
        return write_report(Path(args.out), stem, probes_table(results, meta, PROBE_SETS[args.probes][3]),
                            {"meta": meta, "results": results})
    if args.sweep:
        tried, choose_on = (check_mismatch(v.split(",")) for v in (args.sweep_mismatch, args.sweep_choose_on))
        if not set(choose_on) <= set(tried):
            p.error(f"--sweep-choose-on {args.sweep_choose_on} names knob values --sweep-mismatch does not run")
        result = run_gym(spec, {m: 1 for m in methods}, tried, workdir,
                         workers=args.workers, split="valid", lr_grid=[float(x) for x in args.sweep_lrs.split(",")])
        runs, context = result["runs"], result["context"]
        best = best_rates(runs, choose_on)
        meta = {"command": command, "machine": machine, "duration": round(time.perf_counter() - start, 1),
                "budget": f"{spec.steps} steps of {spec.prompts_per_step} prompts x {spec.rollouts_per_prompt} "
                          "rollouts"}
        stem = args.stem or "gym_sweep" + other_students
        return write_report(Path(args.out), stem, sweep_table(runs, best, meta, choose_on),
                            {"meta": meta, "context": context, "chosen": best, "runs": runs})

    mismatches = (0.0, 1.0) if args.quick else check_mismatch(args.mismatch.split(","))
    seeds = {m: (1 if args.quick else args.core_seeds if m in CORE else args.seeds) for m in methods}
    inner = None if args.inner_seeds is None else {m: args.inner_seeds for m in methods if m != "opd"}
    result = run_gym(spec, seeds, mismatches, workdir, workers=args.workers, inner_seeds=inner)
    lrs = ", ".join(f"{m} {spec.lr_of(m):g}" for m in methods)
    meta = {"command": command, "duration": round(time.perf_counter() - start, 1),
            "budget": f"{spec.steps} steps of {spec.prompts_per_step} prompts x {spec.rollouts_per_prompt} "
                      f"rollouts; learning rates: {lrs}",
            "machine": machine + f", load {os.getloadavg()[0]:.2f} at the end",
            "run time": f"{sum(r['wall_s'] for r in result['runs']) / 60:.0f} min summed over "
                        f"{len(result['runs'])} runs, {args.workers} at a time (the duration is this invocation's: "
                        "runs finished by an earlier one are reused)"}
    compare = tuple(m for m in methods if m != "opd")
    stem = args.stem or ("gym_quick" if args.quick else "gym") + other_students
    paths = write_outputs(result, Path(args.out), stem, meta, compare=compare)
    print(paths["md"].read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
