"""The gym's models: small Llama decoders trained from scratch by supervised fine-tuning (SFT) on traces.

A model is a :class:`DecoderSpec` (transformers' ``LlamaConfig`` sizes) plus an :class:`SFTPlan` (which families,
which trace style, how much noise, how many steps). The SFT loss is the mean token NLL of the completion and its
EOS given the prompt (prompt positions carry no loss)::

    L = − (1/N) Σ_i Σ_{t ∈ completion_i ∪ {EOS}} log π(y_t | prompt_i, x_<t)

where the input ``x`` equals the target ``y`` except in *recovery* examples (``SFTPlan.recovery``): there ``x``
is a teacher trace with some steps corrupted (``noisy_trace``) while ``y`` stays the clean trace, so the model
learns what to write next after a wrong step: the correct continuation (each step is computed from the problem,
not from the corrupted value). A teacher trained that way gives useful next-token distributions on the
imperfect prefixes a student samples, as LLM teachers trained on diverse text do.

AdamW with a linear warm-up (5% of the steps), then either cosine decay to 0 (``schedule="cosine"``: a
converged, annealed model) or a constant learning rate (``schedule="constant"``: a checkpoint from the stable
phase of a warm-up/stable/decay schedule, the usual state of a student handed to a later training stage, which
then doubles as its decay; docs/gym.md says why the gym's students start there). Training is deterministic for
a plan: the examples, their order and the initial weights come from ``plan.seed``, and it runs on one CPU thread
whatever the caller's thread count (a matmul's float summation order depends on the threads, and two builds of
the same plan on 1 and 2 threads ended 10 points apart in held-out accuracy).

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
from transformers import (LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, get_constant_schedule_with_warmup,
                          get_cosine_schedule_with_warmup)

from tropd.gym.tasks import Problem, family_of, make_dataset
from tropd.gym.tokenizer import build_tokenizer
from tropd.models import cache_dir

#: Bump when the training recipe changes in a way the cache key cannot see (invalidates cached models).
RECIPE_VERSION = 3
STYLES = ("teacher", "alt", "noisy")
SCHEDULES = ("cosine", "constant")


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
        alt_share: share of the problems whose target is the ``alt`` trace instead (chosen per problem by a hash
            of ``(seed, problem)``, nested: the problems in ``alt`` style at 0.25 are also at 0.5). The gym's
            continuous mismatch knob.
        recovery: for ``teacher``-style targets, the probability that each step of the *input* is corrupted
            while the target stays clean (see the module docstring); 0 trains on clean traces only.
        examples: distinct training problems drawn (a pool; steps × batch may revisit them).
        steps, batch, lr, schedule: optimisation (AdamW, warm-up then ``cosine`` decay or ``constant``).
        seed: examples, their order, the corruptions and the initial weights.
    """

    families: tuple[str, ...]
    style: str = "teacher"
    noise: float = 0.0
    alt_share: float = 0.0
    recovery: float = 0.0
    examples: int = 6000
    steps: int = 1500
    batch: int = 64
    lr: float = 3e-3
    seed: int = 0
    weight_decay: float = 0.0
    schedule: str = "cosine"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"SFTPlan.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.style not in STYLES:
            raise ValueError(f"SFTPlan.style must be one of {STYLES}, got {self.style!r}")
        for name in ("noise", "alt_share", "recovery"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"SFTPlan.{name} must be a number in [0, 1], got {value!r}")


def _unit(*parts: object) -> float:
    """A uniform number in [0, 1) from a hash of ``parts`` (stable across runs and machines)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def target(problem: Problem, plan: SFTPlan, draw: int = 0) -> tuple[str, str]:
    """``(input, target)`` completions a model is trained on for ``problem`` under ``plan`` (equal length; they
    differ only in a recovery example's corrupted characters). ``draw`` numbers the visits of one problem, so a
    recovery example gets fresh corruptions each time it is revisited."""
    fam = family_of(problem)
    if plan.alt_share > 0 and _unit("alt", plan.seed, problem.key) < plan.alt_share:
        text = fam.completion(problem, "alt")
        return text, text
    if plan.style == "noisy":
        text = fam.noisy_completion(problem, plan.noise, plan.seed)
        return text, text
    text = fam.completion(problem, plan.style)
    if plan.style == "teacher" and plan.recovery > 0:
        return fam.noisy_completion(problem, plan.recovery, plan.seed * 1_000_003 + draw), text
    return text, text


def encode_example(tok: PreTrainedTokenizerFast, prompt: str, completion: str,
                   target_text: str | None = None) -> tuple[list[int], int, list[int]]:
    """``([BOS] + prompt + completion + [EOS], prompt length incl. BOS, labels)``: the loss covers the positions
    from the prompt length on, whose labels are ``target_text``'s ids (``completion``'s when None) and EOS."""
    prompt_ids = tok(prompt)["input_ids"]
    completion_ids = tok(completion, add_special_tokens=False)["input_ids"]
    target_ids = completion_ids if target_text is None else tok(target_text, add_special_tokens=False)["input_ids"]
    if len(target_ids) != len(completion_ids):
        raise ValueError(f"input and target completions differ in length: {completion!r} vs {target_text!r}")
    ids = prompt_ids + completion_ids + [tok.eos_token_id]
    return ids, len(prompt_ids), target_ids + [tok.eos_token_id]


def _batch(rows: list[tuple[list[int], int, list[int]]], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (seq, n_prompt, target_ids) in enumerate(rows):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        labels[i, n_prompt:len(seq)] = torch.tensor(target_ids)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sft(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, plan: SFTPlan,
        log: Callable[[str], None] | None = None) -> list[float]:
    """Train ``model`` in place on ``plan``; returns the loss of every step."""
    problems = make_dataset(list(plan.families), "train", plan.examples, seed=plan.seed)
    fixed = plan.recovery == 0  # without recovery an example is the same on every visit: encode it once
    cache: dict[int, tuple] = {}
    visits = [0] * len(problems)

    def example(i: int) -> tuple:
        if fixed and i in cache:
            return cache[i]
        p = problems[i]
        row = encode_example(tok, p.prompt, *target(p, plan, visits[i]))
        visits[i] += 1
        cache[i] = row
        return row

    rng = random.Random(plan.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=plan.lr, weight_decay=plan.weight_decay)
    warmup = max(1, plan.steps // 20)
    schedule = (get_cosine_schedule_with_warmup(optimizer, warmup, plan.steps) if plan.schedule == "cosine"
                else get_constant_schedule_with_warmup(optimizer, warmup))
    model.train()
    losses = []
    for step in range(plan.steps):
        batch = _batch([example(rng.randrange(len(problems))) for _ in range(plan.batch)], tok.pad_token_id)
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
                  evaluate: Callable[[LlamaForCausalLM, PreTrainedTokenizerFast], dict] | None = None,
                  init: str | None = None) -> Path:
    """The folder of the model ``spec`` trained on ``plan`` (``save_pretrained`` + tokenizer + ``gym.json``),
    trained now unless cached. ``evaluate(model, tok)`` results are stored in ``gym.json`` next to the plan;
    ``init`` names anything else they depend on (e.g. the teacher whose NLL they report), so it keys the cache."""
    root = Path(root) if root is not None else gym_cache()
    folder = root / cache_key(spec, plan, init)
    if (folder / "gym.json").is_file():
        return folder
    tok = build_tokenizer()
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = spec.build(tok, plan.seed)
        losses = sft(model, tok, plan, log)
    finally:
        torch.set_num_threads(threads)
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
