"""``tropd serve-teacher``: a frozen teacher behind HTTP, for trainers on other processes or machines.

The server loads one model (an HF folder, a .gguf file or ``smollm2``) and answers the endpoints of
:mod:`tropd.teacher.wire`: scores of response positions (sampled-token log-prob, top-k, entropy, full logits:
only what the request's ``needs`` ask for) and written rows (guidance prefixes, GKD and SFT teacher rows),
drawn with the caller's random uniforms so that a remote teacher writes exactly what an in-process one would.

Requests are batched: a worker thread takes the oldest request and every waiting request of the same kind and
settings (up to ``max_batch_rows`` rows), lays them out as one batch (prompts left-padded to the longest,
responses right-padded), runs the model once, and splits the results. Clients of a data-parallel run (one per
process) thus share teacher forwards. With ``token`` set, every request but ``GET /v1/health`` must carry
``Authorization: Bearer <token>``.

One client cannot hurt the others (:class:`Limits`, each a ``serve-teacher`` flag): a request is checked on
arrival, before it joins a batch (integer ids inside the vocabulary, shapes that agree, ``response_start`` and
lengths inside the model's context, finite sampling settings), and refused alone with a 4xx naming the field;
its body, rows, tokens, answer size and time are bounded (413 / 408 / 503 naming the limit), and so are the
time a client may take to send its headers and body. Should a merged batch still fail, each of its requests is
run alone, so only the one at fault gets the error.

Engines (``--engine``): HF transformers on CPU or GPU (:class:`HFEngine`, the default: every score), or an
in-process vLLM engine (:class:`~tropd.teacher.vllm_engine.VLLMEngine`: sampled-token log-probs and top-k, no
full logits or entropy; a score request asking for those is refused with a 422 naming them). ``/v1/info`` says
which engine serves and what it computes (``engine``, ``supports``).
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import ipaddress
import logging
import math
import os
import socket
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from fastapi import FastAPI, HTTPException, Request  # the `server` extra; FastAPI resolves these names globally
from fastapi.responses import JSONResponse, Response

from tropd.needs import Needs
from tropd.rollout.batch import left_pad
from tropd.rollout.sampling import KV_CACHES, SamplingConfig, decode_rows
from tropd.settings import is_number
from tropd.teacher import wire
from tropd.teacher.scoring import TEACHER_CHUNK, TeacherScores, score_with_teacher

logger = logging.getLogger(__name__)

HEALTH_PATH = "/v1/health"
KEEP_ALIVE_S = 30  # an idle keep-alive connection is closed after this many seconds
MAX_HEADER_BYTES = 16 * 1024  # request line and headers larger than this are refused (h11)


def public_name(model: str) -> str:
    """What ``/v1/info`` calls the model: ``smollm2`` as given, a folder or file by its own name, never the local
    path to it."""
    looks_like_path = os.sep in model or (os.altsep and os.altsep in model) or Path(model).exists()
    return (Path(model).expanduser().resolve().name or model) if looks_like_path else model


class HFEngine:
    """A frozen HF causal LM: scores ``(prompt, response)`` rows and writes continuations of contexts."""

    def __init__(self, model, tokenizer, name: str, chunk_size: int = TEACHER_CHUNK) -> None:
        from tropd.models import context_length, logits_vocab_size, prepare_tokenizer

        self.model = model.requires_grad_(False).eval()
        self.tokenizer = prepare_tokenizer(tokenizer) or tokenizer
        self.name, self.chunk_size = name, chunk_size
        self.device = next(model.parameters()).device
        self.vocab_size = logits_vocab_size(model)
        self.context_length = context_length(model)
        embeddings = model.get_input_embeddings()
        rows = getattr(embeddings, "num_embeddings", None)
        #: ids a request may hold: [0, id_limit), inside both the input embeddings and the logits
        self.id_limit = min(self.vocab_size, rows) if isinstance(rows, int) else self.vocab_size

    def info(self) -> dict:
        tok, config = self.tokenizer, self.model.config.get_text_config()
        return {"model": public_name(self.name), "engine": "hf", "vocab_size": self.vocab_size,
                "supports": {name: True for name in wire.SCORE_NEEDS[:-1]},
                "context_length": self.context_length,
                "num_layers": getattr(config, "num_hidden_layers", None),
                "num_parameters": sum(p.numel() for p in self.model.parameters()),
                "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
                "tokenizer": {"vocab": tok.get_vocab(), "len": len(tok),
                              "chat_template": bool(getattr(tok, "chat_template", None)),
                              **{name: getattr(tok, name, None) for name in
                                 ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")}}}

    def unsupported(self, needs: Needs) -> str | None:
        """Why a score request with ``needs`` cannot be answered: never (every score is computed)."""
        return None

    def score(self, input_ids, attention_mask, response_start: int, tokens, needs: Needs) -> TeacherScores:
        return score_with_teacher(self.model, input_ids.to(self.device), attention_mask.to(self.device),
                                  response_start, tokens.to(self.device), needs, chunk_size=self.chunk_size)

    def write(self, contexts: list[list[int]], cfg: SamplingConfig, budgets: torch.Tensor, uniforms: torch.Tensor):
        return decode_rows(self.model, contexts, cfg, budgets, uniforms)


# -- limits --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    """What one request may cost the server; each field is the ``serve-teacher`` flag of the same name
    (docs/scaling.md lists them). Sizes in MiB, times in seconds."""

    max_body_mb: float = 128.0  # request body; refused with 413 from its Content-Length, before it is read
    max_request_rows: int = 1024  # rows (sequences) of one request
    max_request_tokens: int = 1 << 21  # rows x padded length (score), rows x (longest context + largest budget)
    max_response_mb: float = 1024.0  # the answer of a score request (full logits: rows x positions x V x 4 bytes)
    request_timeout: float = 300.0  # from the body's arrival to the answer (queue and compute); then 503
    read_timeout: float = 60.0  # to send the whole body once the headers are in; then 408
    header_timeout: float = 10.0  # to send the request line and headers (of each request); then the socket closes

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (is_number(value) and value > 0):
                raise ValueError(f"--{f.name.replace('_', '-')} must be a positive number, got {value!r}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    @property
    def max_response_bytes(self) -> int:
        return int(self.max_response_mb * 2**20)

    def describe(self) -> str:
        return (f"limits: body {self.max_body_mb:g} MiB, {self.max_request_rows} rows and {self.max_request_tokens} "
                f"tokens per request, answer {self.max_response_mb:g} MiB, {self.request_timeout:g} s per request, "
                f"headers in {self.header_timeout:g} s, body in {self.read_timeout:g} s")


# -- checking a request on arrival ---------------------------------------------------------------------------
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _show(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _refuse(field_name: str, message: str, status: int = 422):
    return HTTPException(status, f"{field_name}: {message}")


def _integers(t: torch.Tensor, name: str, dim: int, allow_bool: bool = False) -> torch.Tensor:
    if not (t.dtype in _INT_DTYPES or allow_bool and t.dtype == torch.bool):
        raise _refuse(name, f"must hold integers (int32 or int64), got {_dtype(t)}")
    if t.dim() != dim:
        raise _refuse(name, f"must have {dim} dimension(s), got shape {list(t.shape)}")
    return t


def _in_range(t: torch.Tensor, name: str, hi: int, what: str = "token id", where: str | None = None) -> None:
    """Every value of ``t`` in ``[0, hi)``."""
    if t.numel() == 0:
        return
    low, high = int(t.min()), int(t.max())
    if low < 0 or high >= hi:
        raise _refuse(name, f"{what} {low if low < 0 else high} is outside {where or f'the vocabulary [0, {hi})'}")


def _int_field(data: dict, name: str, low: int, high: int | None = None, label: str | None = None) -> int:
    value = data.get(name)
    label = label or name
    if not isinstance(value, int) or isinstance(value, bool):
        raise _refuse(label, f"must be an integer, got {_show(value)}")
    if value < low or high is not None and value > high:
        raise _refuse(label, f"{value} is outside [{low}, {'inf' if high is None else high}]")
    return value


def _check_rows(rows: int, limits: Limits, name: str) -> None:
    if rows > limits.max_request_rows:
        raise _refuse(name, f"{rows} rows exceed the server's limit of {limits.max_request_rows} per request "
                            f"(--max-request-rows); send fewer rows at a time", 413)


def _check_tokens(tokens: int, limits: Limits, name: str, how: str) -> None:
    if tokens > limits.max_request_tokens:
        raise _refuse(name, f"{how} = {tokens} tokens exceed the server's limit of {limits.max_request_tokens} per "
                            f"request (--max-request-tokens); send fewer rows at a time", 413)


def _needs(data, vocab: int) -> Needs:
    if not isinstance(data, dict):
        raise _refuse("needs", f"must be a JSON object, got {_show(data)}")
    unknown = set(data) - set(wire.SCORE_NEEDS)
    if unknown:
        raise _refuse("needs", f"unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    for name in wire.SCORE_NEEDS[:-1]:
        if name in data and not isinstance(data[name], bool):
            raise _refuse(f"needs.{name}", f"must be true or false, got {_show(data[name])}")
    if "top_k" in data:
        _int_field(data, "top_k", 0, vocab, "needs.top_k")
    try:
        return Needs(**data)
    except ValueError as err:
        raise _refuse("needs", str(err)) from None


def _answer_bytes_per_position(needs: Needs, vocab: int) -> int:
    return (4 * (needs.teacher_logprobs + needs.teacher_entropy) + 8 * needs.top_k * needs.teacher_topk
            + 4 * vocab * needs.teacher_logits)


def score_request(engine: HFEngine, limits: Limits, t: dict[str, torch.Tensor], meta: dict) -> tuple[dict, int, str]:
    """Check a ``/v1/score`` request (raises an HTTPException naming the field); its payload, rows and batch key."""
    ids = _integers(t["input_ids"], "input_ids", 2)
    rows, length = ids.shape
    if rows < 1 or length < 2:
        raise _refuse("input_ids", f"must be [B, L] with B >= 1 and L >= 2, got shape {list(ids.shape)}")
    mask = _integers(t["attention_mask"], "attention_mask", 2, allow_bool=True)
    if mask.shape != ids.shape:
        raise _refuse("attention_mask", f"shape {list(mask.shape)} differs from input_ids' {list(ids.shape)}")
    start = _int_field(meta, "response_start", 1, length - 1)
    tokens = _integers(t["tokens"], "tokens", 2)
    if tuple(tokens.shape) != (rows, length - start):
        raise _refuse("tokens", f"shape {list(tokens.shape)} is not [B, L - response_start] = "
                                f"[{rows}, {length - start}]")
    _check_rows(rows, limits, "input_ids")
    if engine.context_length and length > engine.context_length:
        raise _refuse("input_ids", f"{length} positions exceed the model's context of {engine.context_length} tokens")
    _check_tokens(rows * length, limits, "input_ids", f"{rows} rows x {length} positions")
    needs = _needs(meta.get("needs", {}), engine.vocab_size)
    why = engine.unsupported(needs)
    if why:
        raise _refuse("needs", why)
    answer = rows * (length - start) * _answer_bytes_per_position(needs, engine.vocab_size)
    if answer > limits.max_response_bytes:
        raise _refuse("needs", f"the answer would be {answer / 2**20:.0f} MiB, over the server's limit of "
                               f"{limits.max_response_mb:g} MiB (--max-response-mb); send fewer rows at a time", 413)
    _in_range(ids, "input_ids", engine.id_limit)
    _in_range(tokens, "tokens", engine.id_limit)
    _in_range(mask, "attention_mask", 2, what="value", where="{0, 1}")
    payload = {"input_ids": ids.long(), "attention_mask": mask.long(), "tokens": tokens.long(),
               "response_start": start, "needs": needs}
    return payload, rows, repr(wire.needs_to_json(needs))


def _sampling(data, id_limit: int) -> SamplingConfig:
    if not isinstance(data, dict):
        raise _refuse("sampling", f"must be a JSON object, got {_show(data)}")
    known = {f.name for f in fields(SamplingConfig)}
    unknown = set(data) - known
    if unknown:
        raise _refuse("sampling", f"unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    _int_field(data, "max_new_tokens", 0, label="sampling.max_new_tokens")
    _int_field(data, "pad_token_id", 0, id_limit - 1, "sampling.pad_token_id")
    eos = data.get("eos_token_ids")
    if not isinstance(eos, list) or len(eos) > 1024:
        raise _refuse("sampling.eos_token_ids", f"must be a list of at most 1024 token ids, got {_show(eos)}")
    for i in range(len(eos)):
        _int_field({"id": eos[i]}, "id", 0, id_limit - 1, f"sampling.eos_token_ids[{i}]")
    for name, low, high, low_open in (("temperature", 0.0, math.inf, False), ("top_p", 0.0, 1.0, True)):
        value = data.get(name, 1.0)
        if not is_number(value) or value < low or low_open and value == low or value > high:
            span = f"{'(' if low_open else '['}{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
            raise _refuse(f"sampling.{name}", f"must be a finite number {'in ' if math.isfinite(high) else ''}"
                                              f"{span}, got {_show(value)}")
    if data.get("kv_cache", "dynamic") not in KV_CACHES:
        raise _refuse("sampling.kv_cache", f"must be one of {', '.join(KV_CACHES)}, got {_show(data['kv_cache'])}")
    try:
        return SamplingConfig(**{**data, "eos_token_ids": tuple(eos)})
    except (ValueError, TypeError) as err:
        raise _refuse("sampling", str(err)) from None


def generate_request(engine: HFEngine, limits: Limits, t: dict[str, torch.Tensor],
                     meta: dict) -> tuple[dict, int, str]:
    """Check a ``/v1/generate`` request (raises an HTTPException naming the field); its payload, rows and batch
    key. A budget that would run past the model's context is cut to end at it."""
    flat = _integers(t["context_ids"], "context_ids", 1)
    lengths = _integers(t["context_lengths"], "context_lengths", 1).long()
    rows = int(lengths.shape[0])
    if rows < 1:
        raise _refuse("context_lengths", "no contexts")
    _check_rows(rows, limits, "context_lengths")
    if int(lengths.min()) < 1:
        raise _refuse("context_lengths", f"every context needs at least one token, got {int(lengths.min())}")
    if int(lengths.sum()) != flat.numel():
        raise _refuse("context_lengths", f"they sum to {int(lengths.sum())} but context_ids holds {flat.numel()} ids")
    budgets = _integers(t["budgets"], "budgets", 1).long()
    if budgets.shape[0] != rows:
        raise _refuse("budgets", f"{budgets.shape[0]} values for {rows} contexts")
    if int(budgets.min()) < 0:
        raise _refuse("budgets", f"must be >= 0, got {int(budgets.min())}")
    uniforms = t["uniforms"]
    if not uniforms.is_floating_point() or uniforms.dim() != 2 or uniforms.shape[0] != rows:
        raise _refuse("uniforms", f"must be a float [B, W] tensor with B = {rows}, got {_dtype(uniforms)} "
                                  f"{list(uniforms.shape)}")
    longest = int(lengths.max())
    if engine.context_length:
        if longest > engine.context_length:
            raise _refuse("context_lengths", f"a context of {longest} tokens exceeds the model's context of "
                                             f"{engine.context_length}")
        budgets = torch.minimum(budgets, engine.context_length - lengths)
    t_max = int(budgets.max())
    _check_tokens(rows * (longest + t_max), limits, "context_ids",
                  f"{rows} rows x ({longest} context + {t_max} new)")
    if uniforms.shape[1] < t_max:
        raise _refuse("uniforms", f"{uniforms.shape[1]} per row, fewer than the largest budget {t_max}")
    uniforms = uniforms[:, :t_max].double()
    if uniforms.numel() and not (torch.isfinite(uniforms).all() and uniforms.min() >= 0 and uniforms.max() <= 1):
        raise _refuse("uniforms", "must be finite numbers in [0, 1]")
    cfg = _sampling(meta.get("sampling"), engine.id_limit)
    _in_range(flat, "context_ids", engine.id_limit)
    contexts = [c.tolist() for c in flat.long().split(lengths.tolist())]
    return {"contexts": contexts, "budgets": budgets, "uniforms": uniforms, "cfg": cfg}, rows, repr(cfg)


