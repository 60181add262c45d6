"""The gym's models: small Llama decoders trained from scratch by supervised fine-tuning (SFT) on traces.

A model is a :class:`DecoderSpec` (transformers' ``LlamaConfig`` sizes) plus an :class:`SFTPlan` (which families,
which trace style, how much noise, how many steps). The SFT loss is the mean token NLL of the completion and its
EOS given the prompt (prompt positions carry no loss)::

    L = − (1/N) Σ_i Σ_{t ∈ completion_i ∪ {EOS}} log π(y_t | prompt_i, y_<t)

AdamW with a linear warm-up (5% of the steps) and cosine decay (transformers' scheduler). Training is
deterministic for a plan: the examples, their order and the initial weights come from ``plan.seed``.

:func:`trained_model` caches each trained model under ``<cache>/gym/<key>`` (``$TROPD_CACHE`` or
``~/.cache/tropd/models``), ``key`` = SHA-256 of the spec, the plan and :data:`RECIPE_VERSION`, written to a
temporary folder first and renamed, so it is trained once per machine and an interrupted build leaves nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, get_cosine_schedule_with_warmup

from tropd.gym.tasks import Problem, family_of, make_dataset
from tropd.gym.tokenizer import build_tokenizer
from tropd.models import cache_dir

#: Bump when the training recipe changes in a way the cache key cannot see (invalidates cached models).
RECIPE_VERSION = 1
STYLES = ("teacher", "alt", "noisy")


@dataclass(frozen=True)
class DecoderSpec:
    """Sizes of a Llama decoder (grouped-query attention with ``heads // 2`` KV heads, untied head)."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int = 128

    def build(self, tok: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
        """A freshly initialised model for ``tok``'s vocabulary (weights drawn from ``seed``)."""
        config = LlamaConfig(
            vocab_size=len(tok), hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads,
            num_key_value_heads=max(1, self.heads // 2), max_position_embeddings=self.max_positions,
            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            tie_word_embeddings=False)
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        model.generation_config.pad_token_id = tok.pad_token_id
        return model


@dataclass(frozen=True)
class SFTPlan:
    """What a model is trained on and how.

    Attributes:
        families: task family names (``tropd.gym.FAMILIES``), mixed evenly.
        style: trace style of the targets: ``teacher``, ``alt`` (another valid order of steps) or ``noisy``
            (teacher traces with a share ``noise`` of their steps corrupted; the final answer stays right).
        noise: share of corrupted steps for ``style="noisy"``.
        examples: distinct training problems drawn (a pool; steps × batch may revisit them).
        steps, batch, lr: optimisation (AdamW, warm-up then cosine decay).
        seed: examples, their order and the initial weights.
    """

    families: tuple[str, ...]
    style: str = "teacher"
    noise: float = 0.0
    examples: int = 6000
    steps: int = 1500
    batch: int = 64
    lr: float = 3e-3
    seed: int = 0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"SFTPlan.style must be one of {STYLES}, got {self.style!r}")
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"SFTPlan.noise must be in [0, 1], got {self.noise}")


def target(problem: Problem, style: str, noise: float = 0.0, seed: int = 0) -> str:
    """The completion a model is trained to write for ``problem`` in ``style``."""
    fam = family_of(problem)
    if style == "noisy":
        return fam.noisy_completion(problem, noise, seed)
    return fam.completion(problem, style)


def encode_example(tok: PreTrainedTokenizerFast, prompt: str, completion: str) -> tuple[list[int], int]:
    """``([BOS] + prompt + completion + [EOS], prompt length incl. BOS)``: the loss covers the rest."""
    prompt_ids = tok(prompt)["input_ids"]
    completion_ids = tok(completion, add_special_tokens=False)["input_ids"]
    return prompt_ids + completion_ids + [tok.eos_token_id], len(prompt_ids)


def _batch(rows: list[tuple[list[int], int]], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (seq, n_prompt) in enumerate(rows):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        labels[i, n_prompt:len(seq)] = torch.tensor(seq[n_prompt:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sft(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, plan: SFTPlan,
        log: Callable[[str], None] | None = None) -> list[float]:
    """Train ``model`` in place on ``plan``; returns the loss of every step."""
    problems = make_dataset(list(plan.families), "train", plan.examples, seed=plan.seed)
    rows = [encode_example(tok, p.prompt, target(p, plan.style, plan.noise, plan.seed)) for p in problems]
    rng = random.Random(plan.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=plan.lr, weight_decay=plan.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, plan.steps // 20), plan.steps)
    model.train()
    losses = []
    for step in range(plan.steps):
        batch = _batch([rows[rng.randrange(len(rows))] for _ in range(plan.batch)], tok.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if log is not None and (step + 1) % max(1, plan.steps // 10) == 0:
            log(f"  sft step {step + 1}/{plan.steps}: loss {sum(losses[-20:]) / len(losses[-20:]):.4f}")
    model.eval()
    return losses


def cache_key(spec: DecoderSpec, plan: SFTPlan, init: str | None = None) -> str:
    """Content hash naming a trained model: spec, plan, starting point and recipe version."""
    blob = json.dumps({"spec": asdict(spec), "plan": asdict(plan), "init": init, "recipe": RECIPE_VERSION},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def gym_cache() -> Path:
    return cache_dir() / "gym"


def trained_model(spec: DecoderSpec, plan: SFTPlan, root: Path | None = None,
                  log: Callable[[str], None] | None = None,
                  evaluate: Callable[[LlamaForCausalLM, PreTrainedTokenizerFast], dict] | None = None) -> Path:
    """The folder of the model ``spec`` trained on ``plan`` (``save_pretrained`` + tokenizer + ``gym.json``),
    trained now unless cached. ``evaluate(model, tok)`` results are stored in ``gym.json`` next to the plan."""
    root = Path(root) if root is not None else gym_cache()
    folder = root / cache_key(spec, plan)
    if (folder / "gym.json").is_file():
        return folder
    tok = build_tokenizer()
    start = time.perf_counter()
    model = spec.build(tok, plan.seed)
    losses = sft(model, tok, plan, log)
    info = {"spec": asdict(spec), "plan": asdict(plan), "recipe": RECIPE_VERSION,
            "params": sum(p.numel() for p in model.parameters()), "final_loss": sum(losses[-50:]) / len(losses[-50:]),
            "train_s": round(time.perf_counter() - start, 1)}
    if evaluate is not None:
        info["eval"] = evaluate(model, tok)
    tmp = root / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "gym.json").write_text(json.dumps(info, indent=2))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished the same model first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def model_info(folder: Path) -> dict:
    """The ``gym.json`` a cached model was saved with."""
    return json.loads((Path(folder) / "gym.json").read_text())
