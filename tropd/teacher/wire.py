"""The teacher server's wire format: tensors as a safetensors body, scalars as JSON in its metadata.

A request or response body is ``safetensors.torch.save(tensors, metadata={"json": <JSON text>})``: compact
(raw little-endian tensor bytes behind a small JSON header), typed, and safe to parse (no pickle). Token ids
travel as int32, masks and flags as uint8, log-probs as float32, the sampling uniforms as float64 (they decide
the tokens, so they travel exactly).

Endpoints (:mod:`tropd.teacher.server`):

``GET /v1/health``
    JSON ``{"ok": true}``; the one endpoint that needs no token.
``GET /v1/info``
    JSON: the model (its name, never a local path), its logits vocabulary size, context length, and its
    tokenizer (vocabulary and special ids) for the client's compatibility check.
``POST /v1/score``
    in: ``input_ids`` ``[B, L]``, ``attention_mask`` ``[B, L]``, ``tokens`` ``[B, T]``; JSON
    ``{"response_start": P, "needs": {...}}`` (layout of :mod:`tropd.forward`).
    out: the :class:`~tropd.teacher.scoring.TeacherScores` fields the needs ask for.
``POST /v1/generate``
    in: ``context_ids`` (the contexts concatenated), ``context_lengths`` ``[B]``, ``budgets`` ``[B]``,
    ``uniforms`` ``[B, W]``; JSON: the :class:`~tropd.rollout.SamplingConfig`.
    out: ``tokens`` and ``logprobs`` (concatenated), ``lengths``, ``eos``, ``truncated`` ``[B]``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields

import torch
from safetensors.torch import load, save

from tropd.needs import Needs
from tropd.rollout.batch import RolloutRow
from tropd.rollout.sampling import SamplingConfig
from tropd.teacher.scoring import TeacherScores

_WIRE_DTYPE = {torch.int64: torch.int32, torch.bool: torch.uint8}
SCORE_NEEDS = ("teacher_logprobs", "teacher_topk", "teacher_entropy", "teacher_logits", "top_k")


class WireError(ValueError):
    """A body that is not a valid request or response of this protocol."""


def pack(tensors: dict[str, torch.Tensor], meta: dict | None = None) -> bytes:
    """Encode tensors (int64 as int32, bool as uint8; contiguous CPU copies) and a JSON-able ``meta``."""
    out = {k: v.detach().to("cpu", _WIRE_DTYPE.get(v.dtype, v.dtype)).contiguous() for k, v in tensors.items()}
    return save(out, metadata={"json": json.dumps(meta or {})})


def unpack(body: bytes, required: tuple[str, ...] = (), widen: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Decode a :func:`pack` body; integer tensors come back as int64 (as sent with ``widen=False``: the server
    checks a request's dtypes and sizes before copying it). Raises :class:`WireError`."""
    try:
        tensors = load(body)
        meta = json.loads(_metadata(body).get("json", "{}"))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for bad bytes
        raise WireError(f"the body is not a tropd wire payload ({type(err).__name__}: {err})") from None
    missing = [k for k in required if k not in tensors]
    if missing:
        raise WireError(f"the body lacks tensor(s) {', '.join(missing)}")
    if not isinstance(meta, dict):
        raise WireError(f"the body's JSON metadata must be an object, got {type(meta).__name__}")
    if not widen:
        return tensors, meta
    return {k: v.long() if not v.is_floating_point() and v.dtype != torch.uint8 else v
            for k, v in tensors.items()}, meta


def _metadata(body: bytes) -> dict:
    n = int.from_bytes(body[:8], "little")
    header = json.loads(body[8:8 + n])
    return header.get("__metadata__", {}) or {}


def needs_to_json(needs: Needs) -> dict:
    return {k: v for k, v in asdict(needs).items() if k in SCORE_NEEDS}


def needs_from_json(data: dict) -> Needs:
    unknown = set(data) - set(SCORE_NEEDS)
    if unknown:
        raise WireError(f"unknown needs field(s): {', '.join(sorted(unknown))}")
    return Needs(**data)


def pack_scores(scores: TeacherScores) -> bytes:
    return pack({f.name: getattr(scores, f.name) for f in fields(scores) if getattr(scores, f.name) is not None})


def unpack_scores(body: bytes) -> TeacherScores:
    tensors, _ = unpack(body)
    names = {f.name for f in fields(TeacherScores)}
    return TeacherScores(**{k: v for k, v in tensors.items() if k in names})


def sampling_to_json(cfg: SamplingConfig) -> dict:
    return {"max_new_tokens": cfg.max_new_tokens, "eos_token_ids": list(cfg.eos_token_ids),
            "pad_token_id": cfg.pad_token_id, "temperature": cfg.temperature, "top_p": cfg.top_p}


def pack_rows(rows: list[RolloutRow]) -> bytes:
    lengths = torch.tensor([int(r.tokens.numel()) for r in rows], dtype=torch.long)
    empty = torch.zeros(0)
    return pack({"tokens": torch.cat([r.tokens for r in rows]) if rows else empty.long(),
                 "logprobs": torch.cat([r.behavior_logprobs for r in rows]) if rows else empty,
                 "lengths": lengths,
                 "eos": torch.tensor([r.eos for r in rows], dtype=torch.bool),
                 "truncated": torch.tensor([r.truncated for r in rows], dtype=torch.bool)})


def unpack_rows(body: bytes) -> list[RolloutRow]:
    t, _ = unpack(body, ("tokens", "logprobs", "lengths", "eos", "truncated"))
    lengths = t["lengths"].tolist()
    tokens, logprobs = t["tokens"].split(lengths), t["logprobs"].float().split(lengths)
    return [RolloutRow(tokens=tok.clone(), behavior_logprobs=lp.clone(), eos=bool(e), truncated=bool(tr))
            for tok, lp, e, tr in zip(tokens, logprobs, t["eos"].tolist(), t["truncated"].tolist())]
