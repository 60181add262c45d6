"""Batched sampling from causal LMs with a KV cache, recording the exact behaviour log-prob of every token.

The decode loop is written here (not ``generate()``) so that the distribution each token is drawn from is known
exactly and can be changed per step (TRB blends two models, §4.3). One step, for row i with context ``h``:

    logp   = log_softmax(logits(h) / τ)                       (float32; τ = temperature)
    logp'  = nucleus_p(logp) − logsumexp(nucleus_p(logp))      (top-p: renormalised nucleus)
    y      = min{v : Σ_{w≤v} exp(logp'_w) > U · Σ_w exp(logp'_w)} (inverse CDF, U ~ Uniform[0, 1) of row i)
    b      = logp'[y]                                          (behaviour log-prob, stored per token)

Temperature 0 means greedy decoding: the sampling distribution is the point mass on the argmax, so ``b = 0``.
Prompts are left-padded; position ids come from the attention mask so every row sees the positions it would have
unpadded. A row stops at its first EOS (the EOS is part of the response) or at its token budget; decoding stops
when every row has stopped.

Randomness: token t of row i uses value t of that row's ``"student"`` (or ``"teacher"``) stream of
:class:`~tropd.rollout.streams.RowStreams`, so a row's response does not depend on the rows it is batched with.

Who decodes: the student is a model in this process (:func:`sample_rows`); the teacher is a
:class:`~tropd.teacher.Teacher`, which writes its rows wherever it runs (:func:`teacher_rows`) from the same
uniforms, so a teacher behind a server writes what an in-process one would.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch
from torch import nn

from tropd.rollout.batch import RolloutBatch, RolloutRow, left_pad, position_ids_from_mask
from tropd.rollout.streams import RowStreams

if TYPE_CHECKING:  # the protocol the samplers take (tropd.teacher implements it on top of this module)
    from tropd.teacher.protocol import Teacher

#: KV-cache kinds of :class:`SamplingConfig`.
KV_CACHES = ("dynamic", "static")


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How responses are sampled.

    Attributes:
        max_new_tokens: response length budget per rollout (a teacher prefix counts in it).
        eos_token_ids: token ids that end a response (the EOS token is kept as the last response token).
        pad_token_id: id written at padding positions (never carries loss).
        temperature: τ, logits are divided by τ before the softmax; 0 means greedy decoding.
        top_p: nucleus mass p in (0, 1]: keep the most probable tokens, in order, while the mass before each is
            < p (so the smallest prefix with mass ≥ p), then renormalise. 1 disables it.
        kv_cache: ``"dynamic"`` (transformers' ``DynamicCache``, grown token by token) or ``"static"``
            (``StaticCache`` preallocated for context + budget and written in place: no reallocation per token,
            fixed shapes; benchmarks/decode.py). Same distribution; float rounding may differ.
    """

    max_new_tokens: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    temperature: float = 1.0
    top_p: float = 1.0
    kv_cache: str = "dynamic"

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"SamplingConfig.max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingConfig.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.kv_cache not in KV_CACHES:
            raise ValueError(f"SamplingConfig.kv_cache must be one of {KV_CACHES}, got {self.kv_cache!r}")
        object.__setattr__(self, "eos_token_ids", tuple(int(e) for e in self.eos_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def temperature_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log_softmax(logits / τ)`` in float32 over the last dim; τ = 0 (greedy) leaves the logits unscaled."""
    x = logits.float()
    if temperature > 0 and temperature != 1.0:
        x = x / temperature
    return torch.log_softmax(x, dim=-1)


def truncate_logprobs(logp: torch.Tensor, top_p: float = 1.0, greedy: bool = False) -> torch.Tensor:
    """Restrict normalised log-probs to the sampling support and renormalise (float32).

    ``greedy``: the point mass on the argmax (0 there, −inf elsewhere; first index on ties).
    ``top_p < 1``: sort by probability (stable, descending), keep token k iff the mass of the tokens before it is
    < p (the most probable token is always kept), set the rest to −inf, subtract the kept log-sum-exp.
    """
    logp = logp.float()
    if greedy:
        out = torch.full_like(logp, float("-inf"))
        return out.scatter(-1, logp.argmax(-1, keepdim=True), 0.0)
    if top_p >= 1.0:
        return logp
    sorted_lp, order = torch.sort(logp, dim=-1, descending=True, stable=True)
    p = sorted_lp.exp()
    mass_before = p.cumsum(-1) - p
    keep_sorted = mass_before < top_p
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    masked = logp.masked_fill(~keep, float("-inf"))
    return masked - torch.logsumexp(masked, dim=-1, keepdim=True)


def sampling_logprobs(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """Log-probs of the exact sampling distribution: temperature, then top-p (renormalised), float32."""
    return truncate_logprobs(temperature_logprobs(logits, temperature), top_p, greedy=temperature == 0.0)


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless module)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def inference_mode(*models: nn.Module) -> Iterator[None]:
    """``torch.inference_mode`` with every model in eval mode (no dropout while sampling), restoring the modes after.

    Inference mode skips autograd's bookkeeping (version counters, view tracking), a visible share of a small
    model's decode step on CPU. Tensors made inside are inference tensors, which autograd may not save:
    :func:`rows_from_decode` copies them out after the block."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        with torch.inference_mode():
            yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


class CachedLM:
    """A causal LM with its own KV cache: prefill once, then one token per step.

    The cache is a ``DynamicCache``, or a ``StaticCache`` of ``static_length`` positions when that is given. Both
    calls return float32 logits ``[B, V]`` for the next token, on ``out_device``.
    """

    def __init__(self, model: nn.Module, out_device: torch.device | None = None,
                 static_length: int | None = None) -> None:
        self.model = model
        self.device = model_device(model)
        self.out_device = out_device or self.device
        from transformers import DynamicCache, StaticCache  # here: importing this module stays light

        self.cache = (DynamicCache(config=model.config) if static_length is None
                      else StaticCache(config=model.config, max_cache_len=static_length))
        # transformers renamed `past_key_values` to `cache` (5.x); pass it under the name this model's forward takes
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: the wrapped model's
        params = inspect.signature(inner.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            position_ids=position_ids.to(self.device),
            use_cache=True,
            **{self._cache_kw: self.cache},
            logits_to_keep=1,
        )
        return out.logits[:, -1, :].float().to(self.out_device)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the left-padded context ``[B, P]``; logits for the first new token."""
        return self._forward(input_ids, attention_mask, position_ids_from_mask(attention_mask))

    def step(self, tokens: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` [B] at ``positions`` [B]; ``attention_mask`` covers cache + new token ``[B, L+1]``."""
        return self._forward(tokens[:, None], attention_mask, positions[:, None])


Combine = Callable[[list[torch.Tensor]], tuple[torch.Tensor, "torch.Tensor | None"]]
"""Per-step hook: float32 next-token logits ``[B, V]`` of each decoded model -> (log-probs ``[B, V]`` of the
distribution to sample from, optional per-row diagnostic ``[B]`` such as the TRB β*)."""


@dataclass
class DecodeOutput:
    """What one decode loop produced (T = steps actually run).

    Attributes:
        tokens: ``[B, T]`` sampled tokens, pad after a row stopped.
        logprobs: ``[B, T]`` float32 behaviour log-probs of the tokens, 0 after a row stopped.
        lengths: ``[B]`` int64 tokens each row produced (EOS included).
        eos: ``[B]`` bool, the row stopped at an EOS token.
        truncated: ``[B]`` bool, the row used its whole budget without EOS.
        aux: ``[B, T]`` float32 per-step diagnostic from the combine hook (0 after a row stopped), or None.
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor
    lengths: torch.Tensor
    eos: torch.Tensor
    truncated: torch.Tensor
    aux: torch.Tensor | None = None


def draw(logp: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row from ``exp(logp)`` ``[B, V]`` by inverse CDF with the row's uniform ``u`` ``[B]``.

    The CDF is accumulated in float64; the target ``U · total`` is kept below the total, so the token drawn
    always has positive probability (a point mass gives its argmax).
    """
    cdf = logp.double().exp().cumsum(-1)
    total = cdf[:, -1:]
    target = torch.minimum(u.to(cdf).unsqueeze(-1) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=logp.shape[-1] - 1)


def decode(models: Sequence[nn.Module], input_ids: torch.Tensor, attention_mask: torch.Tensor,
           budgets: torch.Tensor | int, cfg: SamplingConfig, combine: Combine,
           uniforms: torch.Tensor, stop_check_every: int | None = None) -> DecodeOutput:
    """Sample continuations of left-padded contexts, running every model in ``models`` on the same tokens.

    ``budgets`` gives each row's maximum number of new tokens (a row with budget 0 produces nothing). At each step
    ``combine`` maps the models' next-token logits to the sampling log-probs; one token per row is drawn from them
    and fed to every model (each keeps its own KV cache). Rows that have stopped keep receiving the pad token,
    which is ignored. Randomness: token t of row i is drawn with ``uniforms[i, t]`` (``[B, ≥ max budget]``).
    Must run under :func:`inference_mode`.
    """
    b = int(input_ids.shape[0])
    device = model_device(models[0])
    budgets = torch.as_tensor(budgets, dtype=torch.long, device=device)
    if budgets.dim() == 0:
        budgets = budgets.expand(b).clone()
    if budgets.shape != (b,):
        raise ValueError(f"decode: budgets must be an int or a [B]={b} tensor, got shape {tuple(budgets.shape)}")
    t_max = int(budgets.max().item()) if b else 0
    if uniforms.shape[0] != b or (t_max and uniforms.shape[1] < t_max):
        raise ValueError(f"decode: uniforms must be [B={b}, >= {t_max}], got shape {tuple(uniforms.shape)}")
    tokens = torch.full((b, t_max), cfg.pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((b, t_max), dtype=torch.float32, device=device)
    aux: torch.Tensor | None = None
    lengths = torch.zeros(b, dtype=torch.long, device=device)
    eos = torch.zeros(b, dtype=torch.bool, device=device)
    finished = budgets <= 0
    if stop_check_every is None:
        stop_check_every = 1 if device.type == "cpu" else 8
    if t_max > 0:
        mask = attention_mask.to(device=device, dtype=torch.long)
        context = int(mask.shape[1])
        # the whole mask, preallocated: the cache plus the new token are always a prefix of it
        full_mask = torch.cat([mask, torch.ones((b, t_max), dtype=torch.long, device=device)], dim=1)
        ids = input_ids.to(device)
        static_length = context + t_max if cfg.kv_cache == "static" else None
        lms = [CachedLM(m, out_device=device, static_length=static_length) for m in models]
        logits = [lm.prefill(ids, mask) for lm in lms]
        next_pos = mask.sum(-1)
        eos_ids = torch.tensor(cfg.eos_token_ids or (-1,), dtype=torch.long, device=device)
        pad = torch.full((b,), cfg.pad_token_id, dtype=torch.long, device=device)
        uniforms = uniforms.to(device=device, dtype=torch.float64)
        for t in range(t_max):
            logp, row_aux = combine(logits)
            tok = draw(logp, uniforms[:, t])
            lp = logp.gather(-1, tok[:, None])[:, 0]
            tok = torch.where(finished, pad, tok)
            tokens[:, t] = tok
            logprobs[:, t] = torch.where(finished, torch.zeros_like(lp), lp)
            if row_aux is not None:
                if aux is None:
                    aux = torch.zeros((b, t_max), dtype=torch.float32, device=device)
                aux[:, t] = torch.where(finished, torch.zeros_like(row_aux), row_aux.float())
            lengths += (~finished).long()
            hit = ~finished & torch.isin(tok, eos_ids)
            eos |= hit
            finished = finished | hit | (lengths >= budgets)
            if t + 1 == t_max or (t + 1) % stop_check_every == 0 and bool(finished.all()):
                break
            step_mask = full_mask[:, :context + t + 1]
            logits = [lm.step(tok, step_mask, next_pos) for lm in lms]
            next_pos = next_pos + 1
    steps = int(lengths.max()) if b else 0
    return DecodeOutput(
        tokens=tokens[:, :steps],
        logprobs=logprobs[:, :steps],
        lengths=lengths,
        eos=eos,
        truncated=~eos & (lengths >= budgets),
        aux=None if aux is None else aux[:, :steps],
    )


def plain_combine(cfg: SamplingConfig) -> Combine:
    """The single-model step distribution: :func:`sampling_logprobs` with the config's temperature and top-p."""

    def combine(logits: list[torch.Tensor]) -> tuple[torch.Tensor, None]:
        return sampling_logprobs(logits[0], cfg.temperature, cfg.top_p), None

    return combine


def decode_rows(model: nn.Module, contexts: Sequence[Sequence[int]], cfg: SamplingConfig,
                budgets: torch.Tensor | int, uniforms: torch.Tensor) -> list[RolloutRow]:
    """One response per context decoded by ``model`` in this process, token t of row i drawn with
    ``uniforms[i, t]``; one :class:`RolloutRow` per context, in order (what ``Teacher.write_rows`` returns)."""
    ids, mask = left_pad(contexts, cfg.pad_token_id)
    with inference_mode(model):
        out = decode([model], ids, mask, budgets, cfg, plain_combine(cfg), uniforms)
    return rows_from_decode(out)


def sample_rows(model: nn.Module, contexts: Sequence[Sequence[int]], cfg: SamplingConfig,
                budgets: torch.Tensor | int | None = None, streams: RowStreams | int | None = None,
                purpose: str = "student") -> list[RolloutRow]:
    """Sample one response per context with ``model`` alone; one :class:`RolloutRow` per context, in order.

    ``budgets`` (default ``cfg.max_new_tokens``) may differ per row. Token t of row i uses value t of row i's
    ``purpose`` stream (``streams``: see :meth:`RowStreams.resolve`). Rows are untagged (student source).
    """
    budgets = cfg.max_new_tokens if budgets is None else budgets
    uniforms = RowStreams.resolve(streams, len(contexts)).uniform(purpose, cfg.max_new_tokens)
    return decode_rows(model, contexts, cfg, budgets, uniforms)


def teacher_rows(teacher: Teacher, contexts: Sequence[Sequence[int]], cfg: SamplingConfig,
                 budgets: torch.Tensor | int | None = None,
                 streams: RowStreams | int | None = None) -> list[RolloutRow]:
    """The rows ``teacher`` writes (``Teacher.write_rows``), one per context, in order: token t of row i drawn
    with value t of row i's ``"teacher"`` stream. ``budgets`` as in :func:`sample_rows`; rows are untagged (the
    caller says what they are)."""
    budgets = torch.as_tensor(cfg.max_new_tokens if budgets is None else budgets, dtype=torch.long)
    uniforms = RowStreams.resolve(streams, len(contexts)).uniform("teacher", cfg.max_new_tokens)
    return teacher.write_rows([list(c) for c in contexts], cfg, budgets.expand(len(contexts)), uniforms)


def rows_from_decode(out: DecodeOutput) -> list[RolloutRow]:
    """Split a :class:`DecodeOutput` into per-row records (CPU tensors). Called after :func:`inference_mode`
    exits: each row's tensors are fresh copies (``clone``), ordinary tensors that training may save for backward."""
    tokens, logp = out.tokens.cpu(), out.logprobs.cpu()
    aux = None if out.aux is None else out.aux.cpu()
    eos, truncated = out.eos.tolist(), out.truncated.tolist()
    rows = []
    for i, n in enumerate(out.lengths.tolist()):
        rows.append(RolloutRow(
            tokens=tokens[i, :n].clone(),
            behavior_logprobs=logp[i, :n].clone(),
            eos=bool(eos[i]),
            truncated=bool(truncated[i]),
            blend_beta=None if aux is None else aux[i, :n].clone(),
        ))
    return rows


#: Another engine's way of writing the student's rows, in place of decoding the model in this process:
#: ``student_rows(contexts, cfg, budgets, streams) -> rows``, one :class:`RolloutRow` per context, at most
#: ``budgets[i]`` tokens (a tensor, or an int for every row), row i drawn from row i's ``"student"`` stream
#: (:class:`tropd.rollout.vllm_sampler.VLLMStudent`).
StudentRows = Callable[[Sequence[Sequence[int]], SamplingConfig, "torch.Tensor | int", RowStreams], list[RolloutRow]]


def student_sample_rows(model: nn.Module, contexts: Sequence[Sequence[int]], cfg: SamplingConfig,
                        budgets: torch.Tensor | int | None, streams: RowStreams,
                        student_rows: StudentRows | None = None) -> list[RolloutRow]:
    """The student's rows: ``student_rows`` when given, else :func:`sample_rows` with ``model`` in this process."""
    if student_rows is None:
        return sample_rows(model, contexts, cfg, budgets, streams)
    return student_rows(contexts, cfg, cfg.max_new_tokens if budgets is None else budgets, streams)


def sample(model: nn.Module, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, *,
           streams: RowStreams | int | None = None, student_rows: StudentRows | None = None) -> RolloutBatch:
    """Plain on-policy rollouts: ``model`` samples one response per prompt (docs/method.md §1, source ``student``),
    or ``student_rows`` writes them (:data:`StudentRows`)."""
    streams = RowStreams.resolve(streams, len(prompts))
    rows = student_sample_rows(model, prompts, cfg, None, streams, student_rows)
    return RolloutBatch.from_rows(prompts, rows, cfg.pad_token_id, device=model_device(model))


def sample_teacher(teacher: Teacher, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, *,
                   streams: RowStreams | int | None = None) -> RolloutBatch:
    """Teacher-written rollouts for supervised KD (``Needs.rollout == "teacher"``), on the CPU.

    The teacher samples every response; all response positions are tagged as teacher positions
    (``teacher_token_mask``) and ``behavior_logprobs`` are the teacher's sampling log-probs.
    """
    rows = teacher_rows(teacher, prompts, cfg, streams=streams)
    for r in rows:
        r.guidance_length = int(r.tokens.numel())
        r.teacher_row = True
    return RolloutBatch.from_rows(prompts, rows, cfg.pad_token_id)

