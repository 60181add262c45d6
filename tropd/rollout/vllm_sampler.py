"""The student's rollouts drawn by a colocated vLLM engine (``rollout.engine: vllm``; docs/vllm.md).

:class:`VLLMStudent` keeps a copy of the student in an in-process vLLM engine and writes the student's rows
(:data:`~tropd.rollout.sampling.StudentRows`); :class:`VLLMSampler` is the default sampler with those rows, so
guidance prefixes, GKD and SFT teacher rows are written by the run's teacher exactly as with the default engine.

- **Weights.** The engine is built when the run starts (:meth:`VLLMStudent.start`), from the student's config and
  weights saved to a temporary folder, deleted once the engine has loaded them (LoRA adapters merged into the
  base weights: ``W + ΔW``). Before the first student rollout and after every optimiser step (a new ``global_step`` in the rows' streams) the weights
  are pushed in place through the worker's ``reload_weights`` and the engine's prefix cache is emptied, so no key
  or value computed with old weights is reused. A resumed run builds its engine from the resumed weights.
- **Randomness.** Row i is drawn by vLLM with seed ``streams.seeds("student")[i]``, a function of (run seed,
  step, global row) only, so a row's tokens do not depend on the process or on the other rows of its batch
  (up to vLLM's kernels, which may round differently for other batch shapes). The draws differ from the
  default engine's (which uses the ``"student"`` uniforms token by token).
- **Stopping.** A row ends at one of ``cfg.eos_token_ids`` (kept as its last token) or at its budget, as with the
  default engine: the model's own generation config and EOS are not read (``generation_config="vllm"``,
  ``ignore_eos``), so no EOS ends a row that tropd's config does not name.
- **Behaviour log-probs.** ``b_t`` is vLLM's log-prob of the sampled token under the distribution it sampled
  from (``logprobs_mode="processed_logprobs"``: after temperature and top-p); greedy decoding (temperature 0)
  records 0, the point mass, as the default engine does. The objective's importance ratio ``exp(s − b)``, with
  ``s`` the trainer's own log-prob, corrects for the small gap between vLLM's kernels and the trainer's; the
  objectives log it as ``behavior_gap`` (docs/vllm.md says why this and not a recomputed ``b``).
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from tropd.rollout.batch import RolloutRow
from tropd.rollout.sampler import KVCacheSampler
from tropd.rollout.sampling import SamplingConfig
from tropd.rollout.streams import RowStreams
from tropd.settings import ConfigError

#: What the engine needs from the process: its core in this process (weights are pushed to its worker directly).
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def checkpoint_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The student's weights under the names of its Hugging Face checkpoint, detached. A PEFT (LoRA) model gives
    its base weights with each active adapter merged in (``W + ΔW``, ``ΔW`` from PEFT's ``get_delta_weight``)
    and no adapter tensors, so an engine that knows only the base architecture can load them."""
    if not hasattr(model, "get_base_model"):
        for name, value in model.state_dict().items():
            yield name, value.detach()
        return
    base = model.get_base_model()
    merged = {}
    for name, module in base.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):
            weight = module.base_layer.weight.detach()
            for adapter in module.active_adapters:
                if adapter in getattr(module, "lora_A", {}):
                    weight = weight + module.get_delta_weight(adapter).detach().to(weight.dtype)
            merged[f"{name}.weight"] = weight
    for name, value in base.state_dict().items():
        if ".lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        yield name, merged.get(name, value.detach())


def _config_of(model: nn.Module):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config


def save_for_engine(model: nn.Module, folder: Path) -> None:
    """Write ``model``'s config and weights (:func:`checkpoint_weights`) as a Hugging Face folder an engine loads;
    tied output embeddings once, as the input embeddings (as a checkpoint holds them)."""
    from safetensors.torch import save_file

    config = _config_of(model)
    config.save_pretrained(folder)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tensors = {name: value.to("cpu").contiguous().clone() for name, value in checkpoint_weights(model)
               if not (tied and name == "lm_head.weight")}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