# -- batching ----------------------------------------------------------------------------------------------
class _Abandoned(RuntimeError):
    """Every request of a running batch timed out or its client went away: the batch stops."""


@dataclass
class _Job:
    kind: str  # "score" | "generate"
    key: str  # jobs with the same key can share one batch
    rows: int
    payload: dict
    future: Future = field(default_factory=Future)
    compute_s: float = 0.0  # seconds of the batch this job ran in
    abandoned: bool = False  # its request timed out or its client went away: nobody waits for the result


def _merge_scores(engine: HFEngine, jobs: list[_Job]) -> list[TeacherScores]:
    """Score several requests in one batch: each row re-laid out to the longest prompt and response."""
    prompts, responses, masks = [], [], []
    for job in jobs:
        p = job.payload
        ids, mask, start = p["input_ids"], p["attention_mask"], p["response_start"]
        for i in range(ids.shape[0]):
            prompts.append(ids[i, :start][mask[i, :start].bool()].tolist())
            responses.append(ids[i, start:])
            masks.append(mask[i, start:])
    width = max(r.numel() for r in responses)
    pad = engine.tokenizer.pad_token_id
    ids_p, mask_p = left_pad(prompts, pad)
    ids_r = torch.full((len(responses), width), pad, dtype=torch.long)
    mask_r = torch.zeros((len(responses), width), dtype=torch.long)
    for i, (r, m) in enumerate(zip(responses, masks)):
        ids_r[i, :r.numel()], mask_r[i, :m.numel()] = r, m
    needs = jobs[0].payload["needs"]
    scores = engine.score(torch.cat([ids_p, ids_r], 1), torch.cat([mask_p, mask_r], 1), ids_p.shape[1], ids_r,
                          needs)
    out, row = [], 0
    for job in jobs:
        b, t = job.payload["tokens"].shape
        out.append(TeacherScores(**{k: (None if v is None else v[row:row + b, :t].cpu())
                                    for k, v in scores.as_kwargs().items()}))
        row += b
    return out


