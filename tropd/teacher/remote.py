"""A teacher on another process or machine (``model.teacher=http://host:port``), a :class:`~tropd.teacher.Teacher`.

:class:`RemoteTeacher` talks to ``tropd serve-teacher`` (:mod:`tropd.teacher.server`). It scores rollouts
(:meth:`RemoteTeacher.score`) and writes teacher rows for guidance prefixes, GKD and SFT
(:meth:`RemoteTeacher.write_rows`) with the trainer's own random uniforms, so a run gives the same result with
the teacher in process or behind the server. It cannot blend into TRB rollouts (that needs the model here).

Failures: a connection error, a timeout or a 502/503/504 is retried with exponential backoff (0.5 s doubling,
at most 10 s apart) for up to ``retry_s`` seconds, so a server restart mid-run costs a wait, not the step; then
one :class:`TeacherServerError` says what happened. Other HTTP errors (a bad token, a bad request, an error in
the model) are not retried. The token comes from ``TROPD_TEACHER_TOKEN`` (never from the run's config file,
which is written to disk). This transport (:func:`client_for`, :func:`send`) also carries the client of a stock
vLLM server (``model.teacher=vllm+http://host:port``, :mod:`tropd.teacher.openai_server`).
"""

from __future__ import annotations

import os
import time
import warnings

import torch

from tropd.needs import Needs
from tropd.rollout.batch import RolloutBatch, RolloutRow
from tropd.rollout.sampling import SamplingConfig
from tropd.teacher import wire
from tropd.teacher.scoring import TeacherScores

TOKEN_ENV = "TROPD_TEACHER_TOKEN"
_RETRY_STATUS = (502, 503, 504)


class TeacherServerError(ConnectionError):
    """The teacher server could not be reached, did not answer in time, or refused the request."""


#: ``model.teacher`` schemes of a stock vLLM (OpenAI-compatible) server: :mod:`tropd.teacher.openai_server`
VLLM_SCHEMES = ("vllm+http://", "vllm+https://")


def is_url(name: str | None) -> bool:
    """A teacher behind HTTP: ``http(s)://`` (``tropd serve-teacher``) or ``vllm+http(s)://`` (a vLLM server)."""
    return isinstance(name, str) and name.startswith(("http://", "https://", *VLLM_SCHEMES))


def is_vllm_url(name: str | None) -> bool:
    """``vllm+http(s)://host:port``: a stock vLLM server (``vllm serve``), not ``tropd serve-teacher``."""
    return isinstance(name, str) and name.startswith(VLLM_SCHEMES)


class _TokenizerView:
    """What :func:`tropd.models.check_compatible` reads of a tokenizer, from the server's ``/v1/info``."""

    def __init__(self, info: dict) -> None:
        self._vocab, self._len = info["vocab"], int(info["len"])
        self.chat_template = "yes" if info.get("chat_template") else None
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
            setattr(self, name, info.get(name))

    def get_vocab(self) -> dict:
        return self._vocab

    def __len__(self) -> int:
        return self._len


