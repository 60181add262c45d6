"""Gym experiments: one teacher, students along a mismatch knob, every method × seed from the same start.

Protocol (identical for every method; see docs/gym.md):

1. **Teacher**: a Llama decoder (:data:`TEACHER`) trained from scratch by SFT on teacher-style traces of every
   family until its held-out accuracy is high (stored with the cached model and reported).
2. **Students** (:data:`STUDENT`, smaller): one fixed starting checkpoint per value ``m`` of the mismatch knob,
   SFT'd (``student_steps``) on traces of which a share ``m`` is in the ``alt`` style (another valid order of
   steps, chosen per problem) and the rest in the teacher's style: ``m = 0`` is a weaker copy of the teacher's
   way of reasoning, ``m = 1`` reasons only in a way the teacher never writes. Their starting held-out accuracy
   and teacher NLL are measured and reported: that is the mismatch the knob produced.
3. **Runs**: for each (mismatch, method, seed), ``tropd.train.run.train_from_config`` from that start with the
   same budget (steps, prompts, rollouts, tokens); only the objective and its learning rate (:attr:`GymSpec.lrs`,
   chosen on the validation split) differ. Accuracy on the ``heldout`` (or, for learning-rate sweeps, ``valid``)
   problems, greedy, every ``eval_every`` steps.

Every trained model is cached by content hash (:mod:`tropd.gym.models`); every finished run writes
``record.json`` in its folder under ``workdir/<spec key>`` (:func:`run_folder`), so an interrupted experiment
continues where it stopped, and one with other budgets or models never mixes with it.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tropd.files import write_text_atomic
from tropd.gym.models import RECIPE_VERSION, DecoderSpec, SFTPlan, cache_key, gym_cache, trained_model
from tropd.gym.stats import level_name
from tropd.models import quiet_progress_bars

TEACHER = DecoderSpec(hidden=128, layers=2, heads=4, intermediate=384)
STUDENT = DecoderSpec(hidden=64, layers=2, heads=4, intermediate=192)
#: The committed experiment's values of the mismatch knob (share of alt-style traces in the student's SFT data).
MISMATCH: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0)
EVAL_SPLITS = ("heldout", "valid")

#: label -> (objective name, objective kwargs). REOPOLD as the paper runs it is ``clip_outlier``'s reward floor
#: and TrOPD without guidance is ``fkl_outlier`` (docs/method.md §3); they are listed under those names.
METHODS: dict[str, tuple[str, dict]] = {
    "opd": ("opd", {}),
    "tropd": ("tropd", {}),
    "fkl_outlier": ("fkl_outlier", {}),
    "clip_outlier": ("clip_outlier", {}),
    "mask_outlier": ("mask_outlier", {}),
    "eopd": ("eopd", {}),
    "gkd": ("gkd", {}),
    "trb": ("trb", {}),
    "sft": ("sft", {}),
    "fkl": ("fkl", {}),
    # the mechanism experiment's contrasts (docs/gym.md): on-policy reverse KL computed exactly over the vocabulary
    # (GKD with every sample on-policy), and SFT on the start student's own samples (no teacher: a control)
    "rkl_exact": ("gkd", {"beta": 1.0, "lmbda": 1.0}),
    "self_sft": ("sft", {}),
}
#: Methods whose "teacher" is the run's own starting student.
SELF_TAUGHT = ("self_sft",)
CORE = ("opd", "tropd")
#: The methods of the committed experiment (``fkl``, which the paper reports collapsing, runs on request).
EXPERIMENT = ("opd", "tropd", "fkl_outlier", "clip_outlier", "mask_outlier", "eopd", "gkd", "trb", "sft")


def check_mismatch(values: Iterable[float]) -> tuple[float, ...]:
    """The knob values as floats, each in [0, 1] (``ValueError`` naming the bad one)."""
    out = []
    for value in values:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not 0.0 <= number <= 1.0:
            raise ValueError(f"mismatch {value!r} is not a share in [0, 1] (the part of the student's SFT traces "
                             "written in the alt style: 0 = the teacher's style, 1 = only the alt style)")
        out.append(number)
    return tuple(dict.fromkeys(out))


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
    """Everything that defines an experiment's models and budgets (not which methods, seeds or knob values run).

    ``lr`` is the learning rate of a method without an entry in ``lrs`` (``(method, lr)`` pairs chosen by the
    validation sweep, docs/gym.md). Neither enters :meth:`key`: a run's folder names its own learning rate.
    ``betas``, ``lr_schedule``, ``lr_warmup_steps`` and ``grad_clip`` are every run's ``train.*`` optimizer settings
    (tropd's defaults; ``benchmarks/gym.py --probes`` varies them). ``student_seed`` draws the starting students
    (their SFT examples and order, which problems are written in the alt style, their initial weights): another
    value is another set of students for the same knob values (``benchmarks/gym.py --student-seed``)."""

    families: tuple[str, ...] = ("add", "modchain", "sort")
    teacher: DecoderSpec = TEACHER
    student: DecoderSpec = STUDENT
    teacher_steps: int = 1500
    teacher_examples: int = 20000
    teacher_recovery: float = 0.0
    student_steps: int = 700
    student_lr: float = 1e-3
    student_schedule: str = "constant"
    student_seed: int = 1
    heldout: int = 500
    valid: int = 300
    steps: int = 200
    prompts_per_step: int = 32
    rollouts_per_prompt: int = 2
    max_new_tokens: int = 56
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    lr_schedule: str = "linear"
    lr_warmup_steps: int = 0
    grad_clip: float = 1.0
    lrs: tuple[tuple[str, float], ...] = (("clip_outlier", 2e-04), ("eopd", 1e-04), ("fkl_outlier", 1e-04),
                                          ("gkd", 8e-04), ("mask_outlier", 2e-04), ("opd", 2e-04), ("sft", 8e-04),
                                          ("trb", 4e-04), ("tropd", 2e-04))
    eval_every: int = 50
    top_k: int = 16

    def lr_of(self, method: str) -> float:
        """The learning rate ``method`` trains with."""
        return dict(self.lrs).get(method, self.lr)

    def with_budget(self, steps: int | None = None, lr: float | None = None) -> GymSpec:
        """This spec with another number of steps per run (evaluations at most every ``steps``) and/or one
        learning rate for every method (replacing ``lrs``); None keeps the spec's."""
        spec = self if lr is None else replace(self, lr=lr, lrs=())
        return spec if steps is None else replace(spec, steps=steps, eval_every=max(1, min(spec.eval_every, steps)))

    def key(self) -> str:
        """Content hash of the models (their recipe version included) and budgets: run folders live under it, so a
        changed budget or retrained model never reuses old runs (the learning rates are in each run's folder name; a
        :data:`_LATER_FIELDS` field at its default stays out, so older runs keep their folders)."""
        return spec_key(asdict(self))

    def teacher_plan(self) -> SFTPlan:
        return SFTPlan(self.families, "teacher", recovery=self.teacher_recovery, examples=self.teacher_examples,
                       steps=self.teacher_steps)

    def student_plan(self, mismatch: float) -> SFTPlan:
        (mismatch,) = check_mismatch([mismatch])
        return SFTPlan(self.families, "teacher", alt_share=mismatch, examples=self.teacher_examples,
                       steps=self.student_steps, lr=self.student_lr, schedule=self.student_schedule,
                       seed=self.student_seed)


#: GymSpec changes that make the starting students *annealed*: the SFT recipe run to convergence (cosine decay to
#: 0) instead of stopped in its constant-rate phase. The first gym's students; docs/gym.md's mechanism contrasts them.
ANNEALED: dict = {"student_schedule": "cosine", "student_lr": 3e-3, "student_steps": 400}

#: GymSpec changes back to the first design's starting students (600 constant-rate SFT steps instead of 700): the
#: mechanism contrasts, the gradient-noise measurement and most probes of docs/gym.md were run from them.
FIRST_START: dict = {"student_steps": 600}

#: GymSpec changes back to the runs' schedule before the third design: a constant learning rate, evaluated every 100
#: steps. The mechanism contrasts (``--steps 150``) ran with it, and the probes with :data:`SECOND_BUDGET`.
CONSTANT_RATE: dict = {"lr_schedule": "constant", "eval_every": 100}

#: GymSpec changes back to the second design's run budget: 300 steps at a constant rate (docs/gym.md; its results are
#: at commit d821f07). Most probes of docs/gym.md ran with it.
SECOND_BUDGET: dict = {"steps": 300, **CONSTANT_RATE}

#: GymSpec fields added after the third design's runs, with their defaults: at its default a field stays out of
#: :meth:`GymSpec.key`, so the runs made before it existed keep their folders.
_LATER_FIELDS: dict = {"lr_warmup_steps": 0}


def spec_key(fields: dict) -> str:
    """:meth:`GymSpec.key` of a spec's fields (``asdict`` or as a results file records them): ``lr``, ``lrs`` and a
    :data:`_LATER_FIELDS` field at its default left out."""
    kept = {k: v for k, v in fields.items()
            if k not in ("lr", "lrs") and not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])}
    blob = json.dumps({**kept, "recipe": RECIPE_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


QUICK = GymSpec(teacher=DecoderSpec(hidden=32, layers=1, heads=2, intermediate=64), teacher_steps=30,
                teacher_examples=600, student=DecoderSpec(hidden=16, layers=1, heads=2, intermediate=32),
                student_steps=10, heldout=40, valid=20, steps=4, prompts_per_step=4, rollouts_per_prompt=1,
                max_new_tokens=24, eval_every=2, lrs=())  # the tuned rates are the full-size models'; one lr here


def eval_problems(spec: GymSpec, split: str = "heldout"):
    """The problems a run is evaluated on: ``spec.heldout`` held-out ones, or ``spec.valid`` validation ones."""
    from tropd.gym.tasks import make_dataset

    if split not in EVAL_SPLITS:
        raise ValueError(f"evaluation split must be one of {EVAL_SPLITS}, got {split!r}")
    return make_dataset(list(spec.families), split, spec.heldout if split == "heldout" else spec.valid, seed=0)


def _evaluator(spec: GymSpec, teacher_folder: Path | None, split: str = "heldout"):
    """GymEval over the evaluation problems (teacher NLL included when a teacher folder is given)."""
    from tropd.gym.evaluate import GymEval
    from tropd.gym.tokenizer import build_tokenizer
    from tropd.models import load_causal_lm

    teacher = load_causal_lm(teacher_folder)[0].eval() if teacher_folder is not None else None
    return GymEval(eval_problems(spec, split), build_tokenizer(), teacher, spec.max_new_tokens)


def _train(args: tuple) -> str:
    return str(trained_model(*args))


def trained_models(spec: GymSpec, mismatches: Iterable[float], root: Path | None = None,
                   log: Callable[[str], None] = print, workers: int = 1) -> dict:
    """Train (or find cached) the teacher and the starting student of each knob value, and evaluate each on this
    spec's held-out problems (afresh: the cache holds weights, not evaluations, so another held-out size never
    shows a stale start); models not cached yet train ``workers`` at a time. Returns their folders (``students``
    keyed by the float) and evaluations (``teacher_eval``; ``start_eval`` keyed by
    :func:`tropd.gym.stats.level_name`)."""
    from tropd.models import load_causal_lm

    def evaluate(folder: Path, teacher_folder: Path | None) -> dict:
        result = _evaluator(spec, teacher_folder)(load_causal_lm(folder)[0].eval())
        return {k: v for k, v in result.items() if k != "sample"}

    mismatches = check_mismatch(mismatches)
    log(f"teacher: {spec.teacher}, SFT {spec.teacher_steps} steps")
    plans = [(spec.teacher, spec.teacher_plan(), root)] + [(spec.student, spec.student_plan(m), root)
                                                            for m in mismatches]
    missing = [p for p in plans if not ((root or gym_cache()) / cache_key(p[0], p[1]) / "gym.json").is_file()]
    if workers > 1 and len(missing) > 1:  # the teacher and the students are independent: train them side by side
        log(f"training {len(missing)} models, {workers} at a time")
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_train, missing))
    teacher = trained_model(spec.teacher, spec.teacher_plan(), root, log)
    out = {"teacher": str(teacher), "teacher_eval": evaluate(teacher, None), "students": {}, "start_eval": {}}
    log(f"teacher held-out accuracy: {out['teacher_eval']['accuracy']:.3f}")
    for mismatch in mismatches:
        folder = trained_model(spec.student, spec.student_plan(mismatch), root, log)
        out["students"][mismatch] = str(folder)
        ev = out["start_eval"][level_name(mismatch)] = evaluate(folder, teacher)
        log(f"student at mismatch {level_name(mismatch)}: held-out accuracy {ev['accuracy']:.3f}, teacher NLL "
            f"{ev['teacher_nll']:.3f}")
    return out