class VLLMStudent:
    """A vLLM engine holding a copy of ``student``; calling it writes the student's rows (module docstring).

    Args:
        student: the plain student the trainer updates (a transformers causal LM, or a PEFT model over one).
        max_model_len: the longest sequence the engine takes (prompt and response).
        kv_cache_gb: memory reserved for the engine's KV cache, in GiB.
        seed: the engine's own seed (rows are drawn with their own seeds).
    """

    def __init__(self, student: nn.Module, *, max_model_len: int, kv_cache_gb: float, seed: int = 0) -> None:
        self.student, self.max_model_len, self.kv_cache_gb, self.seed = student, max_model_len, kv_cache_gb, seed
        self.llm = None
        self.step: int | None = None
        self.sync_s = 0.0

    def _dtype(self) -> str:
        dtype = next(self.student.parameters()).dtype
        return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]

    def start(self) -> None:
        """Build the engine now, before training, so that what vLLM cannot do with these settings (a KV cache too
        small for one sequence of ``max_model_len`` tokens) stops the run at start-up, in one line."""
        t0 = time.perf_counter()
        try:
            self._build()
        except Exception as err:  # vLLM's reason, on one line, with the settings that size the engine
            reason = " ".join(str(err).split())[:400] or type(err).__name__
            raise ConfigError(f"rollout.engine=vllm: vLLM could not start an engine for sequences of up to "
                              f"{self.max_model_len} tokens (the longest prompt plus rollout.max_new_tokens) with "
                              f"rollout.vllm_kv_cache_gb={self.kv_cache_gb:g}: {reason}. Raise "
                              "rollout.vllm_kv_cache_gb, or shorten rollout.max_new_tokens or the prompts "
                              "(data.max_prompt_tokens)", "rollout.vllm_kv_cache_gb") from None
        self.sync_s += time.perf_counter() - t0

    def _build(self) -> None:
        for key, value in ENGINE_ENV.items():
            os.environ[key] = value
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its INFO/WARNING lines would flood the console
        warnings.filterwarnings("ignore", message=r".*torch\.distributed\.reduce_op.*", category=FutureWarning)
        from vllm import LLM

        on_cpu = next(self.student.parameters()).device.type == "cpu"
        with tempfile.TemporaryDirectory(prefix="tropd-vllm-") as folder:  # read once, while the engine loads
            save_for_engine(self.student, Path(folder))
            self.llm = LLM(model=folder, skip_tokenizer_init=True, dtype=self._dtype(),
                           max_model_len=self.max_model_len, seed=self.seed, enforce_eager=on_cpu,
                           kv_cache_memory_bytes=int(self.kv_cache_gb * (1 << 30)),
                           logprobs_mode="processed_logprobs", max_logprobs=0, generation_config="vllm",
                           use_tqdm_on_load=False)

    def push_weights(self) -> None:
        """Copy the student's current weights into the engine, in place, and empty its prefix cache. Tied output
        embeddings are sent as well: vLLM's CPU backend keeps its own copy of the output layer, which a push of
        the input embeddings alone leaves stale (tests/vllm/test_sampler.py)."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": checkpoint_weights(self.student),
                                                          "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()

    def sync(self, step: int) -> None:
        """Build the engine if :meth:`start` did not; push the weights once per optimiser step ``step`` (the
        first call after :meth:`start` pushes too: the student may have trained since, in an SFT warm-up)."""
        t0 = time.perf_counter()
        if self.llm is None:
            self._build()
        elif step != self.step:
            self.push_weights()
        else:
            return
        self.step = step
        self.sync_s += time.perf_counter() - t0

    @torch.no_grad()
    def __call__(self, contexts: Sequence[Sequence[int]], cfg: SamplingConfig, budgets: torch.Tensor | int,
                 streams: RowStreams) -> list[RolloutRow]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.sync(streams.step)
        budgets = torch.as_tensor(budgets, dtype=torch.long).expand(len(contexts)).tolist()
        seeds = streams.seeds("student")
        rows = [RolloutRow(tokens=torch.zeros(0, dtype=torch.long), behavior_logprobs=torch.zeros(0))
                for _ in contexts]
        todo = [i for i, budget in enumerate(budgets) if budget > 0]
        if not todo:
            return rows
        params = [SamplingParams(n=1, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=budgets[i],
                                 logprobs=0, seed=seeds[i], stop_token_ids=list(cfg.eos_token_ids), ignore_eos=True,
                                 detokenize=False, skip_special_tokens=False) for i in todo]
        prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in contexts[i]]) for i in todo]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        eos_ids = set(cfg.eos_token_ids)
        for i, out in zip(todo, outputs):
            done = out.outputs[0]
            tokens = list(done.token_ids)
            if cfg.greedy:
                logprobs = [0.0] * len(tokens)
            else:
                logprobs = [float(position[token].logprob) for position, token in zip(done.logprobs, tokens)]
            eos = bool(tokens) and tokens[-1] in eos_ids
            rows[i] = RolloutRow(tokens=torch.tensor(tokens, dtype=torch.long),
                                 behavior_logprobs=torch.tensor(logprobs, dtype=torch.float32),
                                 eos=eos, truncated=not eos and len(tokens) >= budgets[i])
        return rows

    def close(self) -> None:
        """Free the engine (a later call builds a new one from the student as it is then)."""
        self.llm, self.step = None, None


class VLLMSampler(KVCacheSampler):
    """The run's sampler with ``rollout.engine: vllm``: the student's rows come from ``engine``
    (:class:`VLLMStudent`); the teacher writes its rows as with the default engine. TRB blending, which decodes
    teacher and student token by token together, is refused (:func:`~tropd.rollout.dispatch.sample_for_needs`)."""

    def __init__(self, student: nn.Module, teacher, sampling: SamplingConfig, engine: VLLMStudent) -> None:
        super().__init__(student, teacher, sampling)
        self.engine = self.student_rows = engine

    def sample(self, prompts, request):
        """As the default sampler's; the batch's ``info`` adds ``vllm_sync_s``, the seconds spent building the
        engine or pushing weights for it."""
        before = self.engine.sync_s
        batch = super().sample(prompts, request)
        batch.info["vllm_sync_s"] = self.engine.sync_s - before
        return batch
