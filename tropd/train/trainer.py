"""The training loop: prompts → rollouts → (per micro-batch: teacher scores → objective → backward) → AdamW
step → metrics / checkpoint.

The trainer orchestrates only: sampling lives in ``tropd.rollout``, teacher scoring in ``tropd.teacher``,
all loss math in ``tropd.objectives``, processes, wrapping and mixed precision in accelerate.

Data parallel (``accelerate launch``): ``train.prompts_per_step`` is the global batch; every process draws the
same prompts for a step and keeps its contiguous share of the rollouts. Every random draw depends only on
``(seed, step)`` and the row's index in the global batch (:class:`~tropd.rollout.RowStreams`: sampled tokens,
guidance, GKD sources, trust masks), so the result does not depend on the number of processes or on how rows
are chunked (up to floating-point summation order). The loss is normalised by the global token count; only the
main process writes the metrics log and checkpoints (the report is ``tropd train``'s, after the run). A run
stopped after step ``k`` and resumed from its checkpoint replays exactly.

Streaming: a step's rollouts are drawn first (they fix the global token count); then each micro-batch is scored
by the teacher, turned into a loss and backpropagated before the next is scored, so teacher tensors (full
``[B, T, V]`` logits for gkd/trb) and activations of one micro-batch at a time are alive, whatever the step size.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate.utils import gather_object

from tropd.forward import fused_head_supported, response_hidden_states, response_logits
from tropd.objectives.head import LMHead
from tropd.objectives import TokenInputs, count_loss_tokens, data_parallel_scale
from tropd.objectives.errors import NonFiniteInputError
from tropd.rollout import RolloutBatch, RowStreams, rollout_stats
from tropd.rollout.sampler import RolloutRequest
from tropd.train.build import RunParts
from tropd.train.checkpoint import ResumeState, load_trainer_state, save_checkpoint
from tropd.train.config import RunConfig
from tropd.train.errors import NonFiniteTrainingError
from tropd.train.schedule import lr_at
from tropd.train.seeds import step_seed
from tropd.train.sharding import full_weights, gathered_state, is_sharded, shard_optimizer_state
from tropd.train.tracking import MetricsLog

_SUMMED = ("loss", "num_tokens", "student_tokens")


def step_generator(seed: int, step: int) -> torch.Generator:
    """The random stream of one step's data order (the same on every process)."""
    return torch.Generator().manual_seed(step_seed(seed, step))  # in torch's range: train.seed is checked


@dataclass
class MicroBatch:
    """Rollouts of one micro-batch and the index of their first row in the step's global batch (the rows'
    random streams)."""

    offset: int
    batch: RolloutBatch


#: Step metrics that are the extreme of their micro-batches' values (over micro-batches with student tokens).
_EXTREMES = {"reward_min": min, "behavior_gap_max": max}


def merge_metrics(parts: list[dict]) -> dict:
    """Combine micro-batch metrics into step metrics: losses and counts add up (each micro-batch loss is
    already divided by the step's global token count), ``reward_min`` is the minimum and ``behavior_gap_max`` the
    maximum, everything else is a mean weighted by each micro-batch's student tokens (reward quantiles thus
    approximate the step's)."""
    out: dict[str, float] = {}
    weights = [max(p.get("student_tokens", 0.0), 0.0) for p in parts]
    for key in {k for p in parts for k in p}:
        vals = [(p[key], w) for p, w in zip(parts, weights) if key in p]
        if key.startswith(_SUMMED):
            out[key] = sum(v for v, _ in vals)
        elif key in _EXTREMES:
            kept = [v for v, w in vals if w > 0]
            out[key] = _EXTREMES[key](kept) if kept else 0.0
        else:
            wsum = sum(w for _, w in vals)
            out[key] = sum(v * w for v, w in vals) / wsum if wsum > 0 else (sum(v for v, _ in vals) / len(vals))
    return out