@dataclass(frozen=True)
class RunJob:
    spec: GymSpec
    mismatch: float
    method: str
    seed: int
    teacher: str
    student: str
    workdir: str
    prompts: str
    threads: int = 1
    split: str = "heldout"
    #: The start's evaluation on ``split`` when already measured (:func:`trained_models`): the run's step-0
    #: evaluation, which would repeat it, uses it instead.
    start_eval: dict | None = None

    @property
    def lr(self) -> float:
        return self.spec.lr_of(self.method)


def run_folder(job: RunJob) -> Path:
    """``<workdir>/<spec key>/mismatch-<m>/<method>-lr<lr>-seed<seed>`` (``-valid`` appended when evaluated on the
    validation split)."""
    name = f"{job.method}-lr{job.lr:g}-seed{job.seed}" + ("-valid" if job.split == "valid" else "")
    return Path(job.workdir) / job.spec.key() / f"mismatch-{level_name(job.mismatch)}" / name


def run_one(job: RunJob) -> dict:
    """Train one (mismatch, method, seed) and return its record (or the finished one found in its folder)."""
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
    cfg = load_config().with_overrides(**{
        "model.teacher": job.student if job.method in SELF_TAUGHT else job.teacher,
        "model.student": job.student, "model.device": "cpu",
        "objective.name": name, "objective.kwargs": kwargs,
        "rollout.max_new_tokens": spec.max_new_tokens, "rollout.rollouts_per_prompt": spec.rollouts_per_prompt,
        "data.prompts": job.prompts, "data.chat_template": False, "data.eval_prompts": 0,
        "train.steps": spec.steps, "train.prompts_per_step": spec.prompts_per_step,
        "train.micro_batch_size": spec.prompts_per_step * spec.rollouts_per_prompt, "train.lr": job.lr,
        "train.betas": list(spec.betas), "train.lr_schedule": spec.lr_schedule,
        "train.lr_warmup_steps": spec.lr_warmup_steps, "train.grad_clip": spec.grad_clip,
        "train.sft_warmup_steps": 0, "train.save_every": 0, "train.progress": False, "train.seed": job.seed,
        "train.eval_every": spec.eval_every, "train.output_dir": str(run)})
    start = time.perf_counter()
    evaluate = _evaluator(spec, Path(job.teacher), job.split)
    if job.start_eval is not None:  # step 0's evaluation is the start's (the weights are the start's until step 1)
        evaluate = _first_answered(job.start_eval, evaluate)
    train_from_config(cfg, console=lambda *_: None, eval_fn=evaluate)
    record = read_record(run, job, time.perf_counter() - start)
    if record["last_step"] < spec.steps:  # stopped early (a stop request, e.g. SIGTERM): not a finished run
        raise RuntimeError(f"gym run {run} stopped at step {record['last_step']} of {spec.steps}; no record.json "
                           "written, so the next invocation runs it again")
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    write_text_atomic(done, json.dumps(record))
    return record


