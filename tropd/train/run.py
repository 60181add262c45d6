"""One training job from a validated :class:`RunConfig` (what ``tropd train`` calls): open the run directory,
build the run's parts (:mod:`tropd.train.build`), train, write ``summary.json``."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tropd.files import write_text_atomic
from tropd.train.build import EvalFn, MakeSampler, build_accelerator, build_run
from tropd.train.config import RunConfig
from tropd.train.errors import NoStepTrainedError
from tropd.train.lock import RunFolderBusyError, RunLock
from tropd.train.resume import (CONFIG_FILE, open_run, tidy_checkpoints, write_data_fingerprint,
                                write_run_config)
from tropd.train.trainer import Trainer


def train_from_config(cfg: RunConfig, resume: bool = False, console=print, eval_fn: EvalFn | None = None,
                      override_config: bool = False, make_sampler: MakeSampler | None = None) -> dict:
    """Train, write the run directory (metrics, checkpoints, ``summary.json``), and return a summary (the
    report, ``tropd report``, is the caller's: ``tropd train`` writes it after the run).

    ``resume`` continues the run in ``cfg``'s run directory; settings that differ from the run's own are refused
    unless ``override_config``. Resuming a finished run changes nothing and returns its summary with
    ``already_complete: True``. ``eval_fn(student) -> dict`` replaces the default held-out evaluation, e.g. to
    share one precomputed evaluation between many runs; ``make_sampler(student, teacher, sampling_config)`` the
    default sampler (docs/extending.md).

    Order: accelerator → run directory (locked for the run's life, checked; the checkpoint to resume found) → the
    run's parts → trainer. A second process in the same run directory is refused (:mod:`tropd.train.lock`). A run
    whose every step was skipped as non-finite writes its summary, then raises
    :class:`~tropd.train.errors.NoStepTrainedError` with the cause (the student did not train).

    Under ``accelerate launch`` the process group the first call starts stays up for later calls in the same
    process and is destroyed when the process exits (:func:`~tropd.train.build.build_accelerator`); a group running
    before the first call (a script that made its own ``Accelerator`` first) is the caller's to end."""
    accelerator = build_accelerator(cfg)
    main = accelerator.is_main_process
    console = console if main else (lambda *_: None)
    if cfg.train.output_dir is None:  # one name for every process: the main process's
        from accelerate.utils import broadcast_object_list

        cfg.train.output_dir = broadcast_object_list([str(cfg.run_dir())])[0]
    run_dir = cfg.run_dir()
    lock = _lock_run_dir(run_dir, accelerator)
    try:
        return _train_locked(cfg, accelerator, resume, override_config, console, eval_fn, make_sampler)
    finally:
        if lock is not None:
            lock.release()


def _lock_run_dir(run_dir: Path, accelerator) -> RunLock | None:
    """The run folder's lock, taken by the main process (:mod:`tropd.train.lock`); every process raises
    :class:`RunFolderBusyError` when another run holds it."""
    lock, refusal = None, None
    if accelerator.is_main_process:
        try:
            lock = RunLock.acquire(run_dir)
        except RunFolderBusyError as err:
            refusal = (True, str(err))
        except OSError as err:  # a file by that name, no permission: every process stops with one line
            refusal = (False, str(err) if isinstance(err, FileExistsError) and not err.errno
                       else f"cannot open the run folder {run_dir} ({err.strerror or err}); choose another --run-dir")
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refusal = broadcast_object_list([refusal])[0]
    if refusal is not None:
        raise (RunFolderBusyError if refusal[0] else FileExistsError)(refusal[1])
    return lock


def _train_locked(cfg: RunConfig, accelerator, resume: bool, override_config: bool, console,
                  eval_fn: EvalFn | None, make_sampler: MakeSampler | None) -> dict:
    main = accelerator.is_main_process
    run_dir = cfg.run_dir().resolve()  # every path a run prints or records is absolute (summary.json, checkpoints)
    tidied = tidy_checkpoints(run_dir) if main and resume and (run_dir / CONFIG_FILE).is_file() else []
    accelerator.wait_for_everyone()  # the checkpoints are tidied before any process looks for one
    opened = open_run(cfg, resume, override_config, clean=False)
    opened.notes[:0] = tidied
    accelerator.wait_for_everyone()  # every process checked the folder before the main one writes into it
    for note in opened.notes:
        console(note)
    found = opened.checkpoint
    done_file = run_dir / "summary.json"
    if found is not None and found.step >= cfg.train.steps and done_file.is_file():
        summary = json.loads(done_file.read_text())
        console(f"{run_dir} is complete ({found.step} of {cfg.train.steps} steps): nothing to do; to train further "
                "raise train.steps and add --override-config")
        return {**summary, "already_complete": True, "main_process": main}
    t0 = time.perf_counter()
    parts = build_run(cfg, accelerator, resume_from=found.path if found else None, eval_fn=eval_fn,
                      make_sampler=make_sampler)
    console(f"run directory: {run_dir}")
    for note in parts.notes:
        console(note)
    trainer = Trainer(cfg, parts, run_dir, resume=found)
    if main:
        write_run_config(run_dir, trainer.config_yaml, opened.changes, trainer.start_step)
        write_data_fingerprint(run_dir, cfg.data.prompts, opened.data)
    result = trainer.train()
    steps_run = result["steps_done"] - trainer.start_step
    failure = None
    if steps_run > 0 and result["nonfinite_steps"] == steps_run:  # not one step changed the weights
        first = trainer.start_step + 1
        failure = (f"no step trained: {'the' if steps_run == 1 else 'all'} {steps_run} step(s) run (steps {first}–"
                   f"{result['steps_done']}) were skipped for a non-finite loss or gradient, so the student is "
                   f"unchanged; last cause: {result['last_nonfinite_reason']}. Likely causes: NaN/inf in the student's "
                   "or the teacher's weights, a learning rate too high (train.lr), half precision overflowing "
                   "(model.mixed_precision=no is safest)")
    if not main:
        if failure is not None:
            raise NoStepTrainedError(failure, {**result, "main_process": False})
        return {**result, "run_dir": str(run_dir), "main_process": False}
    summary = {"run_dir": str(run_dir), "steps_done": result["steps_done"], "steps_run": steps_run,
               "interrupted": result["interrupted"], "checkpoint": str(result["checkpoint"]),
               "eval_before": result.get("eval_before", {}), "eval_after": result.get("eval_after", {}),
               "nonfinite_steps": result["nonfinite_steps"], "wall_time_s": round(time.perf_counter() - t0, 1),
               "num_processes": accelerator.num_processes}
    if failure is not None:
        summary["failed"] = failure
    write_text_atomic(done_file, json.dumps(summary, indent=2))
    if failure is not None:
        raise NoStepTrainedError(failure, {**summary, "main_process": True})
    return {**summary, "main_process": True}
