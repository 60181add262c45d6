"""A stock vLLM server as the teacher (``model.teacher=vllm+http://host:port``), a :class:`~tropd.teacher.Teacher`.

:class:`VLLMServerTeacher` needs no tropd code where the teacher runs: any ``vllm serve MODEL`` deployment
(OpenAI-compatible API) will do. It talks to two of its endpoints:

- ``POST /v1/completions`` with token-id prompts. Scores: each row's unpadded ``prompt ++ response`` with
  ``max_tokens=1`` and vLLM's ``prompt_logprobs=K`` (K = the objective's top-k, 0 when only the sampled token's
  log-prob is read), turned into :class:`~tropd.teacher.scoring.TeacherScores` by
  :mod:`tropd.teacher.logprob_lists`; rows are sent in groups of at most :data:`MAX_ENTRIES` log-prob entries,
  up to :data:`PARALLEL` requests at once. Written rows (guidance prefixes, SFT rows, the held-out teacher answers):
  one request per row (a seed per request), every sampling setting given explicitly so that the model's
  ``generation_config.json`` defaults (top-k, repetition penalty, ...) do not apply, stopping at the run's EOS ids
  only (``ignore_eos``, ``stop_token_ids``).
- ``GET /v1/models``: the served model's name and ``max_model_len``.

Checked when the teacher is built (before training), each refusal one line: ``prompt_logprobs=K`` is allowed
(``vllm serve --max-logprobs K``); which log-probs the server returns (a probe at temperature 0.5 tells raw
log-probs, the default, from ``--logprobs-mode processed_logprobs``; logits modes are refused): rows at a
temperature other than 1 or top-p below 1 need processed ones (:func:`~tropd.teacher.logprob_lists.rows_refusal`);
and, by :meth:`VLLMServerTeacher.check_student`, that the server tokenizes as the student does and has the
student's logits vocabulary (``/tokenize`` and out-of-vocabulary probes; a server started with
``--skip-tokenizer-init`` cannot be asked, and a warning says the tokenizer is assumed to match). Full logits and
the exact entropy are refused by the run's config check (:func:`~tropd.teacher.logprob_lists.unsupported`).

The token (``--api-key`` on the server) comes from ``TROPD_TEACHER_TOKEN``; timeouts and retries are those of
:class:`~tropd.teacher.RemoteTeacher` (``model.teacher_timeout``, ``model.teacher_retry_s``).
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

from tropd.needs import Needs
from tropd.rollout.batch import RolloutBatch, RolloutRow
from tropd.rollout.sampling import SamplingConfig
from tropd.teacher import logprob_lists
from tropd.teacher.remote import TeacherServerError, VLLM_SCHEMES, client_for, send
from tropd.teacher.scoring import TeacherScores

#: Most log-prob entries (positions x (K + 1)) asked of the server in one scoring request.
MAX_ENTRIES = 1 << 17
#: Requests in flight at once (the server batches them).
PARALLEL = 8
#: What a probe sends: token ids every vocabulary has.
_PROBE = [0, 1, 2]
ENGINE = "a stock vLLM server"


def http_url(url: str) -> str:
    """``vllm+http://host:port`` -> ``http://host:port``."""
    for scheme in VLLM_SCHEMES:
        if url.startswith(scheme):
            return url[len("vllm+"):].rstrip("/")
    raise ValueError(f"model.teacher={url!r}: a vLLM server is given as vllm+http://host:port")


def _entries(position: dict | None) -> logprob_lists.Entries | None:
    """One position of the JSON ``prompt_logprobs``: ``{"id": {"logprob", "rank", ...}}`` as ids to pairs."""
    if position is None:
        return None
    return {int(token): (float(e["logprob"]), int(e.get("rank") or 0)) for token, e in position.items()}