def _merge_generate(engine: HFEngine, jobs: list[_Job]) -> list[list]:
    contexts = [c for job in jobs for c in job.payload["contexts"]]
    budgets = torch.cat([job.payload["budgets"] for job in jobs])
    width = max(job.payload["uniforms"].shape[1] for job in jobs)
    uniforms = torch.cat([torch.nn.functional.pad(job.payload["uniforms"], (0, width - job.payload["uniforms"].shape[1]))
                          for job in jobs])
    rows = engine.write(contexts, jobs[0].payload["cfg"], budgets, uniforms)
    out, start = [], 0
    for job in jobs:
        out.append(rows[start:start + job.rows])
        start += job.rows
    return out


class Batcher:
    """One worker thread that runs queued jobs, merging jobs of one kind and key (module docstring).

    A merged batch that fails is run again request by request, so only the failing request gets the error. A
    batch whose every request was abandoned (timed out, client gone) stops at the model's next layer."""

    def __init__(self, engine: HFEngine, max_batch_rows: int = 64, wait_s: float = 0.002) -> None:
        self.engine, self.max_batch_rows, self.wait_s = engine, max_batch_rows, wait_s
        self._jobs: collections.deque[_Job] = collections.deque()
        self._ready = threading.Condition()
        self._running: list[_Job] | None = None
        self.stats = {"requests": 0, "batches": 0, "rows": 0}
        self._watch(getattr(engine, "model", None))
        threading.Thread(target=self._loop, name="tropd-teacher-batcher", daemon=True).start()

    def _watch(self, model) -> None:
        """Check, before each decoder layer (and each decoding step), whether anyone still waits for the batch."""
        if not isinstance(model, torch.nn.Module):
            return
        from transformers.modeling_layers import GradientCheckpointingLayer

        watched = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        for module in watched + ([embeddings] if isinstance(embeddings, torch.nn.Module) else []):
            module.register_forward_pre_hook(self._stop_if_abandoned)

    def _stop_if_abandoned(self, module, args) -> None:
        group = self._running
        if group and all(job.abandoned for job in group):
            raise _Abandoned("every request of this batch timed out or went away")

    def submit(self, job: _Job) -> Future:
        with self._ready:
            self._jobs.append(job)
            self._ready.notify()
        return job.future

    def _take(self) -> list[_Job]:
        with self._ready:
            while True:
                while not self._jobs:
                    self._ready.wait()
                deadline = time.monotonic() + self.wait_s
                while time.monotonic() < deadline:  # a moment for the other clients' requests of this step
                    self._ready.wait(deadline - time.monotonic())
                group: list[_Job] = []
                rows, rest = 0, collections.deque()
                while self._jobs:
                    job = self._jobs.popleft()
                    if job.abandoned or job.future.cancelled():  # nobody waits for it any more
                        continue
                    first = group[0] if group else None
                    fits = first is None or (job.kind == first.kind and job.key == first.key
                                             and rows + job.rows <= self.max_batch_rows)
                    if not fits:
                        rest.append(job)
                    elif job.future.set_running_or_notify_cancel():
                        group.append(job)
                        rows += job.rows
                self._jobs.extendleft(reversed(rest))
                if group:
                    return group

    def _compute(self, group: list[_Job]) -> list:
        """The results of ``group`` (an exception in place of a request's result when it failed)."""
        merge = _merge_scores if group[0].kind == "score" else _merge_generate
        self._running = group
        try:
            with torch.no_grad():
                results = merge(self.engine, group)
            if len(results) != len(group):
                raise RuntimeError(f"the batch gave {len(results)} results for {len(group)} requests")
            return results
        except _Abandoned as err:
            return [err] * len(group)
        except Exception as err:  # noqa: BLE001 - reported to the waiting requests
            if len(group) == 1:
                logger.exception("teacher batch failed")
                return [err]
            logger.warning("a teacher batch of %d requests failed (%s: %s); running each alone", len(group),
                           type(err).__name__, err)
            return [self._compute([job])[0] for job in group]
        finally:
            self._running = None

    def _loop(self) -> None:
        while True:
            group = self._take()
            start = time.perf_counter()
            outcomes = self._compute(group)
            compute_s = time.perf_counter() - start
            for job, outcome in zip(group, outcomes):
                job.compute_s = compute_s
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)
            self.stats["requests"] += len(group)
            self.stats["batches"] += 1
            self.stats["rows"] += sum(job.rows for job in group)


