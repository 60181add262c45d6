"""Set up and run one training job from a validated :class:`RunConfig` (what ``tropd train`` calls)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tropd.eval.distill import DistillEval
from tropd.files import write_text_atomic
from tropd.forward import enable_gradient_checkpointing
from tropd.models import (DTYPES, base_student, check_compatible, check_models_compatible, load_causal_lm,
                          load_named_model, logits_vocab_size, prepare_tokenizer, quiet_progress_bars, resolve_device)
from tropd.objectives import get_objective
from tropd.rollout.sampler import KVCacheSampler, Sampler
from tropd.tasks.encoding import encode_prompt
from tropd.teacher import TEACHER_CHUNK, InProcessTeacher
from tropd.teacher.remote import RemoteTeacher, is_url
from tropd.train.config import ConfigError, RunConfig
from tropd.train.prompts import prompts_for
from tropd.train.resume import open_run, write_run_config
from tropd.train.sharding import shard_student
from tropd.train.trainer import Trainer, sampling_config

_REFUSE_SHARDING = ("accelerate is configured for {}, which tropd does not run (its sampler must gather the student's "
                    "weights to decode, see docs/scaling.md): launch plain data parallel (accelerate launch "
                    "--multi_gpu) and set model.fsdp=true to shard the student with FSDP2")


def check_launch(cfg: RunConfig, environ=os.environ) -> None:
    """Refuse what ``accelerate launch`` asks for (in ``environ``) that accelerate would quietly replace: FSDP or
    DeepSpeed (plain DDP on CPU; tropd shards with ``model.fsdp``), and a mixed precision other than
    ``model.mixed_precision`` (tropd's setting would win)."""
    asked = [name for name in ("FSDP", "DEEPSPEED")
             if environ.get(f"ACCELERATE_USE_{name}", "").lower() in ("1", "true", "yes")]
    if asked:
        raise ValueError(_REFUSE_SHARDING.format(asked[0]))
    launched = environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launched not in ("no", cfg.model.mixed_precision):
        raise ValueError(f"accelerate launch asks for mixed precision {launched}, but model.mixed_precision="
                         f"{cfg.model.mixed_precision}: tropd takes it from model.mixed_precision; set "
                         f"model.mixed_precision={launched}, or launch with --mixed_precision no")


def build_accelerator(cfg: RunConfig):
    """The accelerate ``Accelerator`` of a run: processes (from ``accelerate launch``), device, mixed precision."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    check_launch(cfg)
    device = resolve_device(cfg.model.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=cfg.model.mixed_precision)
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ValueError(_REFUSE_SHARDING.format(accelerator.distributed_type.value))
    return accelerator


def build_models(cfg: RunConfig, resume_from: Path | None = None, device: torch.device | str | None = None):
    """``(student, teacher, tokenizer)`` on ``device`` (default: ``model.device``): the teacher frozen in
    ``model.teacher_dtype``; the student in ``model.dtype`` (float32 master weights), loaded, derived from the
    teacher, or resumed from a checkpoint; with ``model.lora`` the student carries trainable LoRA adapters (fresh,
    or the checkpoint's) on a frozen base, and under self-distillation the teacher is that base with the adapters
    disabled (:class:`tropd.lora.AdaptersDisabled`). A ``model.teacher`` URL gives a
    :class:`~tropd.teacher.remote.RemoteTeacher` (checked against the student's tokenizer), and the tokenizer
    returned is the student's."""
    from tropd.lora import AdaptersDisabled, add_adapters, is_adapter_folder, load_adapters

    m = cfg.model
    device = device if device is not None else resolve_device(m.device)
    needs = get_objective(cfg.objective.name, chunk_size=cfg.objective.chunk_size, **cfg.objective.kwargs).needs
    if is_url(m.teacher):
        teacher = RemoteTeacher(m.teacher, timeout_s=m.teacher_timeout, retry_s=m.teacher_retry_s)
        tok = None
    else:
        teacher, tok = load_named_model(m.teacher, DTYPES[m.teacher_dtype or m.dtype], device)
        teacher.requires_grad_(False).eval()
    if resume_from is not None and not is_adapter_folder(resume_from):
        student, student_tok = load_causal_lm(resume_from, dtype=DTYPES[m.dtype], device=device)
    else:
        student, student_tok = base_student(m, device, teacher, tok)
    student.requires_grad_(True)
    prepare_tokenizer(student_tok)
    if isinstance(teacher, RemoteTeacher):
        tok = student_tok
        check_compatible(student_tok, teacher.tokenizer, need_chat_template=cfg.data.chat_template, top_k=needs.top_k,
                         vocab_size=logits_vocab_size(student), teacher_vocab_size=teacher.vocab_size)
    else:
        prepare_tokenizer(tok)
        check_models_compatible(student, student_tok, teacher, tok, need_chat_template=cfg.data.chat_template,
                                top_k=needs.top_k)
    if m.lora.r > 0:
        student = load_adapters(student, resume_from) if resume_from is not None else add_adapters(student, m.lora)
        if m.shares_teacher_base():
            teacher = AdaptersDisabled(student)
    return student, teacher, tok


def train_from_config(cfg: RunConfig, resume: bool = False, console=print, eval_fn=None,
                      override_config: bool = False, make_sampler: Callable[..., Sampler] | None = None) -> dict:
    """Train, write the run directory (metrics, checkpoints, report), and return a summary.

    ``resume`` continues the run in ``cfg``'s run directory; settings that differ from the run's own are refused
    unless ``override_config``. Resuming a finished run changes nothing and returns its summary with
    ``already_complete: True``. ``eval_fn(student) -> dict`` replaces the default held-out evaluation
    (:class:`DistillEval`), e.g. to share one precomputed evaluation between many runs.
    ``make_sampler(student, teacher, sampling_config) -> Sampler`` (``teacher``: the run's
    :class:`~tropd.teacher.Teacher`) replaces the default
    :class:`KVCacheSampler` (see docs/extending.md).

    Set-up order: config → accelerator → run directory → prompts → models → engines (sampler, teacher) → trainer."""
    accelerator = build_accelerator(cfg)
    main = accelerator.is_main_process
    console = console if main else (lambda *_: None)
    if cfg.train.output_dir is None:  # one name for every process: the main process's
        from accelerate.utils import broadcast_object_list

        cfg.train.output_dir = broadcast_object_list([str(cfg.run_dir())])[0]
    run_dir = cfg.run_dir()
    opened = open_run(cfg, resume, override_config, clean=main)
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
    data = cfg.data  # read the prompts first: a bad data file fails before any model loads
    train_prompts = prompts_for(data.prompts, "train", cfg.train.seed, data.skip_bad_rows)
    held_out = prompts_for(data.prompts, "test", cfg.train.seed, data.skip_bad_rows)[: data.eval_prompts]
    torch.manual_seed(cfg.train.seed)
    quiet_progress_bars()
    t0 = time.perf_counter()
    student, teacher, tok = build_models(cfg, found.path if found else None, accelerator.device)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(student)
    if cfg.model.fsdp and accelerator.num_processes > 1:
        shard_student(student, accelerator.device)
    console(f"run directory: {run_dir.resolve()}")
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    lora = f", {trainable / 1e6:.2f}M of them in LoRA adapters (r={cfg.model.lora.r})" if cfg.model.lora.r else ""
    shared = " (the student's base, adapters disabled)" if cfg.model.shares_teacher_base() else ""
    about_teacher = (teacher.describe() if isinstance(teacher, RemoteTeacher) else
                     f"{teacher.config.num_hidden_layers} layers, "
                     f"{sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M params{shared}")
    sharded = "" if not cfg.model.fsdp else (f", sharded over {accelerator.num_processes} processes (FSDP2)"
                                             if accelerator.num_processes > 1 else " (model.fsdp: one process, unsharded)")
    console(f"teacher: {about_teacher}; student: {student.config.num_hidden_layers} layers, "
            f"{sum(p.numel() for p in student.parameters()) / 1e6:.1f}M params{lora}{sharded} "
            f"(loaded in {time.perf_counter() - t0:.0f}s)")

    teacher_engine = (teacher if isinstance(teacher, RemoteTeacher)
                      else InProcessTeacher(teacher, chunk_size=cfg.objective.chunk_size or TEACHER_CHUNK))
    limit = prompt_token_limit(cfg, student, teacher)
    prompt_ids, skipped = encode_prompts(train_prompts, tok, data, limit, "training")
    held_out_ids, skipped_eval = encode_prompts(held_out, tok, data, limit, "held-out")
    for n, kind in ((skipped, "training"), (skipped_eval, "held-out")):
        if n:
            console(f"skipped {n} {kind} prompt(s) longer than {limit} tokens (data.max_prompt_tokens)")
    if eval_fn is None and held_out_ids:
        kept = [p for p, ids in zip(held_out, held_out_ids) if ids is not None]
        eval_fn = DistillEval(teacher_engine, tok, [ids for ids in held_out_ids if ids is not None],
                              cfg.rollout.max_new_tokens, kept)
    sampler = (make_sampler or KVCacheSampler)(student, teacher_engine, sampling_config(cfg, tok))
    trainer = Trainer(cfg, student, teacher_engine, tok, [ids for ids in prompt_ids if ids is not None], run_dir,
                      eval_fn=eval_fn, resume=found, accelerator=accelerator, sampler=sampler)
    if main:
        write_run_config(run_dir, trainer.config_yaml, opened.changes, trainer.start_step)
    result = trainer.train()
    if not main:
        return {**result, "run_dir": str(run_dir.resolve()), "main_process": False}

    from tropd.report import write_report

    report = write_report(run_dir)
    summary = {"run_dir": str(run_dir.resolve()), "steps_done": result["steps_done"],
               "interrupted": result["interrupted"], "checkpoint": str(result["checkpoint"]),
               "report": str(report), "eval_before": result.get("eval_before", {}),
               "eval_after": result.get("eval_after", {}), "nonfinite_steps": result["nonfinite_steps"],
               "wall_time_s": round(time.perf_counter() - t0, 1), "num_processes": accelerator.num_processes}
    write_text_atomic(done_file, json.dumps(summary, indent=2))
    return {**summary, "main_process": True}


def prompt_token_limit(cfg: RunConfig, student, teacher) -> int:
    """``data.max_prompt_tokens``, or the shorter model context minus ``rollout.max_new_tokens``."""
    if cfg.data.max_prompt_tokens is not None:
        return cfg.data.max_prompt_tokens
    contexts = [m.context_length if isinstance(m, RemoteTeacher) else
                getattr(m.config.get_text_config(), "max_position_embeddings", None) for m in (student, teacher)]
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