class VLLMServerTeacher:
    """The client of one stock vLLM server (module docstring). Reads ``/v1/models`` and probes the server on
    construction; ``rows_at`` (temperature, top-p) are the settings the run will ask rows at, refused there
    already when the server's log-probs cannot be their behaviour log-probs."""

    def __init__(self, url: str, *, timeout_s: float = 300.0, retry_s: float = 120.0, token: str | None = None,
                 top_k: int = 0, rows_at: tuple[float, float] | None = None, client=None) -> None:
        self.url = url.rstrip("/")
        self.timeout_s, self.retry_s = float(timeout_s), float(retry_s)
        self._client = client or client_for(http_url(self.url), self.timeout_s, token)
        models = self._request("GET", "/v1/models").json().get("data") or []
        if not models:
            raise TeacherServerError(f"teacher server {self.url}/v1/models lists no model")
        self.model = models[0]["id"]
        length = models[0].get("max_model_len")
        #: one token is generated after every scored sequence, so sequences are one shorter than the server's
        self._max_model_len = length if isinstance(length, int) and length > 1 else None
        self.processed = self._probe(max(int(top_k), 1))
        if rows_at is not None:
            why = logprob_lists.rows_refusal(SamplingConfig(max_new_tokens=1, eos_token_ids=(), pad_token_id=0,
                                                            temperature=rows_at[0], top_p=rows_at[1]),
                                             self.processed, f"{ENGINE} at {self.url}",
                                             "rollout.temperature and rollout.top_p")
            if why:
                raise ValueError(why)

    # -- the Teacher protocol ------------------------------------------------------------------------------
    @property
    def context_length(self) -> int | None:
        """``max_model_len - 1`` from ``/v1/models`` (a scored sequence is followed by one generated token)."""
        return None if self._max_model_len is None else self._max_model_len - 1

    def describe(self) -> str:
        mode = "processed" if self.processed else "raw"
        return f"{self.model} at {self.url} (vLLM server, max_model_len {self._max_model_len}, {mode} log-probs)"

    def score(self, batch: RolloutBatch, needs: Needs) -> TeacherScores:
        if not (needs.teacher_logprobs or needs.teacher_topk or needs.teacher_entropy or needs.teacher_logits):
            return TeacherScores()
        why = logprob_lists.unsupported(needs, ENGINE)
        if why:
            raise ValueError(why)
        rows = logprob_lists.score_rows(batch.input_ids, batch.attention_mask, batch.response_start, batch.tokens)
        k = needs.top_k if needs.teacher_topk else 0
        wanted = [i for i, (_, _, n) in enumerate(rows) if n]
        groups, size = [[]], 0
        for i in wanted:
            cost = len(rows[i][0]) * (k + 1)
            if groups[-1] and size + cost > MAX_ENTRIES:
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += cost
        lists: list = [None] * len(rows)

        def ask(group: list[int]) -> None:
            answer = self._completions({"prompt": [rows[i][0] for i in group], "max_tokens": 1,
                                        "prompt_logprobs": k, "temperature": 0.0})
            for i, choice in zip(group, sorted(answer["choices"], key=lambda c: c["index"])):
                lists[i] = [_entries(position) for position in choice["prompt_logprobs"]]

        self._parallel(ask, [g for g in groups if g])
        scores = logprob_lists.scores_from_lists(rows, lists, batch.tokens.shape[1], needs)
        device = batch.input_ids.device
        return TeacherScores(**{name: None if v is None else v.to(device) for name, v in scores.as_kwargs().items()})

    def write_rows(self, contexts: list[list[int]], cfg: SamplingConfig, budgets: torch.Tensor,
                   uniforms: torch.Tensor) -> list[RolloutRow]:
        why = logprob_lists.rows_refusal(cfg, self.processed, f"{ENGINE} at {self.url}", "the temperature and top-p")
        if why:
            raise ValueError(why)
        caps = [int(b) for b in budgets.tolist()]
        if self.context_length is not None:
            caps = [max(0, min(b, self.context_length + 1 - len(c))) for b, c in zip(caps, contexts)]
        rows: list = [None] * len(contexts)

        def ask(i: int) -> None:
            if caps[i] == 0:
                rows[i] = logprob_lists.finished_row([], None, 0, cfg)
                return
            answer = self._completions({
                "prompt": contexts[i], "max_tokens": caps[i], "temperature": cfg.temperature, "top_p": cfg.top_p,
                "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
                "frequency_penalty": 0.0, "seed": logprob_lists.row_seed(uniforms[i, :caps[i]]),
                "logprobs": 0, "return_token_ids": True, "return_tokens_as_token_ids": True,
                "ignore_eos": True, "stop_token_ids": list(cfg.eos_token_ids)})
            choice = answer["choices"][0]
            logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
            rows[i] = logprob_lists.finished_row(list(choice["token_ids"]), logprobs, caps[i], cfg)

        self._parallel(ask, list(range(len(contexts))))
        return rows

    def model_for_blending(self):
        raise ValueError("TRB blends the teacher's next-token distribution into every decoded token, so it needs "
                         "the teacher in this process, not behind a vLLM server")

    # -- start-up checks -----------------------------------------------------------------------------------
    def _probe(self, k: int) -> bool:
        """Whether the server returns processed log-probs (after temperature and top-p); refuses a server that
        does not allow ``prompt_logprobs=k`` or returns logits."""
        try:
            scored = self._completions({"prompt": _PROBE + [0], "max_tokens": 1, "prompt_logprobs": k,
                                        "temperature": 0.0})
        except TeacherServerError as err:
            if "HTTP 400" in str(err) and "logprobs" in str(err):
                raise ValueError(f"{ENGINE} at {self.url} refuses prompt_logprobs={k} (the objective's top_k): start "
                                 f"it with `vllm serve ... --max-logprobs {k}` or lower objective.kwargs.top_k "
                                 f"({err})") from None
            raise
        raw = _entries(scored["choices"][0]["prompt_logprobs"][len(_PROBE)])
        if max(lp for lp, _ in raw.values()) > 1e-4:
            raise ValueError(f"{ENGINE} at {self.url} returns logits, not log-probs (--logprobs-mode raw_logits or "
                             f"processed_logits): restart it with --logprobs-mode raw_logprobs or processed_logprobs")
        sampled = self._completions({"prompt": _PROBE, "max_tokens": 1, "temperature": 0.5, "top_p": 1.0,
                                     "top_k": -1, "min_p": 0.0, "seed": 0, "logprobs": 1, "ignore_eos": True,
                                     "return_tokens_as_token_ids": True})
        top = max(sampled["choices"][0]["logprobs"]["top_logprobs"][0].values())
        best = max(lp for lp, _ in raw.values())
        return abs(top - best) > 1e-4 * max(1.0, abs(best))  # raw: the same top log-prob at any temperature

    def check_student(self, tokenizer, vocab_size: int, top_k: int = 0) -> None:
        """Refuse (ValueError, one line) a student whose tokenizer or logits vocabulary ``vocab_size`` differs from
        the server's, as far as the server can say: its tokenization of a text made of about 256 token ids spread over
        the vocabulary and the special tokens (``/tokenize``), and which ids it takes (``vocab_size - 1`` yes,
        ``vocab_size`` no)."""
        if top_k > vocab_size:
            raise ValueError(f"top_k={top_k} exceeds the vocabulary size {vocab_size}; lower objective.kwargs.top_k")
        ids = sorted(set(range(0, len(tokenizer), max(1, len(tokenizer) // 256))) | set(tokenizer.all_special_ids))
        text = tokenizer.decode(ids)
        try:
            answer = send(self._client, self.url, "POST", "/tokenize", timeout_s=self.timeout_s, retry_s=self.retry_s,
                          json={"model": self.model, "prompt": text, "add_special_tokens": False},
                          server=ENGINE).json()
        except TeacherServerError as err:
            warnings.warn(f"{self.url}/tokenize cannot tokenize ({err}): the server's tokenizer is assumed to be the "
                          f"student's, with {vocab_size} logits", RuntimeWarning, stacklevel=2)
            return
        mine = tokenizer(text, add_special_tokens=False)["input_ids"]
        if answer.get("tokens") != mine:
            raise ValueError(f"student and teacher tokenizers differ: the vLLM server at {self.url} tokenizes a probe "
                             f"text into {len(answer.get('tokens') or [])} tokens, the student into {len(mine)}; use a "
                             f"teacher and student with the same tokenizer")
        for token, accepted in ((vocab_size - 1, True), (vocab_size, False)):
            try:
                self._completions({"prompt": [token], "max_tokens": 1, "temperature": 0.0})
                took = True
            except TeacherServerError as err:
                if "out of vocabulary" not in str(err):
                    raise
                took = False
            if took != accepted:
                raise ValueError(f"student logits have {vocab_size} entries, but the vLLM server at {self.url} "
                                 f"{'takes' if took else 'refuses'} token id {token}: the logits vocabulary "
                                 f"dimension must match (resize one model's embeddings)")

    # -- transport -----------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict | None = None):
        return send(self._client, self.url, method, path, timeout_s=self.timeout_s, retry_s=self.retry_s,
                    json=body, server=f"`vllm serve` (the OpenAI-compatible server; {self.url} is {ENGINE})")

    def _completions(self, body: dict) -> dict:
        return self._request("POST", "/v1/completions", {"model": self.model, **body}).json()

    @staticmethod
    def _parallel(fn, items: list) -> None:
        if len(items) <= 1:
            for item in items:
                fn(item)
            return
        with ThreadPoolExecutor(min(PARALLEL, len(items))) as pool:
            for future in [pool.submit(fn, item) for item in items]:
                future.result()