class RemoteTeacher:
    """The client of one teacher server (module docstring). Connects and reads ``/v1/info`` on construction."""

    def __init__(self, url: str, *, timeout_s: float = 300.0, retry_s: float = 120.0, token: str | None = None,
                 client=None) -> None:
        self.url = url.rstrip("/")
        self.timeout_s, self.retry_s = float(timeout_s), float(retry_s)
        self._client = client or client_for(self.url, self.timeout_s, token)
        self.info = self._request("GET", "/v1/info").json()
        self.last_compute_s = float("nan")  # server-side seconds of the last scoring batch (header x-tropd-compute-s)
        self.vocab_size = int(self.info["vocab_size"])
        self.tokenizer = _TokenizerView(self.info["tokenizer"])

    # -- the Teacher protocol ------------------------------------------------------------------------------
    @property
    def context_length(self) -> int | None:
        """The served model's longest sequence, from ``/v1/info`` (None when the server does not say)."""
        value = self.info.get("context_length")
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    def describe(self) -> str:
        i = self.info
        return (f"{i['model']} at {self.url}: {i.get('num_layers')} layers, {i['num_parameters'] / 1e6:.1f}M params "
                f"({i.get('dtype')})")

    def score(self, batch: RolloutBatch, needs: Needs) -> TeacherScores:
        want = needs.teacher_logprobs or needs.teacher_topk or needs.teacher_entropy or needs.teacher_logits
        if not want:
            return TeacherScores()
        body = wire.pack({"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                          "tokens": batch.tokens},
                         {"response_start": int(batch.response_start), "needs": wire.needs_to_json(needs)})
        response = self._request("POST", "/v1/score", body)
        self.last_compute_s = float(response.headers.get("x-tropd-compute-s", "nan"))
        scores = wire.unpack_scores(response.content)
        device = batch.input_ids.device
        return TeacherScores(**{k: None if v is None else (v.to(device) if not v.is_floating_point()
                                                            else v.to(device, torch.float32))
                                for k, v in scores.as_kwargs().items()})

    def write_rows(self, contexts: list[list[int]], cfg: SamplingConfig, budgets: torch.Tensor,
                   uniforms: torch.Tensor) -> list[RolloutRow]:
        lengths = torch.tensor([len(c) for c in contexts], dtype=torch.long)
        flat = torch.tensor([t for c in contexts for t in c], dtype=torch.long)
        body = wire.pack({"context_ids": flat, "context_lengths": lengths, "budgets": budgets.long().cpu(),
                          "uniforms": uniforms.double().cpu()}, {"sampling": wire.sampling_to_json(cfg)})
        return wire.unpack_rows(self._request("POST", "/v1/generate", body).content)

    def model_for_blending(self):
        raise ValueError("TRB blends the teacher's next-token distribution into every decoded token, so it needs "
                         "the teacher in this process, not behind a teacher server")

    def check_needs(self, needs: Needs) -> None:
        """Refuse (ValueError, one line) scores the server's engine says it cannot give (``/v1/info``
        ``supports``; a server without that field gives everything)."""
        supports = self.info.get("supports") or {}
        for name in ("teacher_logits", "teacher_entropy"):
            if getattr(needs, name) and supports.get(name) is False:
                raise ValueError(f"the objective needs {name}, which the teacher server {self.url} does not compute "
                                 f"(engine {self.info.get('engine')!r}); choose a top-k objective (objective.name) "
                                 f"or start it with `tropd serve-teacher --engine hf`")

    # -- transport -----------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: bytes | None = None):
        return send(self._client, self.url, method, path, timeout_s=self.timeout_s, retry_s=self.retry_s,
                    content=body, server="`tropd serve-teacher`")


def client_for(url: str, timeout_s: float, token: str | None):
    """An ``httpx.Client`` for ``url`` sending ``Authorization: Bearer <token>`` (default: ``TROPD_TEACHER_TOKEN``)
    when there is a token, with the answer timeout ``timeout_s`` (connect: at most 10 s)."""
    import httpx

    token = token if token is not None else os.environ.get(TOKEN_ENV)
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url, headers=headers,
                        timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)))


def send(client, url: str, method: str, path: str, *, timeout_s: float, retry_s: float, content: bytes | None = None,
         json=None, server: str = "the teacher server"):
    """``client.request(method, path)``: a connection error, a timeout or a 502/503/504 retried with backoff
    (0.5 s doubling, at most 10 s apart) for up to ``retry_s`` seconds; then, or on any other non-200 answer, one
    :class:`TeacherServerError` line (module docstring). ``server`` names what should be running at ``url``."""
    import httpx

    deadline = time.monotonic() + retry_s
    delay, tries, last = 0.5, 0, ""
    extra = {"json": json} if json is not None else {}
    headers = {"content-type": "application/octet-stream"} if content is not None else None
    while True:
        tries += 1
        try:
            response = client.request(method, path, content=content, headers=headers, **extra)
            if response.status_code not in _RETRY_STATUS:
                break
            last = f"HTTP {response.status_code}: {_detail(response)}"
        except httpx.TimeoutException:
            last = f"no answer within {timeout_s:g} s (model.teacher_timeout)"
        except httpx.TransportError as err:
            last = f"not reachable ({type(err).__name__}: {err})"
        if time.monotonic() + delay > deadline:
            raise TeacherServerError(
                f"teacher server {url}{path}: {last}; gave up after {tries} tries in {retry_s:g} s "
                f"(model.teacher_retry_s). Is {server} running there?")
        if tries == 1:
            warnings.warn(f"teacher server {url}{path}: {last}; retrying for up to {retry_s:g} s",
                          RuntimeWarning, stacklevel=3)
        time.sleep(delay)
        delay = min(delay * 2, 10.0)
    if response.status_code != 200:
        raise TeacherServerError(f"teacher server {url}{path}: HTTP {response.status_code}: {_detail(response)}"
                                 + _hint(response.status_code, path))
    return response


def _hint(status: int, path: str) -> str:
    """What to do about an error answer that a wrong token or the wrong kind of server explains."""
    if status == 401:
        return f" (set {TOKEN_ENV} to the server's token: its own {TOKEN_ENV}, or vllm serve's --api-key)"
    if status == 404 and path in ("/v1/info", "/v1/models"):  # the first endpoint a client reads
        return (" (model.teacher names a tropd serve-teacher server as http://host:port and a stock vLLM server "
                "as vllm+http://host:port: is it the other kind?)")
    return ""


def _detail(response) -> str:
    """The server's one-line reason for an error answer (FastAPI's ``detail``, an OpenAI-style
    ``error.message``), else the start of its body."""
    try:
        data = response.json()
        error = data.get("error")
        detail = data.get("detail", error.get("message", response.text) if isinstance(error, dict) else response.text)
    except (ValueError, AttributeError):
        detail = response.text
    return " ".join(str(detail).split())[:500]
