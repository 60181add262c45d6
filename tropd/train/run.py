"""Set up and run one training job from a validated :class:`RunConfig` (what ``tropd train`` calls)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from tropd.eval.distill import DistillEval
from tropd.models import (check_models_compatible, load_causal_lm, prepare_tokenizer, prune_layers,
                          quiet_progress_bars, smollm2_gguf_path)
from tropd.train.config import ConfigError, RunConfig
from tropd.train.resume import open_run, write_run_config
from tropd.tasks.encoding import encode_prompt
from tropd.train.prompts import prompts_for
from tropd.train.trainer import Trainer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_named_model(path: str, dtype=torch.float32, device="cpu"):
    """``(model, tokenizer)`` from an HF folder, a .gguf file, or 'smollm2' (the embedded teacher)."""
    if path == "smollm2":
        path = str(smollm2_gguf_path())
    return load_causal_lm(path, dtype=dtype, device=device)


def build_models(cfg: RunConfig, resume_from: Path | None = None):
    """``(student, teacher, tokenizer)``: teacher frozen; the student loaded, derived by pruning, or resumed."""
    dtype, device = _DTYPES[cfg.model.dtype], resolve_device(cfg.model.device)
    teacher, tok = load_named_model(cfg.model.teacher, dtype, device)
    teacher.requires_grad_(False).eval()
    if resume_from is not None:
        student, student_tok = load_causal_lm(resume_from, dtype=dtype, device=device)
    elif cfg.model.student is not None:
        student, student_tok = load_named_model(cfg.model.student, dtype, device)
    else:
        student, student_tok = teacher, tok
        if cfg.model.student_layers is not None:
            student = prune_layers(teacher, cfg.model.student_layers)
        else:
            import copy

            student = copy.deepcopy(teacher)
    student.requires_grad_(True)
    prepare_tokenizer(tok)
    prepare_tokenizer(student_tok)
    needs = cfg.build_objective().needs
    check_models_compatible(student, student_tok, teacher, tok, need_chat_template=cfg.data.chat_template,
                            top_k=needs.top_k)
    return student, teacher, tok


def train_from_config(cfg: RunConfig, resume: bool = False, console=print, eval_fn=None,
                      override_config: bool = False) -> dict:
    """Train, write the run directory (metrics, checkpoints, report), and return a summary.

    ``resume`` continues the run in ``cfg``'s run directory; settings that differ from the run's own are refused
    unless ``override_config``. Resuming a finished run changes nothing and returns its summary with
    ``already_complete: True``. ``eval_fn(student) -> dict`` replaces the default held-out evaluation
    (:class:`DistillEval`), e.g. to share one precomputed evaluation between many runs."""
    run_dir = cfg.run_dir()
    opened = open_run(cfg, resume, override_config)
    for note in opened.notes:
        console(note)
    found = opened.checkpoint
    done_file = run_dir / "summary.json"
    if found is not None and found.step >= cfg.train.steps and done_file.is_file():
        summary = json.loads(done_file.read_text())
        console(f"{run_dir} is complete ({found.step} of {cfg.train.steps} steps): nothing to do; to train further "
                "raise train.steps and add --override-config")
        return {**summary, "already_complete": True}
    data = cfg.data  # read the prompts first: a bad data file fails before any model loads
    train_prompts = prompts_for(data.prompts, "train", cfg.train.seed, data.skip_bad_rows)
    held_out = prompts_for(data.prompts, "test", cfg.train.seed, data.skip_bad_rows)[: data.eval_prompts]
    torch.manual_seed(cfg.train.seed)
    quiet_progress_bars()
    t0 = time.perf_counter()
    student, teacher, tok = build_models(cfg, found.path if found else None)
    console(f"run directory: {run_dir.resolve()}")
    console(f"teacher: {teacher.config.num_hidden_layers} layers, {sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M "
            f"params; student: {student.config.num_hidden_layers} layers, "
            f"{sum(p.numel() for p in student.parameters()) / 1e6:.1f}M params (loaded in {time.perf_counter() - t0:.0f}s)")

    limit = prompt_token_limit(cfg, student, teacher)
    prompt_ids, skipped = encode_prompts(train_prompts, tok, data, limit, "training")
    held_out_ids, skipped_eval = encode_prompts(held_out, tok, data, limit, "held-out")
    for n, kind in ((skipped, "training"), (skipped_eval, "held-out")):
        if n:
            console(f"skipped {n} {kind} prompt(s) longer than {limit} tokens (data.max_prompt_tokens)")
    if eval_fn is None and held_out_ids:
        kept = [p for p, ids in zip(held_out, held_out_ids) if ids is not None]
        eval_fn = DistillEval(teacher, tok, [ids for ids in held_out_ids if ids is not None],
                              cfg.rollout.max_new_tokens, kept)
    trainer = Trainer(cfg, student, teacher, tok, [ids for ids in prompt_ids if ids is not None], run_dir,
                      eval_fn=eval_fn, resume=found)
    write_run_config(run_dir, trainer.config_yaml, opened.changes, trainer.start_step)
    result = trainer.train()

    from tropd.report import write_report

    report = write_report(run_dir)
    summary = {"run_dir": str(run_dir.resolve()), "steps_done": result["steps_done"],
               "interrupted": result["interrupted"], "checkpoint": str(result["checkpoint"]),
               "report": str(report), "eval_before": result.get("eval_before", {}),
               "eval_after": result.get("eval_after", {}), "nonfinite_steps": result["nonfinite_steps"],
               "wall_time_s": round(time.perf_counter() - t0, 1)}
    tmp = done_file.with_name(f".summary.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, done_file)
    return summary


def prompt_token_limit(cfg: RunConfig, student, teacher) -> int:
    """``data.max_prompt_tokens``, or the shorter model context minus ``rollout.max_new_tokens``."""
    if cfg.data.max_prompt_tokens is not None:
        return cfg.data.max_prompt_tokens
    contexts = [getattr(m.config.get_text_config(), "max_position_embeddings", None) for m in (student, teacher)]
    contexts = [c for c in contexts if isinstance(c, int) and c > 0]
    if not contexts:
        return 1 << 30
    limit = min(contexts) - cfg.rollout.max_new_tokens
    if limit < 1:
        raise ConfigError(f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} leaves no room for a prompt in the "
                          f"models' context of {min(contexts)} tokens; lower it", "rollout.max_new_tokens")
    return limit


def encode_prompts(rows, tok, data, limit: int, kind: str) -> tuple[list[list[int] | None], int]:
    """Token ids of each prompt (None for one longer than ``limit`` when ``data.skip_bad_rows``; else such a
    prompt raises ValueError naming it) and how many were skipped."""
    out: list[list[int] | None] = []
    for i, row in enumerate(rows):
        ids = encode_prompt(row, tok, data.chat_template)
        if len(ids) > limit:
            if not data.skip_bad_rows:
                where = getattr(row, "source", "") or getattr(row, "id", "") or f"{kind} prompt {i}"
                raise ValueError(f"{data.prompts}: {where}: prompt of {len(ids)} tokens exceeds "
                                 f"data.max_prompt_tokens={limit}; shorten it, raise the limit, or set "
                                 "data.skip_bad_rows=true to skip such prompts")
            ids = None
        out.append(ids)
    return out, sum(ids is None for ids in out)
