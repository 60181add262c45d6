"""The composition root: the one place where a validated :class:`RunConfig` becomes the parts of a run.

A run is made of these parts (:class:`RunParts`), built in this order:

| part | from the config | built by |
|---|---|---|
| accelerator: processes, device, mixed precision | ``model.device``, ``.mixed_precision`` | :func:`build_accelerator` |
| training and held-out prompts (a bad file fails here, before any model loads) | ``data.*`` | :func:`read_prompts` |
| objective, and ``sft`` for the warm-up steps | ``objective.*`` | :func:`build_objectives` |
| student: loaded or pruned, LoRA, resumed, sharded | ``model.*`` | :func:`load_models` |
| teacher: a :class:`~tropd.teacher.Teacher`, in process or a server | ``model.teacher*`` | :func:`load_models` |
| the tokenizer they share (checked) | | :func:`load_models` |
| prompt token ids, no longer than the models' context allows | ``data.*`` | :func:`encode_prompts` |
| held-out evaluation (the teacher's answers, computed once) | ``data.eval_prompts`` | ``DistillEval`` |
| sampler: a :class:`~tropd.rollout.sampler.Sampler` | ``rollout.*`` | ``KVCacheSampler``, :func:`vllm_sampler` |

The :class:`~tropd.train.trainer.Trainer` receives the parts and builds none of them; ``tropd train``
(:func:`tropd.train.run.train_from_config`) makes the accelerator, opens the run directory, calls
:func:`build_run` and trains.
"""

from __future__ import annotations

import atexit
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from tropd.eval.distill import DistillEval
from tropd.forward import enable_gradient_checkpointing
from tropd.lora import AdaptersDisabled, add_adapters, is_adapter_folder, load_adapters
from tropd.models import (DTYPES, base_student, check_compatible, check_models_compatible, check_student_layers,
                          context_length, describe_size, load_causal_lm, load_named_model, logits_vocab_size,
                          model_facts, prepare_tokenizer, quiet_progress_bars, resolve_device)
from tropd.objectives import Objective, get_objective
from tropd.rollout import SamplingConfig
from tropd.rollout.sampler import KVCacheSampler, Sampler
from tropd.tasks.encoding import encode_prompt
from tropd.teacher import TEACHER_CHUNK, InProcessTeacher, RemoteTeacher, Teacher, VLLMServerTeacher
from tropd.teacher.remote import is_url, is_vllm_url
from tropd.train.config import ConfigError, ObjectiveConfig, RunConfig
from tropd.train.prompts import prompts_for
from tropd.train.sharding import shard_student

EvalFn = Callable[[nn.Module], dict]
MakeSampler = Callable[[nn.Module, Teacher, SamplingConfig], Sampler]


@dataclass
class RunParts:
    """What a run is made of (module docstring).

    Attributes:
        accelerator: processes, device placement, DDP wrapping, mixed precision.
        student: the plain student (the trainer wraps it for the loss; samples, evaluates and saves this one).
        teacher: the run's teacher: scores, written rows, TRB blending.
        tokenizer: the tokenizer every part shares (the teacher's when it is in process, else the student's).
        objective: the loss of the steps after the warm-up; ``warmup``: the loss of the first
            ``train.sft_steps()`` steps (``sft``; ``train.sft_warmup_steps``, at most ``train.steps - 1``).
        sampler: draws each step's rollouts.
        prompt_ids: the training prompts' token ids.
        eval_fn: the held-out evaluation ``eval_fn(student) -> dict``, or None.
        notes: what was built, for the console.
    """

    accelerator: Accelerator
    student: nn.Module
    teacher: Teacher
    tokenizer: object
    objective: Objective
    warmup: Objective
    sampler: Sampler
    prompt_ids: list[list[int]]
    eval_fn: EvalFn | None = None
    notes: list[str] = field(default_factory=list)