def _first_answered(first: dict, evaluate: Callable) -> Callable:
    """An evaluation hook that answers its first call with ``first`` and every later one with ``evaluate``."""
    pending = [first]
    return lambda model: pending.pop() if pending else evaluate(model)


def read_record(run: Path, job: RunJob, wall_s: float) -> dict:
    """A run's record (the schema :mod:`tropd.gym.stats` reads) from its ``metrics.jsonl``."""
    from tropd.train.tracking import read_metrics

    rows = read_metrics(run / "metrics.jsonl")
    evals = [r for r in rows if "eval/accuracy" in r]
    train = [r for r in rows if "step_time" in r]
    nan = float("nan")
    return {
        "mismatch": job.mismatch, "method": job.method, "seed": job.seed, "lr": job.lr, "split": job.split,
        "eval_steps": [int(r["step"]) for r in evals],
        "accuracy": [r["eval/accuracy"] for r in evals],
        "distinct": [r["eval/distinct"] for r in evals],
        "teacher_nll": [r.get("eval/teacher_nll", nan) for r in evals],
        "entropy": [r.get("student_entropy", nan) for r in train],
        "grad_norm": [r.get("grad_norm", nan) for r in train],
        "steps": len(train), "last_step": max((int(r["step"]) for r in rows if "step" in r), default=0),
        "wall_s": round(wall_s, 1),
        "family_accuracy": {k.split("/", 2)[2]: v for k, v in evals[-1].items()
                            if k.startswith("eval/accuracy/")} if evals else {},
    }


