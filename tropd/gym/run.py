"""Gym experiments: one teacher, students at several mismatch levels, every method × seed from the same start.

Protocol (identical for every method; see docs/gym.md):

1. **Teacher**: a Llama decoder (:data:`TEACHER`) trained from scratch by SFT on teacher-style traces of every
   family until its held-out accuracy is high (stored with the cached model and reported).
2. **Students** (:data:`STUDENT`, smaller): one fixed starting checkpoint per mismatch level, SFT'd briefly
   (``student_steps``) on ``matched`` = the teacher's trace style, ``alt`` = another valid style (other order of
   steps), or ``noisy`` = teacher traces with a share ``noise`` of their steps corrupted. Their starting held-out
   accuracy and teacher NLL are measured and reported: that is the mismatch the knob produced.
3. **Runs**: for each (level, method, seed), ``tropd.train.run.train_from_config`` from that level's start with
   the same budget (steps, prompts, rollouts, tokens, learning rate); only the objective differs, at its defaults.
   Held-out accuracy (``heldout`` problems, greedy) every ``eval_every`` steps.

Every trained model is cached by content hash (:mod:`tropd.gym.models`); every finished run writes
``record.json`` in its folder under ``workdir/<spec key>`` (:func:`run_folder`), so an interrupted experiment
continues where it stopped, and one with other budgets or models never mixes with it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

from tropd.gym.models import DecoderSpec, SFTPlan, model_info, trained_model
from tropd.models import quiet_progress_bars

TEACHER = DecoderSpec(hidden=128, layers=4, heads=4, intermediate=384)
STUDENT = DecoderSpec(hidden=64, layers=2, heads=4, intermediate=192)
LEVELS = ("matched", "alt", "noisy")

#: label -> (objective name, objective kwargs). REOPOLD as the paper runs it is ``clip_outlier``'s reward floor
#: and TrOPD without guidance is ``fkl_outlier`` (docs/method.md §3); they are listed under those names.
METHODS: dict[str, tuple[str, dict]] = {
    "opd": ("opd", {}),
    "tropd": ("tropd", {}),
    "fkl_outlier": ("fkl_outlier", {}),
    "eopd": ("eopd", {}),
    "clip_outlier": ("clip_outlier", {}),
    "mask_outlier": ("mask_outlier", {}),
    "fkl": ("fkl", {}),
    "gkd": ("gkd", {}),
    "trb": ("trb", {}),
}
CORE = ("opd", "tropd")


def method_objective(method: str) -> tuple[str, dict]:
    """(objective name, kwargs) of a gym method: :data:`METHODS`, or any registered objective at its defaults."""
    from tropd.objectives import describe_objectives

    if method in METHODS:
        return METHODS[method]
    if method in describe_objectives():
        return method, {}
    raise ValueError(f"unknown gym method {method!r}: a registered objective (tropd objectives lists them; a "
                     f"module registering your own is loaded with --plugin) or one of {sorted(METHODS)}")


@dataclass(frozen=True)
class GymSpec:
    """Everything that defines an experiment's models and budgets (not which methods or seeds run)."""

    families: tuple[str, ...] = ("add", "modchain", "sort")
    teacher: DecoderSpec = TEACHER
    student: DecoderSpec = STUDENT
    teacher_steps: int = 3000
    teacher_examples: int = 20000
    student_steps: int = 400
    noise: float = 0.3
    heldout: int = 600
    steps: int = 200
    prompts_per_step: int = 16
    rollouts_per_prompt: int = 2
    max_new_tokens: int = 56
    lr: float = 1e-4
    eval_every: int = 25
    top_k: int = 16

    def with_budget(self, steps: int | None = None, lr: float | None = None) -> GymSpec:
        """This spec with another number of steps per run (evaluations at most every ``steps``) and/or learning
        rate; None keeps the spec's."""
        from dataclasses import replace

        spec = self if lr is None else replace(self, lr=lr)
        return spec if steps is None else replace(spec, steps=steps, eval_every=max(1, min(spec.eval_every, steps)))

    def key(self) -> str:
        """Content hash of the spec: run folders live under it, so a changed budget never reuses old runs."""
        blob = json.dumps(asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def teacher_plan(self) -> SFTPlan:
        return SFTPlan(self.families, "teacher", examples=self.teacher_examples, steps=self.teacher_steps)

    def student_plan(self, level: str) -> SFTPlan:
        if level not in LEVELS:
            raise ValueError(f"unknown mismatch level {level!r}: choose from {LEVELS}")
        style = "teacher" if level == "matched" else level
        return SFTPlan(self.families, style, noise=self.noise if level == "noisy" else 0.0,
                       examples=self.teacher_examples, steps=self.student_steps, seed=1)


QUICK = GymSpec(teacher=DecoderSpec(hidden=32, layers=1, heads=2, intermediate=64), teacher_steps=30,
                teacher_examples=600, student=DecoderSpec(hidden=16, layers=1, heads=2, intermediate=32),
                student_steps=10, heldout=40, steps=4, prompts_per_step=4, rollouts_per_prompt=1, max_new_tokens=24,
                eval_every=2)


def heldout_problems(spec: GymSpec):
    from tropd.gym.tasks import make_dataset

    return make_dataset(list(spec.families), "heldout", spec.heldout, seed=0)


def _evaluator(spec: GymSpec, teacher_folder: Path | None):
    """GymEval over the held-out problems (teacher NLL included when a teacher folder is given)."""
    from tropd.gym.evaluate import GymEval
    from tropd.gym.tokenizer import build_tokenizer
    from tropd.models import load_causal_lm

    teacher = load_causal_lm(teacher_folder)[0].eval() if teacher_folder is not None else None
    return GymEval(heldout_problems(spec), build_tokenizer(), teacher, spec.max_new_tokens)


def build_models(spec: GymSpec, levels: tuple[str, ...], root: Path | None = None,
                 log: Callable[[str], None] = print) -> dict:
    """Train (or find cached) the teacher and each level's starting student; returns their folders and the
    held-out evaluation of each (``gym.json``)."""
    log(f"teacher: {spec.teacher}, SFT {spec.teacher_steps} steps")
    teacher = trained_model(spec.teacher, spec.teacher_plan(), root, log,
                            evaluate=lambda m, tok: _eval_with(spec, None, m))
    out = {"teacher": str(teacher), "teacher_eval": model_info(teacher)["eval"], "students": {}, "start_eval": {}}
    log(f"teacher held-out accuracy: {out['teacher_eval']['accuracy']:.3f}")
    for level in levels:
        folder = trained_model(spec.student, spec.student_plan(level), root, log,
                               evaluate=lambda m, tok: _eval_with(spec, teacher, m))
        out["students"][level] = str(folder)
        out["start_eval"][level] = model_info(folder)["eval"]
        ev = out["start_eval"][level]
        log(f"student '{level}': held-out accuracy {ev['accuracy']:.3f}, teacher NLL {ev['teacher_nll']:.3f}")
    return out


def _eval_with(spec: GymSpec, teacher_folder: Path | None, model) -> dict:
    result = _evaluator(spec, teacher_folder)(model)
    return {k: v for k, v in result.items() if k != "sample"}


@dataclass(frozen=True)
class RunJob:
    spec: GymSpec
    level: str
    method: str
    seed: int
    teacher: str
    student: str
    workdir: str
    prompts: str
    threads: int = 1


def run_folder(job: RunJob) -> Path:
    """``<workdir>/<spec key>/<level>/<method>-seed<seed>``."""
    return Path(job.workdir) / job.spec.key() / job.level / f"{job.method}-seed{job.seed}"


def run_one(job: RunJob) -> dict:
    """Train one (level, method, seed) and return its record (or the finished one found in its folder)."""
    run = run_folder(job)
    done = run / "record.json"
    if done.is_file():
        return json.loads(done.read_text())
    import torch

    from tropd.train.config import load_config
    from tropd.train.run import train_from_config

    torch.set_num_threads(job.threads)
    shutil.rmtree(run, ignore_errors=True)  # a run cut off earlier restarts; its seed makes it identical
    spec = job.spec
    name, kwargs = method_objective(job.method)
    from tropd.objectives import objective_keywords

    if "top_k" in objective_keywords(name):
        kwargs = {"top_k": spec.top_k, **kwargs}
    overrides = [
        f"model.teacher={job.teacher}", f"model.student={job.student}", "model.device=cpu",
        f"objective.name={name}", f"objective.kwargs={json.dumps(kwargs)}",
        f"rollout.max_new_tokens={spec.max_new_tokens}", f"rollout.rollouts_per_prompt={spec.rollouts_per_prompt}",
        f"data.prompts={job.prompts}", "data.chat_template=false", "data.eval_prompts=0",
        f"train.steps={spec.steps}", f"train.prompts_per_step={spec.prompts_per_step}",
        f"train.micro_batch_size={spec.prompts_per_step * spec.rollouts_per_prompt}", f"train.lr={spec.lr}",
        "train.sft_warmup_steps=0", "train.save_every=0", "train.progress=false", f"train.seed={job.seed}",
        f"train.eval_every={spec.eval_every}", f"train.output_dir={run}",
    ]
    cfg = load_config(None, overrides)
    start = time.perf_counter()
    train_from_config(cfg, console=lambda *_: None, eval_fn=_evaluator(spec, Path(job.teacher)))
    record = collect(run, job, time.perf_counter() - start)
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, done)
    return record