def build_run(cfg: RunConfig, accelerator: Accelerator, *, resume_from: Path | None = None,
              eval_fn: EvalFn | None = None, make_sampler: MakeSampler | None = None) -> RunParts:
    """Every part of a run of ``cfg`` on ``accelerator``'s device (module docstring). ``resume_from``: the
    checkpoint folder whose student (or LoRA adapters) the run continues from. ``eval_fn`` replaces the default
    held-out evaluation; ``make_sampler(student, teacher, sampling_config)`` the default
    :class:`~tropd.rollout.sampler.KVCacheSampler` (docs/extending.md).

    ``cfg`` is validated first (:meth:`~tropd.train.config.RunConfig.validate`, :class:`ConfigError` naming the
    key), as ``load_config`` validates a config file, so a config built or changed in code is checked the same
    way before anything is read or loaded."""
    cfg.validate()
    check_model_files(cfg)
    train_rows, held_out = read_prompts(cfg)
    objective, warmup = build_objectives(cfg)
    torch.manual_seed(cfg.train.seed)
    quiet_progress_bars()
    t0 = time.perf_counter()
    student, teacher, tok = load_models(cfg, resume_from, accelerator.device, top_k=objective.needs.top_k)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(student)
    sharded = cfg.model.fsdp and accelerator.num_processes > 1
    if sharded:
        shard_student(student, accelerator.device)
    notes = [describe_models(cfg, student, teacher, accelerator.num_processes, time.perf_counter() - t0)]
    t = cfg.train
    if t.sft_steps() != t.sft_warmup_steps:
        notes.append(f"train.sft_warmup_steps={t.sft_warmup_steps} with train.steps={t.steps}: the SFT warm-up takes "
                     f"{t.sft_steps()} step(s), train.steps - 1, so that the last step trains {cfg.objective.name}")

    limit = prompt_token_limit(cfg, student, teacher)
    prompt_ids = encode_prompts(cfg, train_rows, tok, limit, "training", notes)
    held_out_ids = encode_prompts(cfg, held_out, tok, limit, "held-out", notes)
    if eval_fn is None and held_out_ids:
        kept = [row for row, ids in zip(held_out, held_out_ids) if ids is not None]
        eval_fn = DistillEval(teacher, tok, [ids for ids in held_out_ids if ids is not None],
                              cfg.rollout.max_new_tokens, kept)
    sampling = sampling_config(cfg, tok)
    if make_sampler is not None:
        sampler = make_sampler(student, teacher, sampling)
    elif cfg.rollout.engine == "vllm":
        longest = max(len(ids) for ids in prompt_ids if ids is not None) + cfg.rollout.max_new_tokens
        sampler = vllm_sampler(cfg, accelerator, student, teacher, sampling, longest)
        notes.append(f"rollouts: a colocated vLLM engine for sequences of up to {sampler.engine.max_model_len} "
                     f"tokens (KV cache {cfg.rollout.vllm_kv_cache_gb:g} GiB), weights pushed after every step")
    else:
        sampler = KVCacheSampler(student, teacher, sampling)
    return RunParts(accelerator, student, teacher, tok, objective, warmup, sampler,
                    [ids for ids in prompt_ids if ids is not None], eval_fn, notes)


def vllm_sampler(cfg: RunConfig, accelerator: Accelerator, student: nn.Module, teacher: Teacher,
                 sampling: SamplingConfig, longest: int) -> Sampler:
    """``rollout.engine: vllm``: a :class:`~tropd.rollout.vllm_sampler.VLLMSampler` over an engine, started here,
    that takes sequences of ``longest`` tokens at most (the longest prompt plus the response budget, within the
    student's context). One process only: each process would hold its own engine and copy of the student."""
    from tropd.rollout.vllm_sampler import VLLMSampler, VLLMStudent

    if accelerator.num_processes > 1:
        raise ConfigError(f"rollout.engine=vllm runs in one process; this launch has {accelerator.num_processes}: "
                          "launch one process or use rollout.engine=tropd", "rollout.engine")
    context = context_length(student)
    engine = VLLMStudent(student, max_model_len=min(longest, context) if context else longest,
                         kv_cache_gb=cfg.rollout.vllm_kv_cache_gb, seed=cfg.train.seed)
    engine.start()
    return VLLMSampler(student, teacher, sampling, engine)


# -- the accelerator ------------------------------------------------------------------------------------------
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


def build_accelerator(cfg: RunConfig) -> Accelerator:
    """The accelerate ``Accelerator`` of a run: processes (from ``accelerate launch``), device, mixed precision.

    The process group it starts (under ``accelerate launch``) is destroyed when the process exits, what
    ``Accelerator.end_training`` does: a group left alive into the interpreter's teardown can abort the process
    there, after a finished run. A group that was already running is its starter's to end."""
    from accelerate.utils import DistributedType

    check_launch(cfg)
    device = resolve_device(cfg.model.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    group_before = _group_running()
    try:
        accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=cfg.model.mixed_precision)
    finally:  # a group may be up even when the Accelerator then fails
        if not group_before and _group_running():
            atexit.register(_end_group)
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ValueError(_REFUSE_SHARDING.format(accelerator.distributed_type.value))
    return accelerator


def _group_running() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _end_group() -> None:
    if _group_running():
        torch.distributed.destroy_process_group()