def plan_jobs(spec: GymSpec, models: dict, mismatches: tuple[float, ...], seeds: dict[str, int], workdir: Path,
              prompts: Path, threads: int = 1, split: str = "heldout",
              inner_seeds: dict[str, int] | None = None) -> list[RunJob]:
    """Every (mismatch, method, seed) job, seed by seed; the core comparison first within each. ``inner_seeds``
    (method -> seeds) replaces ``seeds`` at knob values strictly between 0 and 1 for the methods it names."""
    order = sorted(seeds, key=lambda m: (m not in CORE, list(METHODS).index(m) if m in METHODS else 99))
    inner_seeds = inner_seeds or {}

    def n_seeds(method: str, mismatch: float) -> int:
        return inner_seeds.get(method, seeds[method]) if 0.0 < mismatch < 1.0 else seeds[method]

    # a held-out run's step 0 is its start's evaluation, already measured; a validation run measures its own
    starts = {m: models["start_eval"].get(level_name(m)) if split == "heldout" else None for m in mismatches}
    jobs = []
    for seed in range(max(seeds.values(), default=0)):
        for mismatch in mismatches:
            for method in order:
                if seed < n_seeds(method, mismatch):
                    jobs.append(RunJob(spec, mismatch, method, seed, models["teacher"], models["students"][mismatch],
                                       str(workdir), str(prompts), threads, split, starts[mismatch]))
    return jobs