def collect(run: Path, job: RunJob, wall_s: float) -> dict:
    """A run's record (the schema :mod:`tropd.gym.stats` reads) from its ``metrics.jsonl``."""
    from tropd.train.tracking import read_metrics

    rows = read_metrics(run / "metrics.jsonl")
    evals = [r for r in rows if "eval/accuracy" in r]
    train = [r for r in rows if "step_time" in r]
    nan = float("nan")
    return {
        "mismatch": job.level, "method": job.method, "seed": job.seed,
        "eval_steps": [int(r["step"]) for r in evals],
        "accuracy": [r["eval/accuracy"] for r in evals],
        "distinct": [r["eval/distinct"] for r in evals],
        "teacher_nll": [r.get("eval/teacher_nll", nan) for r in evals],
        "entropy": [r.get("student_entropy", nan) for r in train],
        "grad_norm": [r.get("grad_norm", nan) for r in train],
        "steps": len(train), "wall_s": round(wall_s, 1),
        "family_accuracy": {k.split("/", 2)[2]: v for k, v in evals[-1].items()
                            if k.startswith("eval/accuracy/")} if evals else {},
    }


def plan_jobs(spec: GymSpec, models: dict, levels: tuple[str, ...], seeds: dict[str, int], workdir: Path,
              prompts: Path, threads: int = 1) -> list[RunJob]:
    """Every (level, method, seed) job; the core comparison first so that it finishes before the rest."""
    order = sorted(seeds, key=lambda m: (m not in CORE, list(METHODS).index(m) if m in METHODS else 99))
    jobs = []
    max_seeds = max(seeds.values(), default=0)
    for seed in range(max_seeds):
        for level in levels:
            for method in order:
                if seed < seeds[method]:
                    jobs.append(RunJob(spec, level, method, seed, models["teacher"], models["students"][level],
                                       str(workdir), str(prompts), threads))
    return jobs