# -- prompts --------------------------------------------------------------------------------------------------
def read_prompts(cfg: RunConfig) -> tuple[list, list]:
    """The training rows and the held-out rows (the first ``data.eval_prompts`` of the test split)."""
    data = cfg.data
    train_rows = prompts_for(data.prompts, "train", cfg.train.seed, data.skip_bad_rows)
    held_out = prompts_for(data.prompts, "test", cfg.train.seed, data.skip_bad_rows)[: data.eval_prompts]
    return train_rows, held_out


# -- what the model files rule out ----------------------------------------------------------------------------
def check_model_files(cfg: RunConfig) -> None:
    """Refuse, before any model loads, the settings that the models' files already rule out
    (:func:`~tropd.models.model_facts`: an HF folder's config.json, a GGUF file's metadata): more
    ``model.student_layers`` than the teacher has, and a ``rollout.max_new_tokens`` that leaves no room for a prompt
    in the context. What the files do not say is checked once the models are loaded (:func:`base_student`,
    :func:`prompt_token_limit`)."""
    m = cfg.model
    teacher = {} if is_url(m.teacher) else model_facts(m.teacher)
    student = model_facts(m.student) if m.student is not None else teacher  # a pruned student keeps the context
    if m.student is None and m.student_layers is not None:
        check_student_layers(m.student_layers, teacher.get("layers"), m.teacher)
    check_response_budget(cfg, [f["context"] for f in (teacher, student) if "context" in f])


def check_response_budget(cfg: RunConfig, contexts: list[int]) -> None:
    """``rollout.max_new_tokens`` below the shorter of the models' ``contexts`` (room for a prompt is left)."""
    budget = cfg.rollout.max_new_tokens
    if contexts and budget >= min(contexts):
        raise ConfigError(f"rollout.max_new_tokens={budget} leaves no room for a prompt in the models' context of "
                          f"{min(contexts)} tokens; lower it below {min(contexts)}", "rollout.max_new_tokens")


def prompt_token_limit(cfg: RunConfig, student: nn.Module, teacher: Teacher) -> int:
    """``data.max_prompt_tokens``, or the shorter model context minus ``rollout.max_new_tokens`` (checked to leave
    room for a prompt)."""
    contexts = [c for c in (context_length(student), teacher.context_length) if c is not None]
    check_response_budget(cfg, contexts)
    if cfg.data.max_prompt_tokens is not None:
        return cfg.data.max_prompt_tokens
    if not contexts:
        return 1 << 30
    return min(contexts) - cfg.rollout.max_new_tokens


def encode_prompts(cfg: RunConfig, rows, tok, limit: int, kind: str, notes: list[str]) -> list[list[int] | None]:
    """Token ids of each prompt; a prompt longer than ``limit`` is None when ``data.skip_bad_rows`` (counted in
    ``notes``), else it raises ValueError naming it."""
    data = cfg.data
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
    skipped = sum(ids is None for ids in out)
    if skipped:
        notes.append(f"skipped {skipped} {kind} prompt(s) longer than {limit} tokens (data.max_prompt_tokens)")
    return out


