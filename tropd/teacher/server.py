"""``tropd serve-teacher``: a frozen teacher behind HTTP, for trainers on other processes or machines.

The server loads one model (an HF folder, a .gguf file or ``smollm2``) and answers the endpoints of
:mod:`tropd.teacher.wire`: scores of response positions (sampled-token log-prob, top-k, entropy, full logits:
only what the request's ``needs`` ask for) and written rows (guidance prefixes, GKD and SFT teacher rows),
drawn with the caller's random uniforms so that a remote teacher writes exactly what an in-process one would.

Requests are batched: a worker thread takes the oldest request and every waiting request of the same kind and
settings (up to ``max_batch_rows`` rows), lays them out as one batch (prompts left-padded to the longest,
responses right-padded), runs the model once, and splits the results. Clients of a data-parallel run (one per
process) thus share teacher forwards. With ``token`` set, every request must carry ``Authorization: Bearer
<token>``.

Engine: HF transformers on CPU or GPU (:class:`HFEngine`). A vLLM engine is not included yet.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import socket
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from fastapi import FastAPI, HTTPException, Request  # the `server` extra; FastAPI resolves these names globally
from fastapi.responses import Response

from tropd.needs import Needs
from tropd.rollout.batch import left_pad
from tropd.rollout.sampling import SamplingConfig, decode_rows
from tropd.teacher import wire
from tropd.teacher.scoring import TEACHER_CHUNK, TeacherScores, score_with_teacher

logger = logging.getLogger(__name__)


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

    def info(self) -> dict:
        tok, config = self.tokenizer, self.model.config.get_text_config()
        return {"model": self.name, "vocab_size": self.vocab_size,
                "context_length": self.context_length,
                "num_layers": getattr(config, "num_hidden_layers", None),
                "num_parameters": sum(p.numel() for p in self.model.parameters()),
                "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
                "tokenizer": {"vocab": tok.get_vocab(), "len": len(tok),
                              "chat_template": bool(getattr(tok, "chat_template", None)),
                              **{name: getattr(tok, name, None) for name in
                                 ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")}}}

    def score(self, input_ids, attention_mask, response_start: int, tokens, needs: Needs) -> TeacherScores:
        return score_with_teacher(self.model, input_ids.to(self.device), attention_mask.to(self.device),
                                  response_start, tokens.to(self.device), needs, chunk_size=self.chunk_size)

    def write(self, contexts: list[list[int]], cfg: SamplingConfig, budgets: torch.Tensor, uniforms: torch.Tensor):
        return decode_rows(self.model, contexts, cfg, budgets, uniforms)


# -- batching ----------------------------------------------------------------------------------------------
@dataclass
class _Job:
    kind: str  # "score" | "generate"
    key: str  # jobs with the same key can share one batch
    rows: int
    payload: dict
    future: Future = field(default_factory=Future)
    compute_s: float = 0.0  # seconds of the batch this job ran in


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
    """One worker thread that runs queued jobs, merging jobs of one kind and key (module docstring)."""

    def __init__(self, engine: HFEngine, max_batch_rows: int = 64, wait_s: float = 0.002) -> None:
        self.engine, self.max_batch_rows, self.wait_s = engine, max_batch_rows, wait_s
        self._jobs: collections.deque[_Job] = collections.deque()
        self._ready = threading.Condition()
        self.stats = {"requests": 0, "batches": 0, "rows": 0}
        threading.Thread(target=self._loop, name="tropd-teacher-batcher", daemon=True).start()

    def submit(self, job: _Job) -> Future:
        with self._ready:
            self._jobs.append(job)
            self._ready.notify()
        return job.future

    def _take(self) -> list[_Job]:
        with self._ready:
            while not self._jobs:
                self._ready.wait()
            deadline = time.monotonic() + self.wait_s
            while time.monotonic() < deadline:  # a moment for the other clients' requests of this step
                self._ready.wait(deadline - time.monotonic())
            first = self._jobs.popleft()
            group, rows, rest = [first], first.rows, collections.deque()
            while self._jobs:
                job = self._jobs.popleft()
                if job.kind == first.kind and job.key == first.key and rows + job.rows <= self.max_batch_rows:
                    group.append(job)
                    rows += job.rows
                else:
                    rest.append(job)
            self._jobs.extendleft(reversed(rest))
            return group

    def _loop(self) -> None:
        while True:
            group = self._take()
            try:
                merge = _merge_scores if group[0].kind == "score" else _merge_generate
                start = time.perf_counter()
                with torch.no_grad():
                    results = merge(self.engine, group)
                for job, result in zip(group, results):
                    job.compute_s = time.perf_counter() - start
                    job.future.set_result(result)
            except Exception as err:  # noqa: BLE001 - every waiting request gets the error
                logger.exception("teacher batch failed")
                for job in group:
                    if not job.future.done():
                        job.future.set_exception(err)
            self.stats["requests"] += len(group)
            self.stats["batches"] += 1
            self.stats["rows"] += sum(job.rows for job in group)


# -- HTTP --------------------------------------------------------------------------------------------------
def create_app(engine: HFEngine, token: str | None = None, max_batch_rows: int = 64):
    """The FastAPI application serving ``engine`` (endpoints: :mod:`tropd.teacher.wire`)."""
    app = FastAPI(title="tropd teacher", docs_url=None, redoc_url=None)
    batcher = Batcher(engine, max_batch_rows)
    info = engine.info()

    def authorize(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "missing or wrong token: set TROPD_TEACHER_TOKEN to the server's token")

    async def run(job: _Job):
        try:
            return job, await asyncio.wrap_future(batcher.submit(job))
        except ValueError as err:
            raise HTTPException(400, str(err)) from None
        except Exception as err:  # noqa: BLE001 - the client shows it as one line
            raise HTTPException(500, f"{type(err).__name__}: {err}") from None

    @app.get("/v1/info")
    async def get_info(request: Request):
        authorize(request)
        return {**info, "stats": batcher.stats}

    @app.post("/v1/score")
    async def post_score(request: Request):
        authorize(request)
        try:
            t, meta = wire.unpack(await request.body(), ("input_ids", "attention_mask", "tokens"))
            needs = wire.needs_from_json(meta.get("needs", {}))
            payload = {**t, "response_start": int(meta["response_start"]), "needs": needs}
        except (ValueError, KeyError, TypeError) as err:
            raise HTTPException(400, f"bad score request: {err}") from None
        key = repr(wire.needs_to_json(needs))
        job, scores = await run(_Job("score", key, int(t["input_ids"].shape[0]), payload))
        return Response(wire.pack_scores(scores), media_type="application/octet-stream",
                        headers={"x-tropd-compute-s": f"{job.compute_s:.6f}"})

    @app.post("/v1/generate")
    async def post_generate(request: Request):
        authorize(request)
        try:
            t, meta = wire.unpack(await request.body(), ("context_ids", "context_lengths", "budgets", "uniforms"))
            cfg = SamplingConfig(**{**meta["sampling"], "eos_token_ids": tuple(meta["sampling"]["eos_token_ids"])})
            contexts = [c.tolist() for c in t["context_ids"].split(t["context_lengths"].tolist())]
            payload = {"contexts": contexts, "budgets": t["budgets"], "uniforms": t["uniforms"].double(), "cfg": cfg}
        except (ValueError, KeyError, TypeError) as err:
            raise HTTPException(400, f"bad generate request: {err}") from None
        job, rows = await run(_Job("generate", repr(meta["sampling"]), len(contexts), payload))
        return Response(wire.pack_rows(rows), media_type="application/octet-stream",
                        headers={"x-tropd-compute-s": f"{job.compute_s:.6f}"})

    return app


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, token: str | None = None, device: str = "auto",
          dtype: str = "float32", chunk_size: int = TEACHER_CHUNK, max_batch_rows: int = 64, console=print) -> None:
    """Load ``model`` and serve it until interrupted. ``port`` 0 picks a free port; the bound address is printed
    as ``tropd serve-teacher: listening on http://HOST:PORT``."""
    import uvicorn

    from tropd.models import DTYPES, load_named_model, resolve_device

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: use {', '.join(DTYPES)}")
    loaded, tokenizer = load_named_model(model, DTYPES[dtype], resolve_device(device))
    engine = HFEngine(loaded, tokenizer, model, chunk_size)
    app = create_app(engine, token, max_batch_rows)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror}; choose another --port") from None
    bound = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_keep_alive=30)
    console(f"tropd serve-teacher: {model} ({engine.vocab_size} logits, {engine.device}); "
            f"{'token required' if token else 'no token (loopback use only)'}")
    console(f"tropd serve-teacher: listening on http://{host}:{bound}", flush=True)
    uvicorn.Server(config).run(sockets=[sock])