def write_prompts(spec: GymSpec, path: Path, n: int = 20000) -> Path:
    """The training prompts (train split, every family) as a jsonl file the trainer reads."""
    from tropd.gym.tasks import make_dataset

    problems = make_dataset(list(spec.families), "train", n, seed=123)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"prompt": p.prompt}) + "\n" for p in problems))
    os.replace(tmp, path)
    return path


def run_gym(spec: GymSpec, seeds: dict[str, int], levels: tuple[str, ...], workdir: Path, workers: int = 2,
            cache: Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Build the models, run every job (``workers`` processes of one thread each), return runs and context."""
    for method in seeds:
        method_objective(method)
    for level in levels:
        if level not in LEVELS:
            raise ValueError(f"unknown mismatch level {level!r}: choose from {LEVELS}")
    workdir = Path(workdir)
    start = time.perf_counter()
    quiet_progress_bars()
    models = build_models(spec, levels, cache, log)
    prompts = write_prompts(spec, workdir / spec.key() / "prompts.jsonl",
                            n=min(20000, max(200, spec.steps * spec.prompts_per_step)))
    jobs = plan_jobs(spec, models, levels, seeds, workdir, prompts)
    log(f"{len(jobs)} runs ({workers} at a time) in {workdir}")
    runs = []
    if workers <= 1:
        for job in jobs:
            runs.append(run_one(job))
            _progress(log, runs[-1], len(runs), len(jobs))
    else:
        with ProcessPoolExecutor(workers) as pool:
            futures = [pool.submit(run_one, job) for job in jobs]
            for future in as_completed(futures):
                runs.append(future.result())
                _progress(log, runs[-1], len(runs), len(jobs))
    context = {
        "teacher_accuracy": models["teacher_eval"]["accuracy"],
        "teacher_distinct": models["teacher_eval"]["distinct"],
        "teacher_eval": models["teacher_eval"],
        "mismatch_start": models["start_eval"],
        "heldout_problems": spec.heldout,
        "spec": _jsonable(asdict(spec)),
        "seeds": seeds,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    return {"runs": runs, "context": context}


def write_outputs(result: dict, out: Path, stem: str, meta: dict, compare: tuple[str, ...] = ("tropd",),
                  baseline: str = "opd") -> dict[str, Path]:
    """``<out>/<stem>.json`` (runs, context, summary, comparisons), ``.md`` (the report) and ``.png`` (curves);
    each method in ``compare`` is tested against ``baseline`` (paired by seed)."""
    from tropd.gym import stats

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs, context = result["runs"], result["context"]
    levels, methods = list(LEVELS), list(METHODS)

    def rank(r: dict) -> tuple:  # level, then method in table order (others by name), then seed
        return (levels.index(r["mismatch"]), methods.index(r["method"]) if r["method"] in methods else len(methods),
                r["method"], r["seed"])

    runs = sorted(runs, key=rank)
    summary = stats.summarise(runs, context)
    comps = [row for method in compare if method != baseline for row in stats.comparisons(runs, method, baseline)]
    paths = {kind: out / f"{stem}.{kind}" for kind in ("json", "md", "png")}
    stats.plot(runs, paths["png"], context)
    stats.write_markdown(summary, comps, context, paths["md"], {**meta, "plot": paths["png"].name})
    payload = {"meta": meta, "context": context, "summary": summary, "comparisons": comps, "runs": runs}
    paths["json"].write_text(json.dumps(_jsonable(payload), indent=1) + "\n")
    return paths


def _progress(log, record: dict, done: int, total: int) -> None:
    acc = record["accuracy"]
    log(f"[{done}/{total}] {record['mismatch']:8s} {record['method']:13s} seed {record['seed']}: accuracy "
        f"{acc[0]:.3f} -> {acc[-1]:.3f} ({record['wall_s']:.0f}s)")


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