# -- models ---------------------------------------------------------------------------------------------------
def load_models(cfg: RunConfig, resume_from: Path | None = None, device: torch.device | str | None = None, *,
                top_k: int | None = None) -> tuple[nn.Module, Teacher, object]:
    """``(student, teacher, tokenizer)`` on ``device`` (default: ``model.device``).

    The teacher is a :class:`~tropd.teacher.VLLMServerTeacher` for a ``vllm+http://`` URL (probed for the top-k
    and for the rows the run will ask of it), a :class:`~tropd.teacher.RemoteTeacher` for another URL (refused
    when its engine cannot give the objective's scores), else an
    :class:`~tropd.teacher.InProcessTeacher` on the model loaded frozen in ``model.teacher_dtype``, scored
    ``objective.chunk_size`` positions at a time. The student is in ``model.dtype`` (float32 master weights):
    loaded, derived from the teacher (:func:`~tropd.models.base_student`), or resumed from a checkpoint; with
    ``model.lora`` it carries trainable LoRA adapters (fresh, or the checkpoint's) on a frozen base, and under
    self-distillation the teacher is that base with the adapters disabled (:class:`~tropd.lora.AdaptersDisabled`).
    Student and teacher are always checked to share a tokenizer and a logits vocabulary, whatever the objective
    reads of the teacher (top-k, full logits or sampled-token log-probs), and that vocabulary to hold at least
    ``top_k`` ids, the teacher top-k the objective reads (default: that of ``cfg``'s objective; :func:`build_run`
    passes the one of the objective it built). The tokenizer returned is the in-process teacher's, else the
    student's."""
    m = cfg.model
    needs = build_objective(cfg.objective).needs
    top_k = needs.top_k if top_k is None else top_k
    device = device if device is not None else resolve_device(m.device)
    remote, teacher, tok = None, None, None
    if is_vllm_url(m.teacher):
        rows_at = (cfg.rollout.temperature, cfg.rollout.top_p) if writes_teacher_rows(cfg, needs) else None
        remote = VLLMServerTeacher(m.teacher, timeout_s=m.teacher_timeout, retry_s=m.teacher_retry_s, top_k=top_k,
                                   rows_at=rows_at)
    elif is_url(m.teacher):
        remote = RemoteTeacher(m.teacher, timeout_s=m.teacher_timeout, retry_s=m.teacher_retry_s)
        remote.check_needs(needs)
    else:
        teacher, tok = load_named_model(m.teacher, DTYPES[m.teacher_dtype or m.dtype], device)
        teacher.requires_grad_(False).eval()
    if resume_from is not None and not is_adapter_folder(resume_from):
        student, student_tok = load_causal_lm(resume_from, dtype=DTYPES[m.dtype], device=device)
    else:
        student, student_tok = base_student(m, device, teacher, tok)
    student.requires_grad_(True)
    prepare_tokenizer(student_tok)
    if isinstance(remote, VLLMServerTeacher):
        tok = student_tok
        remote.check_student(student_tok, logits_vocab_size(student), top_k)
    elif remote is not None:
        tok = student_tok
        check_compatible(student_tok, remote.tokenizer, need_chat_template=cfg.data.chat_template, top_k=top_k,
                         vocab_size=logits_vocab_size(student), teacher_vocab_size=remote.vocab_size)
    else:
        prepare_tokenizer(tok)
        check_models_compatible(student, student_tok, teacher, tok, need_chat_template=cfg.data.chat_template,
                                top_k=top_k)
    if m.lora.r > 0:
        student = load_adapters(student, resume_from) if resume_from is not None else add_adapters(student, m.lora)
        if m.shares_teacher_base():
            teacher = AdaptersDisabled(student)
    if remote is not None:
        return student, remote, tok
    return student, InProcessTeacher(teacher, chunk_size=cfg.objective.chunk_size or TEACHER_CHUNK), tok


def writes_teacher_rows(cfg: RunConfig, needs) -> bool:
    """Whether the run asks its teacher for rows at ``rollout.temperature``/``top_p``: guidance prefixes, GKD or
    SFT teacher rows, or an SFT warm-up (the held-out answers are greedy)."""
    guided = needs.guidance and cfg.guidance.enabled is not False
    return guided or needs.rollout in ("teacher", "gkd_mixed") or cfg.train.sft_steps() > 0


def describe_models(cfg: RunConfig, student: nn.Module, teacher: Teacher, processes: int, load_s: float) -> str:
    """One console line: the teacher, the student (trainable share, sharding) and how long they took to load."""
    m = cfg.model
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    lora = f", {trainable / 1e6:.2f}M of them in LoRA adapters (r={m.lora.r})" if m.lora.r else ""
    shared = " (the student's base, adapters disabled)" if m.shares_teacher_base() else ""
    sharded = "" if not m.fsdp else (f", sharded over {processes} processes (FSDP2)" if processes > 1
                                     else " (model.fsdp: one process, unsharded)")
    return (f"teacher: {teacher.describe()}{shared}; student: {describe_size(student)}{lora}{sharded} "
            f"(loaded in {load_s:.0f}s)")


# -- rollouts and loss ----------------------------------------------------------------------------------------
def sampling_config(cfg: RunConfig, tokenizer) -> SamplingConfig:
    """The decoding settings of a run (``rollout.*`` and the tokenizer's EOS and pad ids)."""
    r = cfg.rollout
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return SamplingConfig(temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
                          eos_token_ids=tuple(eos), pad_token_id=tokenizer.pad_token_id, kv_cache=r.kv_cache)


def build_objective(section: ObjectiveConfig) -> Objective:
    """The objective a config's ``objective`` section names, with its keywords and ``chunk_size``."""
    return get_objective(section.name, chunk_size=section.chunk_size, **section.kwargs)


def build_objectives(cfg: RunConfig) -> tuple[Objective, Objective]:
    """``(objective, warm-up objective)``: the configured one, and ``sft`` for the first ``train.sft_steps()``
    steps (same ``chunk_size``)."""
    warmup = ObjectiveConfig(name="sft", chunk_size=cfg.objective.chunk_size)
    return build_objective(cfg.objective), build_objective(warmup)