def write_prompts(spec: GymSpec, path: Path, n: int = 20000) -> Path:
    """The training prompts (train split, every family) as a jsonl file the trainer reads."""
    from tropd.gym.tasks import make_dataset

    problems = make_dataset(list(spec.families), "train", n, seed=123)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps({"prompt": p.prompt}) + "\n" for p in problems))
    return path


def run_gym(spec: GymSpec, seeds: dict[str, int], mismatches: Iterable[float], workdir: Path, workers: int = 2,
            cache: Path | None = None, log: Callable[[str], None] = print, split: str = "heldout",
            lr_grid: Iterable[float] = (), inner_seeds: dict[str, int] | None = None) -> dict:
    """Build the models, run every job (``workers`` processes of one thread each), return runs and context.
    With ``lr_grid``, every job runs once per learning rate of the grid (each method at each rate: a sweep);
    ``inner_seeds`` as in :func:`plan_jobs`."""
    for method in seeds:
        method_objective(method)
    mismatches = check_mismatch(mismatches)
    if split not in EVAL_SPLITS:
        raise ValueError(f"evaluation split must be one of {EVAL_SPLITS}, got {split!r}")
    workdir = Path(workdir)
    start = time.perf_counter()
    quiet_progress_bars()
    models = trained_models(spec, mismatches, cache, log, workers)
    prompts = write_prompts(spec, workdir / spec.key() / "prompts.jsonl",
                            n=min(20000, max(200, spec.steps * spec.prompts_per_step)))
    specs = [replace(spec, lr=lr, lrs=()) for lr in lr_grid] or [spec]
    jobs = [job for each in specs
            for job in plan_jobs(each, models, mismatches, seeds, workdir, prompts, split=split,
                                 inner_seeds=inner_seeds)]
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
        "eval_split": split,
        "eval_problems": spec.heldout if split == "heldout" else spec.valid,
        "spec": _jsonable(asdict(spec)),
        "seeds": seeds,
        "inner_seeds": inner_seeds or {},
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
    methods = list(METHODS)

    def rank(r: dict) -> tuple:  # knob value, then method in table order (others by name), then seed
        return (float(r["mismatch"]), methods.index(r["method"]) if r["method"] in methods else len(methods),
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
    log(f"[{done}/{total}] mismatch {level_name(record['mismatch']):5s} {record['method']:13s} seed "
        f"{record['seed']} (lr {record['lr']:g}): accuracy {acc[0]:.3f} -> {acc[-1]:.3f} ({record['wall_s']:.0f}s)")


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