class Trainer:
    """Runs ``cfg.train.steps`` optimiser steps of on-policy distillation of ``parts.student`` towards
    ``parts.teacher``, writing metrics and checkpoints under ``run_dir``.

    The parts are built elsewhere (:mod:`tropd.train.build`) and only used here: the sampler draws rollouts, the
    teacher scores them, the objective (``parts.warmup`` for the first ``train.sft_steps()`` steps) turns
    them into a loss, the accelerator owns processes, DDP wrapping and mixed precision. The trainer's own are
    the AdamW optimizer over the student's trainable parameters and the loss forward: the student wrapped by the
    accelerator (and, with ``objective.fused``, its LM head read chunk by chunk); it samples, evaluates and
    saves with the plain student. ``resume``: the checkpoint whose optimizer and random states the run
    continues from."""

    def __init__(self, cfg: RunConfig, parts: RunParts, run_dir: Path, resume: ResumeState | None = None) -> None:
        if not parts.prompt_ids:
            raise ValueError("no training prompts: check data.prompts")
        student = parts.student
        self.cfg, self.student, self.teacher, self.tokenizer = cfg, student, parts.teacher, parts.tokenizer
        self.prompt_ids, self.run_dir, self.eval_fn = parts.prompt_ids, Path(run_dir), parts.eval_fn
        self.objective, self.warmup, self.sampler = parts.objective, parts.warmup, parts.sampler
        self.accelerator = parts.accelerator
        self.device = next(student.parameters()).device
        t, r = cfg.train, cfg.rollout
        self.rows_per_step = t.prompts_per_step * r.rollouts_per_prompt
        world = self.accelerator.num_processes
        if self.rows_per_step % world:
            raise ValueError(f"train.prompts_per_step × rollout.rollouts_per_prompt = {self.rows_per_step} rollouts "
                             f"per step cannot be shared evenly by {world} processes; make it a multiple of {world}")
        optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=t.lr,
                                      betas=tuple(t.betas), weight_decay=t.weight_decay)
        self.head = LMHead.of(student) if cfg.objective.fused and fused_head_supported(student) else None
        if cfg.objective.fused and self.head is None:
            warnings.warn("objective.fused: this model's last hidden_states entry is not what its LM head reads; "
                          "the loss uses full logits instead", RuntimeWarning, stacklevel=2)
        if is_sharded(student):  # FSDP2 (model.fsdp) shards and syncs itself: accelerate adds mixed precision only
            self.model = self.accelerator.prepare_model(student, evaluation_mode=True)
            self.optimizer = self.accelerator.prepare(optimizer)
        else:
            self.model, self.optimizer = self.accelerator.prepare(student, optimizer)
        self.config_yaml = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        shard = shard_optimizer_state if is_sharded(student) else None
        self.start_step = load_trainer_state(resume.path, self.optimizer, shard) if resume is not None else 0
        self._stop_requested = False
        self._nonfinite_in_a_row = 0
        self._saved: tuple[int, Path] | None = None  # (step, folder) of this process's last save

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    # -- one step ----------------------------------------------------------------------------------------
    def _phase(self, step: int):
        """(objective, step within its phase, steps in the phase) — sft warm-up first, then the objective."""
        warm = self.cfg.train.sft_steps()  # at most train.steps - 1
        if step < warm:
            return self.warmup, step, warm
        return self.objective, step - warm, self.cfg.train.steps - warm

    def _prompts_for_step(self, step: int) -> tuple[list[list[int]], int]:
        """This process's share of the step's global batch of prompts, and the global index of its first row."""
        t, r = self.cfg.train, self.cfg.rollout
        idx = torch.randint(len(self.prompt_ids), (t.prompts_per_step,), generator=step_generator(t.seed, step)).tolist()
        rows = [self.prompt_ids[i] for i in idx for _ in range(r.rollouts_per_prompt)]
        share = self.rows_per_step // self.accelerator.num_processes
        start = self.accelerator.process_index * share
        return rows[start:start + share], start

    def step_rollouts(self, step: int):
        """This process's rollouts of step ``step`` (generated ``rollout.batch_size`` sequences at a time), split
        into micro-batches. Returns ``(objective, [MicroBatch], progress)``."""
        cfg = self.cfg
        objective, phase_step, phase_steps = self._phase(step)
        prompts, start = self._prompts_for_step(step)
        self.student.eval()  # no dropout: behaviour log-probs and the loss forward see the same network
        micro = []
        # a sharded student decodes with gathered weights: processes decode different numbers of tokens
        with full_weights(self.student), torch.no_grad(), self.accelerator.autocast():  # the loss forward's precision
            for i in range(0, len(prompts), cfg.rollout.batch_size):
                request = RolloutRequest(objective.needs, phase_step, phase_steps, seed=cfg.train.seed,
                                         global_step=step, first_row=start + i, total_rows=self.rows_per_step,
                                         guidance=cfg.guidance, trb=cfg.trb)
                batch = self.sampler.sample(prompts[i:i + cfg.rollout.batch_size], request).to(self.device)
                for j in range(0, batch.batch_size, cfg.train.micro_batch_size):
                    micro.append(MicroBatch(start + i + j, batch.rows(j, j + cfg.train.micro_batch_size)))
        return objective, micro, phase_step / max(phase_steps, 1)

    def accumulate(self, objective, micro: list[MicroBatch], progress: float, step: int = 0) -> tuple[list[dict], str | None]:
        """Score, then backward, every micro-batch in turn with the step's global token count; returns their
        metrics, and the reason when an objective refused its inputs (NaN/inf). Every process runs as many backward
        passes as the others (a refused micro-batch backs a zero loss), so data-parallel gradient synchronisation
        stays in step."""
        n_tokens = count_loss_tokens(m.batch.loss_mask for m in micro)
        scale = data_parallel_scale()
        parts, reason = [], None
        for k, m in enumerate(micro):
            sync = k == len(micro) - 1
            with contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model):
                b = m.batch
                # the teacher first (in its own dtype, no grad): its temporaries are gone before the student's exist
                scores = self.teacher.score(b, objective.needs) if reason is None else None
                if self.head is not None:  # the fused loss: hidden states in, the vocabulary projection chunked
                    hidden = response_hidden_states(self.model, b.input_ids, b.attention_mask, b.response_start)
                    student = {"student_hidden": hidden, "student_head": self.head}
                else:
                    hidden = response_logits(self.model, b.input_ids, b.attention_mask, b.response_start)
                    student = {"student_logits": hidden}
                # a zero that reaches every trainable tensor, the head's included: processes whose micro-batch
                # is refused, or has no loss position, still produce every gradient the others synchronise
                zero = (self.head(hidden[:, :1]) if self.head is not None else hidden).sum() * 0.0
                loss = zero
                if scores is not None:
                    inputs = TokenInputs(**student, tokens=b.tokens, behavior_logprobs=b.behavior_logprobs,
                                         loss_mask=b.loss_mask, teacher_token_mask=b.teacher_token_mask,
                                         trust_uniforms=self._trust_uniforms(step, m),
                                         progress=progress, **scores.as_kwargs())
                    try:
                        with self.accelerator.autocast():  # the head's projection in the forward's precision
                            out = objective(inputs, num_tokens=n_tokens)
                        loss = out.loss * scale + zero
                        parts.append(out.metrics)
                    except NonFiniteInputError as err:  # e.g. a teacher emitting NaN: skip the step
                        reason = str(err)
                self.accelerator.backward(loss)
        return parts, reason

    def _trust_uniforms(self, step: int, m: MicroBatch) -> torch.Tensor:
        """``[B, T]`` uniforms of the micro-batch's rows for sampled trust masks (row streams, ``"trust"``)."""
        b, t = m.batch.tokens.shape
        streams = RowStreams.of(self.cfg.train.seed, b, step=step, first_row=m.offset, total_rows=self.rows_per_step)
        return streams.uniform("trust", t).to(self.device)

    def _all_processes(self, local: list) -> list:
        """The concatenation of every process's ``local`` list, in process order (on every process)."""
        return gather_object(local) if self.accelerator.num_processes > 1 else list(local)

    def run_step(self, step: int) -> dict:
        """One optimiser step; returns its log record. A step whose loss or gradient is not finite leaves the
        weights and optimizer state untouched (``nonfinite`` = 1 in its record, ``nonfinite_reason`` says why)."""
        t0 = time.perf_counter()
        objective, micro, progress = self.step_rollouts(step)
        t_rollout = time.perf_counter() - t0
        parts, reason = self.accumulate(objective, micro, progress, step)
        reasons = [r for r in self._all_processes([reason]) if r is not None]
        reason = reasons[0] if reasons else None
        metrics = merge_metrics(self._all_processes(parts)) if reason is None else {}
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else math.inf
        grad_norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), clip)) if reason is None else math.nan
        if reason is None and not math.isfinite(metrics.get("loss", 0.0)):
            reason = f"the loss was {metrics['loss']} (inputs were finite: the objective overflowed)"
        elif reason is None and not math.isfinite(grad_norm):
            reason = f"the gradient norm was {grad_norm} with a finite loss (exploding gradients)"
        t = self.cfg.train
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, t.lr, t.steps, t.lr_schedule, t.lr_warmup_steps)
        if reason is None:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

        elapsed = time.perf_counter() - t0
        stats = rollout_stats(self._all_processes([m.batch.to("cpu") for m in micro]))
        record = {"step": step + 1, "phase": objective.name, **metrics, **{f"rollout/{k}": v for k, v in stats.items()},
                  "grad_norm": grad_norm, "lr": self.optimizer.param_groups[0]["lr"], "nonfinite": int(reason is not None),
                  "step_time": elapsed, "rollout_time": t_rollout,
                  "tokens_per_second": stats["generated_tokens"] / max(elapsed, 1e-9)}
        if reason is not None:
            record["nonfinite_reason"] = reason
        return record

    def _check_nonfinite(self, record: dict) -> None:
        """Count consecutive non-finite steps; past ``train.max_nonfinite_steps`` save and stop with the cause."""
        if not record["nonfinite"]:
            self._nonfinite_in_a_row = 0
            return
        self._nonfinite_in_a_row += 1
        limit = self.cfg.train.max_nonfinite_steps
        if self._nonfinite_in_a_row >= limit:
            step = record["step"]
            checkpoint = self.save(step)
            raise NonFiniteTrainingError(
                f"step {step}: {limit} steps in a row had a non-finite loss or gradient and were skipped "
                f"(train.max_nonfinite_steps={limit}); last cause: {record['nonfinite_reason']}. The weights are "
                f"those of step {step - limit} (saved in {checkpoint}). Likely causes: a learning rate too high "
                "(train.lr), half precision overflowing (model.mixed_precision=no is safest), or a teacher/student "
                "emitting NaN")

    # -- the loop ----------------------------------------------------------------------------------------
    def _request_stop(self, signum, frame) -> None:  # first Ctrl-C / SIGTERM: finish the step, save, exit
        if self._stop_requested:
            raise KeyboardInterrupt
        self._stop_requested = True

    def _stop_agreed(self) -> bool:
        """Whether any process was asked to stop (all processes then stop after the same step)."""
        return any(self._all_processes([self._stop_requested]))

    def save(self, step: int) -> Path:
        """Checkpoint ``step`` (written by the main process; every process returns its path)."""
        path = self.run_dir / "checkpoints" / f"step-{step:06d}"
        states = gathered_state(self.student, self.optimizer, self.is_main) if is_sharded(self.student) else None
        if self.is_main:
            path = save_checkpoint(self.run_dir, step, self.student, self.tokenizer, self.optimizer,
                                   self.config_yaml, keep=self.cfg.train.keep_checkpoints, states=states)
        self.accelerator.wait_for_everyone()
        self._saved = (step, path)
        return path

    def evaluate(self, step: int, log: MetricsLog | None) -> dict:
        """The held-out evaluation (main process only; the others wait)."""
        result = {}
        with full_weights(self.student):  # a sharded student: gathered on every process, evaluated on one
            if self.eval_fn is not None and self.is_main:
                result = self.eval_fn(self.student)
                log.log({"step": step, **{f"eval/{k}": v for k, v in result.items()}})
            self.accelerator.wait_for_everyone()
        return result

    def train(self) -> dict:
        """Run (or resume) training; returns {'steps_done', 'interrupted', 'checkpoint', 'eval_before', 'eval_after',
        'nonfinite_steps', 'last_nonfinite_reason'} (evaluations on the main process only; the non-finite count is
        of the steps this call ran, from ``start_step`` to ``steps_done``)."""
        t = self.cfg.train
        resumed = self.start_step > 0
        log = None
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            log = MetricsLog(self.run_dir, t.report_to, self.cfg.to_dict(),
                             keep_until=self.start_step if resumed else None)
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        bar = None
        if t.progress and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=t.steps, initial=self.start_step, desc="tropd", unit="step", dynamic_ncols=True)
        result = {"steps_done": self.start_step, "interrupted": False, "checkpoint": None, "nonfinite_steps": 0,
                  "last_nonfinite_reason": None}
        try:
            result["eval_before"] = (log.eval_at(0) if log else {}) if resumed else self.evaluate(0, log)
            step = self.start_step
            while step < t.steps and not self._stop_agreed():
                record = self.run_step(step)
                step += 1
                if log is not None:
                    log.log(record)
                result["nonfinite_steps"] += record["nonfinite"]
                result["last_nonfinite_reason"] = record.get("nonfinite_reason", result["last_nonfinite_reason"])
                self._check_nonfinite(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{record[k]:.3g}" for k in ("loss", "k1_rkl", "trust_frac", "student_entropy",
                                                                       "grad_norm") if k in record})
                if t.eval_every and step % t.eval_every == 0 and step < t.steps:
                    self.evaluate(step, log)
                if t.save_every and step % t.save_every == 0 and step < t.steps:
                    result["checkpoint"] = self.save(step)
            result["steps_done"] = step
            result["interrupted"] = step < t.steps
            latest = self.run_dir / "checkpoints" / f"step-{step:06d}"
            if self._saved is not None and self._saved[0] == step:  # e.g. stopped right after a periodic save:
                result["checkpoint"] = self._saved[1]  # the same state; saving it again would replace a good copy
            elif step > self.start_step or not latest.is_dir():
                result["checkpoint"] = self.save(step)
            else:
                result["checkpoint"] = latest
            if not result["interrupted"]:
                result["eval_after"] = self.evaluate(step, log)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if bar is not None:
                bar.close()
            if log is not None:
                log.close()
        return result