# -- HTTP --------------------------------------------------------------------------------------------------
class _TokenGuard:
    """ASGI middleware: with a token, every request but ``GET /v1/health`` must carry it (else 401), checked
    before anything else is read or routed."""

    def __init__(self, app, token: str | None) -> None:
        self.app, self.expected = app, (f"Bearer {token}".encode() if token else None)

    async def __call__(self, scope, receive, send) -> None:
        if self.expected is not None and scope["type"] == "http" and scope["path"] != HEALTH_PATH:
            given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
            if not hmac.compare_digest(given, self.expected):
                response = JSONResponse(
                    {"detail": "missing or wrong token: set TROPD_TEACHER_TOKEN to the server's token"}, 401,
                    headers={"www-authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _one_line(err: BaseException, limit: int = 500) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + "..."


def create_app(engine: HFEngine, token: str | None = None, max_batch_rows: int = 64, limits: Limits | None = None):
    """The FastAPI application serving ``engine`` (endpoints: :mod:`tropd.teacher.wire`; no docs or OpenAPI
    routes)."""
    from starlette.requests import ClientDisconnect

    limits = limits or Limits()
    app = FastAPI(title="tropd teacher", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_TokenGuard, token=token)
    batcher = Batcher(engine, max_batch_rows)
    info = engine.info()

    def too_large(size: int, at_least: str = "") -> HTTPException:
        return HTTPException(413, f"body: {at_least}{size} bytes exceed the server's limit of {limits.max_body_mb:g} "
                                  f"MiB (--max-body-mb)")

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limits.max_body_bytes:
            raise too_large(int(declared))  # refused before a byte of it is read
        chunks, size = [], 0

        async def gather() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > limits.max_body_bytes:
                    raise too_large(size, "at least ")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(gather(), limits.read_timeout)
        except asyncio.TimeoutError:
            raise HTTPException(408, f"body: not received within {limits.read_timeout:g} s (--read-timeout)") from None
        except ClientDisconnect:
            raise HTTPException(400, "body: the client went away while sending it") from None
        return b"".join(chunks)

    def unpack(body: bytes, required: tuple[str, ...]) -> tuple[dict, dict]:
        try:
            return wire.unpack(body, required, widen=False)
        except wire.WireError as err:
            raise HTTPException(400, f"body: {_one_line(err)}") from None

    async def run(job: _Job, request: Request):
        """Queue ``job`` and wait for it, at most ``request_timeout`` seconds and while the client is there."""
        loop = asyncio.get_running_loop()
        waiter = asyncio.wrap_future(batcher.submit(job))
        deadline = loop.time() + limits.request_timeout
        try:
            while not waiter.done():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise HTTPException(503, f"not answered within {limits.request_timeout:g} s (--request-timeout): "
                                             f"the server is busy or the request too large")
                await asyncio.wait({waiter}, timeout=min(1.0, remaining))
                if not waiter.done() and await request.is_disconnected():
                    raise HTTPException(503, "the client went away")
        finally:
            if not waiter.done():  # a timeout, a client gone, or the server stopping: drop the work
                job.abandoned = True
                waiter.cancel()
        try:
            return job, waiter.result()
        except ValueError as err:
            raise HTTPException(400, _one_line(err)) from None
        except Exception as err:  # noqa: BLE001 - the client shows it as one line
            raise HTTPException(500, f"{type(err).__name__}: {_one_line(err)}") from None

    @app.get(HEALTH_PATH)
    async def get_health():
        return {"ok": True}

    @app.get("/v1/info")
    async def get_info():
        return {**info, "stats": batcher.stats}

    @app.post("/v1/score")
    async def post_score(request: Request):
        t, meta = unpack(await read_body(request), ("input_ids", "attention_mask", "tokens"))
        payload, rows, key = score_request(engine, limits, t, meta)
        job, scores = await run(_Job("score", key, rows, payload), request)
        return Response(wire.pack_scores(scores), media_type="application/octet-stream",
                        headers={"x-tropd-compute-s": f"{job.compute_s:.6f}"})

    @app.post("/v1/generate")
    async def post_generate(request: Request):
        t, meta = unpack(await read_body(request), ("context_ids", "context_lengths", "budgets", "uniforms"))
        payload, rows, key = generate_request(engine, limits, t, meta)
        job, rows = await run(_Job("generate", key, rows, payload), request)
        return Response(wire.pack_rows(rows), media_type="application/octet-stream",
                        headers={"x-tropd-compute-s": f"{job.compute_s:.6f}"})

    return app


def _guarded_h11(limits: Limits):
    """uvicorn's h11 protocol, with two more bounds on slow clients (uvicorn itself only times out idle
    keep-alive connections): a connection whose client has not sent a request's line and headers within
    ``header_timeout`` seconds (of connecting, or of the first byte of its next request) is closed; and one
    answered before its request body was read (401, 408, 413) is closed once the rest of that body has been read
    and discarded, or after ``read_timeout`` seconds, whichever comes first (the client still reads the answer)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _drain_timer: asyncio.TimerHandle | None = None  # set while discarding the body of an answered request

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and self._drain_timer is None and self.conn.their_state is h11.IDLE:
                self._arm_header_timer()  # the first bytes of a new request
            super().data_received(data)
            if self._drain_timer is not None:
                if self.conn.their_state is not h11.SEND_BODY:  # the discarded body has ended
                    self._close()
            elif self.conn.their_state is not h11.IDLE:
                self._cancel_header_timer()  # its headers are in

        def on_response_complete(self) -> None:
            early = self.conn.their_state is h11.SEND_BODY
            super().on_response_complete()
            if early and not self.transport.is_closing():
                self._drain_timer = self.loop.call_later(limits.read_timeout, self._close)

        def connection_lost(self, exc) -> None:
            self._cancel_header_timer()
            if self._drain_timer is not None:
                self._drain_timer.cancel()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(limits.header_timeout, self._headers_too_slow)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE:
                self._close()

        def _close(self) -> None:
            if not self.transport.is_closing():
                self.transport.close()

    return GuardedH11


def server_config(app, limits: Limits | None = None):
    """The uvicorn settings of the server: keep-alive, header size, header and body timeouts (:class:`Limits`)."""
    import uvicorn

    limits = limits or Limits()
    return uvicorn.Config(app, log_level="warning", timeout_keep_alive=KEEP_ALIVE_S,
                          http=_guarded_h11(limits),
                          h11_max_incomplete_event_size=MAX_HEADER_BYTES)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is reachable from this machine only."""
    if not host:
        return False  # every interface
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return True  # not resolvable: binding fails with its own message
    return all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def check_settings(host: str, port: int, token: str | None, allow_no_token: bool, max_batch_rows: int,
                   chunk_size: int) -> None:
    """Refuse, in one line and before the model loads, settings the server cannot or should not run with."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: a port is 0 to 65535 (0: a free one)")
    for flag, value in (("--max-batch-rows", max_batch_rows), ("--chunk-size", chunk_size)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if not token and not allow_no_token and not is_loopback(host):
        raise ValueError(f"--host {host or '(every interface)'} is reachable from other machines and no token is set: "
                         f"set TROPD_TEACHER_TOKEN (the trainers send the same), or pass --allow-no-token")


ENGINES = ("hf", "vllm")


def load_engine(model: str, engine: str = "hf", device: str = "auto", dtype: str = "float32",
                chunk_size: int = TEACHER_CHUNK, max_model_len: int | None = None, kv_cache_mb: float | None = None):
    """The engine that serves ``model``: :class:`HFEngine` (``device``, ``chunk_size``) or ``vllm``
    (:class:`~tropd.teacher.vllm_engine.VLLMEngine`: ``max_model_len``, ``kv_cache_mb``; vLLM picks its device)."""
    from tropd.models import DTYPES, load_named_model, resolve_device

    if engine not in ENGINES:
        raise ValueError(f"--engine {engine!r}: use {' or '.join(ENGINES)}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: use {', '.join(DTYPES)}")
    if engine == "hf":
        for flag, value in (("--max-model-len", max_model_len), ("--kv-cache-mb", kv_cache_mb)):
            if value is not None:
                raise ValueError(f"{flag} applies to --engine vllm only; drop it or add --engine vllm")
        loaded, tokenizer = load_named_model(model, DTYPES[dtype], resolve_device(device))
        return HFEngine(loaded, tokenizer, model, chunk_size)
    if device != "auto":
        raise ValueError(f"--device {device}: vLLM runs on the device its build supports; drop --device with "
                         f"--engine vllm")
    for flag, value in (("--max-model-len", max_model_len), ("--kv-cache-mb", kv_cache_mb)):
        if value is not None and not value > 0:
            raise ValueError(f"{flag} must be a positive number, got {value}")
    from tropd.teacher.vllm_engine import VLLMEngine

    return VLLMEngine(model, public_name(model), dtype, max_model_len=max_model_len, kv_cache_mb=kv_cache_mb)


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, token: str | None = None, device: str = "auto",
          dtype: str = "float32", chunk_size: int = TEACHER_CHUNK, max_batch_rows: int = 64,
          limits: Limits | None = None, allow_no_token: bool = False, console=print, engine: str = "hf",
          max_model_len: int | None = None, kv_cache_mb: float | None = None) -> None:
    """Load ``model`` on ``engine`` (:func:`load_engine`) and serve it until interrupted. ``port`` 0 picks a free
    port; the bound address is printed as ``tropd serve-teacher: listening on http://HOST:PORT``. A host reachable
    from other machines needs a ``token`` unless ``allow_no_token``."""
    import uvicorn

    limits = limits or Limits()
    token = token or None
    check_settings(host, port, token, allow_no_token, max_batch_rows, chunk_size)
    engine = load_engine(model, engine, device, dtype, chunk_size, max_model_len, kv_cache_mb)
    app = create_app(engine, token, max_batch_rows, limits)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as err:
        sock.close()
        reason = getattr(err, "strerror", None) or str(err)
        raise ValueError(f"cannot listen on {host}:{port}: {reason}; choose another --host or --port") from None
    bound = sock.getsockname()[1]
    guard = ("token required" if token else "no token (loopback use only)" if is_loopback(host)
             else "no token (--allow-no-token: anyone who reaches this address may use it)")
    console(f"tropd serve-teacher: {model} ({engine.vocab_size} logits, {engine.device}, engine "
            f"{engine.info()['engine']}); {guard}")
    console(f"tropd serve-teacher: {limits.describe()}")
    console(f"tropd serve-teacher: listening on http://{host}:{bound}", flush=True)
    uvicorn.Server(server_config(app, limits)).run(sockets=[sock])
