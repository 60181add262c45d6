"""The training loop: prompts → rollouts → teacher scores → objective → AdamW step → metrics / checkpoint.

The trainer orchestrates only: sampling lives in ``tropd.rollout``, teacher scoring in ``tropd.teacher``,
all loss math in ``tropd.objectives``. Every random stream of step ``k`` comes from a generator seeded with
``(seed, k)``, so a run stopped after step ``k`` and resumed from its checkpoint replays exactly.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from tropd.forward import response_logits
from tropd.objectives import TokenInputs, count_loss_tokens, data_parallel_scale, get_objective
from tropd.objectives.errors import NonFiniteInputError
from tropd.rollout import GuidanceConfig, SamplingConfig, TRBConfig, collect_rollouts, rollout_stats
from tropd.teacher.scoring import score_with_teacher
from tropd.train.checkpoint import ResumeState, load_trainer_state, save_checkpoint
from tropd.train.config import RunConfig
from tropd.train.errors import NonFiniteTrainingError
from tropd.train.tracking import MetricsLog

EvalFn = Callable[[torch.nn.Module], dict]
_SUMMED = ("loss", "num_tokens", "student_tokens")


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The random stream of one step (data order, sampling, trust masks)."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


def merge_metrics(parts: list[dict]) -> dict:
    """Combine micro-batch metrics into step metrics: losses and counts add up (each micro-batch loss is
    already divided by the step's global token count), ``reward_min`` is the minimum, everything else is a
    mean weighted by each micro-batch's student tokens (reward quantiles thus approximate the step's)."""
    out: dict[str, float] = {}
    weights = [max(p.get("student_tokens", 0.0), 0.0) for p in parts]
    for key in {k for p in parts for k in p}:
        vals = [(p[key], w) for p, w in zip(parts, weights) if key in p]
        if key.startswith(_SUMMED):
            out[key] = sum(v for v, _ in vals)
        elif key == "reward_min":
            out[key] = min(v for v, w in vals if w > 0) if any(w > 0 for _, w in vals) else 0.0
        else:
            wsum = sum(w for _, w in vals)
            out[key] = sum(v * w for v, w in vals) / wsum if wsum > 0 else (sum(v for v, _ in vals) / len(vals))
    return out


class Trainer:
    """Runs ``cfg.train.steps`` optimiser steps of on-policy distillation of ``student`` towards ``teacher``."""

    def __init__(self, cfg: RunConfig, student, teacher, tokenizer, prompt_ids: list[list[int]],
                 run_dir: Path, eval_fn: EvalFn | None = None, resume: ResumeState | None = None) -> None:
        if not prompt_ids:
            raise ValueError("no training prompts: check data.prompts")
        self.cfg, self.student, self.teacher, self.tokenizer = cfg, student, teacher, tokenizer
        self.prompt_ids, self.run_dir, self.eval_fn = prompt_ids, Path(run_dir), eval_fn
        self.device = next(student.parameters()).device
        self.objective = cfg.build_objective()
        self.sft = get_objective("sft", chunk_size=cfg.objective.chunk_size)
        t = cfg.train
        self.optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=t.lr,
                                           betas=tuple(t.betas), weight_decay=t.weight_decay)
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.sampling = SamplingConfig(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                       max_new_tokens=cfg.rollout.max_new_tokens, eos_token_ids=tuple(eos),
                                       pad_token_id=tokenizer.pad_token_id)
        self.config_yaml = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        self.start_step = load_trainer_state(resume.path, self.optimizer) if resume is not None else 0
        self._stop_requested = False
        self._nonfinite_in_a_row = 0

    # -- one step ----------------------------------------------------------------------------------------
    def _phase(self, step: int):
        """(objective, step within its phase, steps in the phase) — sft warm-up first, then the objective."""
        warm = self.cfg.train.sft_warmup_steps
        if step < warm:
            return self.sft, step, warm
        return self.objective, step - warm, self.cfg.train.steps - warm

    def _prompts_for_step(self, gen: torch.Generator) -> list[list[int]]:
        t, r = self.cfg.train, self.cfg.rollout
        idx = torch.randint(len(self.prompt_ids), (t.prompts_per_step,), generator=gen).tolist()
        return [self.prompt_ids[i] for i in idx for _ in range(r.rollouts_per_prompt)]

    def collect(self, step: int):
        """Rollouts of step ``step`` (generated ``rollout.batch_size`` sequences at a time) and their teacher
        scores, split into micro-batches. Returns ``(objective, [(batch, scores)], progress, generator)``."""
        cfg = self.cfg
        objective, phase_step, phase_steps = self._phase(step)
        gen = step_generator(cfg.train.seed, step)
        sample_gen = step_generator(cfg.train.seed, step, self.device)
        prompts = self._prompts_for_step(gen)
        guidance = GuidanceConfig(enabled=objective is self.objective and cfg.guidance_enabled(),
                                  guided_fraction=cfg.guidance.guided_fraction,
                                  anneal_steps=cfg.guidance.anneal_steps)
        trb = TRBConfig(eps0=cfg.trb.eps0, warmup_steps=cfg.trb.warmup_steps)
        self.student.eval()  # no dropout: behaviour log-probs and the loss forward see the same network
        micro = []
        with torch.no_grad():
            for i in range(0, len(prompts), cfg.rollout.batch_size):
                batch = collect_rollouts(self.student, self.teacher, prompts[i:i + cfg.rollout.batch_size],
                                         self.sampling, objective.needs, step=phase_step, total_steps=phase_steps,
                                         generator=sample_gen, guidance_settings=guidance, trb_settings=trb,
                                         gkd_lambda=getattr(objective, "lmbda", 1.0))
                for j in range(0, batch.batch_size, cfg.train.micro_batch_size):
                    part = batch.rows(j, j + cfg.train.micro_batch_size)
                    scores = score_with_teacher(self.teacher, part.input_ids, part.attention_mask,
                                                part.response_start, part.tokens, objective.needs,
                                                chunk_size=cfg.objective.chunk_size or 512)
                    micro.append((part, scores))
        return objective, micro, phase_step / max(phase_steps, 1), sample_gen

    def accumulate(self, objective, micro, progress: float, generator: torch.Generator) -> list[dict]:
        """Backward every micro-batch with the step's global token count; returns their metrics."""
        n_tokens = count_loss_tokens(b.loss_mask for b, _ in micro)
        scale = data_parallel_scale()
        parts = []
        for batch, scores in micro:
            logits = response_logits(self.student, batch.input_ids, batch.attention_mask, batch.response_start)
            inputs = TokenInputs(student_logits=logits, tokens=batch.tokens,
                                 behavior_logprobs=batch.behavior_logprobs, loss_mask=batch.loss_mask,
                                 teacher_token_mask=batch.teacher_token_mask, generator=generator,
                                 progress=progress, **scores.as_kwargs())
            out = objective(inputs, num_tokens=n_tokens)
            (out.loss * scale).backward()
            parts.append(out.metrics)
        return parts

    def run_step(self, step: int) -> dict:
        """One optimiser step; returns its log record. A step whose loss or gradient is not finite leaves the
        weights and optimizer state untouched (``nonfinite`` = 1 in its record, ``nonfinite_reason`` says why)."""
        t0 = time.perf_counter()
        objective, micro, progress, generator = self.collect(step)
        t_rollout = time.perf_counter() - t0
        reason = None
        try:
            metrics = merge_metrics(self.accumulate(objective, micro, progress, generator))
        except NonFiniteInputError as err:  # e.g. NaN student logits: the objective refuses to compute
            metrics, reason = {}, str(err)
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.student.parameters(), clip)) if reason is None else math.nan
        if reason is None and not math.isfinite(metrics.get("loss", 0.0)):
            reason = f"the loss was {metrics['loss']} (inputs were finite: the objective overflowed)"
        elif reason is None and not math.isfinite(grad_norm):
            reason = f"the gradient norm was {grad_norm} with a finite loss (exploding gradients)"
        if reason is None:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

        elapsed = time.perf_counter() - t0
        stats = rollout_stats([b for b, _ in micro])
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
                "(train.lr), half precision overflowing (model.dtype=float32 is safest), or a teacher/student "
                "emitting NaN")

    # -- the loop ----------------------------------------------------------------------------------------
    def _request_stop(self, signum, frame) -> None:  # first Ctrl-C / SIGTERM: finish the step, save, exit
        if self._stop_requested:
            raise KeyboardInterrupt
        self._stop_requested = True

    def save(self, step: int) -> Path:
        return save_checkpoint(self.run_dir, step, self.student, self.tokenizer, self.optimizer, self.config_yaml,
                               keep=self.cfg.train.keep_checkpoints)

    def evaluate(self, step: int, log: MetricsLog) -> dict:
        if self.eval_fn is None:
            return {}
        result = self.eval_fn(self.student)
        log.log({"step": step, **{f"eval/{k}": v for k, v in result.items()}})
        return result

    def train(self) -> dict:
        """Run (or resume) training; returns {'steps_done', 'interrupted', 'checkpoint', 'eval_before', 'eval_after'}."""
        t = self.cfg.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resumed = self.start_step > 0
        log = MetricsLog(self.run_dir, t.report_to, self.cfg.to_dict(), keep_until=self.start_step if resumed else None)
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        bar = None
        if t.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=t.steps, initial=self.start_step, desc="tropd", unit="step", dynamic_ncols=True)
        result = {"steps_done": self.start_step, "interrupted": False, "checkpoint": None, "nonfinite_steps": 0}
        try:
            result["eval_before"] = log.eval_at(0) if resumed else self.evaluate(0, log)
            step = self.start_step
            while step < t.steps and not self._stop_requested:
                record = self.run_step(step)
                step += 1
                log.log(record)
                result["nonfinite_steps"] += record["nonfinite"]
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
            result["checkpoint"] = self.save(step) if step > self.start_step or not latest.is_dir() else latest
            if not result["interrupted"]:
                result["eval_after"] = self.evaluate(step, log)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if bar is not None:
                bar.close()
            log.close()
        return result

