"""Set up and run one training job from a validated :class:`RunConfig` (what ``tropd train`` calls)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from tropd.eval.distill import DistillEval
from tropd.models import (check_models_compatible, load_causal_lm, prepare_tokenizer, prune_layers,
                          quiet_progress_bars, smollm2_gguf_path)
from tropd.train.checkpoint import latest_checkpoint
from tropd.train.config import RunConfig
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


def train_from_config(cfg: RunConfig, resume: bool = False, console=print, eval_fn=None) -> dict:
    """Train, write the run directory (metrics, checkpoints, report), and return a summary.

    ``eval_fn(student) -> dict`` replaces the default held-out evaluation (:class:`DistillEval`), e.g. to share
    one precomputed evaluation between many runs."""
    run_dir = cfg.run_dir()
    found = latest_checkpoint(run_dir)
    if resume and found is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {run_dir / 'checkpoints'}; run without --resume")
    if not resume and found is not None:
        raise FileExistsError(f"{run_dir} already holds a run (checkpoint {found.path.name}); continue it with "
                              "--resume, or choose another train.output_dir (--run-dir)")
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

    prompt_ids = [encode_prompt(p, tok, data.chat_template) for p in train_prompts]
    if eval_fn is None and held_out:
        eval_fn = DistillEval(teacher, tok, [encode_prompt(p, tok, data.chat_template) for p in held_out],
                              cfg.rollout.max_new_tokens, held_out)
    trainer = Trainer(cfg, student, teacher, tok, prompt_ids, run_dir, eval_fn=eval_fn, resume=resume)
    result = trainer.train()

    from tropd.report import write_report

    report = write_report(run_dir)
    summary = {"run_dir": str(run_dir.resolve()), "steps_done": result["steps_done"],
               "interrupted": result["interrupted"], "checkpoint": str(result["checkpoint"]),
               "report": str(report), "eval_before": result.get("eval_before", {}),
               "eval_after": result.get("eval_after", {}), "wall_time_s": round(time.perf_counter() - t0, 1)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
