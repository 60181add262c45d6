r"""Teacher scores and rows from vLLM's per-position log-prob lists, shared by the two vLLM teachers.

vLLM scores a token sequence through ``prompt_logprobs=K``: for each position ``j ≥ 1`` of the sequence, the
log-probs ``log π_T(v | x_{<j})`` of the K most probable tokens ``v`` (with their vocabulary rank) and of the
actual token ``x_j`` (raw: before temperature or top-p, float32). A rollout row ``prompt ++ response`` is sent
unpadded, and response position ``t`` of a row whose prompt has ``p`` tokens reads entry ``p + t``:

- ``teacher_logprobs[t]`` = the entry of the actual token ``y_t``;
- ``teacher_topk_ids[t]`` / ``teacher_topk_logprobs[t]``: the K largest entries, in decreasing order (equal
  log-probs in rank order, then id order: a tie may list another of the tied ids than the in-process teacher).

Positions past a row's end (padding) hold log-prob 0, ids ``0..K-1`` and log-probs ``−log(K+1)`` (finite,
never read: the loss mask excludes them). vLLM writes a log-prob of −inf as −9999.0; it is kept (``exp`` of it
is 0 in float32).

What these lists cannot give is refused by :func:`unsupported`: the full logits (``gkd``, ``trb``) and the exact
full-vocabulary entropy (``eopd``; a top-k estimate would bias its threshold, so none is made).

Rows: vLLM draws a row with its own per-request random generator, seeded by :func:`row_seed` from the
caller's uniforms of that row (so a run stays a function of its seed, but a row is not the draw the in-process
teacher makes with the same uniforms); :func:`finished_row` turns its tokens and log-probs into a
:class:`~tropd.rollout.batch.RolloutRow`.
"""

from __future__ import annotations

import hashlib
import math

import torch

from tropd.needs import Needs
from tropd.rollout.batch import RolloutRow
from tropd.rollout.sampling import SamplingConfig
from tropd.teacher.scoring import TeacherScores

#: One position's entries: token id -> (log-prob, vocabulary rank from 1).
Entries = dict[int, tuple[float, int]]


def unsupported(needs: Needs, engine: str) -> str | None:
    """Why ``engine`` (a phrase: "a vLLM server") cannot give the scores of ``needs``, else None."""
    if needs.teacher_logits:
        return (f"the objective needs the teacher's full logits (teacher_logits: gkd, trb), which {engine} does not "
                f"return (its prompt_logprobs give the top-k only); use a top-k objective (objective.name: tropd, "
                f"opd, fkl, jsd, ...) or the teacher in process or behind `tropd serve-teacher --engine hf`")
    if needs.teacher_entropy:
        return (f"the objective needs the teacher's full-vocabulary entropy (teacher_entropy: eopd), which {engine} "
                f"does not return (its prompt_logprobs give the top-k only, and a top-k estimate would move eopd's "
                f"threshold); use another objective (objective.name) or the teacher in process or behind `tropd "
                f"serve-teacher --engine hf`")
    return None


def score_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int,
               tokens: torch.Tensor) -> list[tuple[list[int], int, int]]:
    """Each row of a rollout batch (layout of :mod:`tropd.forward`) as ``(sequence, p, n)``: its unpadded prompt
    of ``p`` tokens followed by its ``n`` response tokens. ``tokens`` must be the response part of ``input_ids``
    (the log-prob lists score the sequence's own tokens); a row needs at least one prompt token."""
    if not torch.equal(tokens.cpu(), input_ids[:, response_start:].cpu()):
        raise ValueError("tokens must equal input_ids[:, response_start:]: a vLLM teacher scores the tokens of the "
                         "sequence it is given")
    ids, mask = input_ids.cpu().tolist(), attention_mask.cpu().bool()
    rows = []
    for i, row in enumerate(ids):
        prompt = [t for t, keep in zip(row[:response_start], mask[i, :response_start].tolist()) if keep]
        n = int(mask[i, response_start:].sum())
        if not prompt and n:
            raise ValueError(f"row {i} has no prompt token: the first response token has no context to be scored in")
        rows.append((prompt + row[response_start:response_start + n], len(prompt), n))
    return rows


def topk_of(entries: Entries, k: int) -> list[tuple[int, float]]:
    """The ``k`` largest ``(id, log-prob)`` of one position, decreasing (ties: lower rank, then lower id)."""
    if len(entries) < k:
        raise ValueError(f"vLLM gave {len(entries)} log-probs at a position, fewer than top_k={k}")
    ordered = sorted(entries.items(), key=lambda kv: (-kv[1][0], kv[1][1], kv[0]))
    return [(token, lp) for token, (lp, _) in ordered[:k]]


def scores_from_lists(rows: list[tuple[list[int], int, int]], lists: list[list[Entries | None] | None], steps: int,
                      needs: Needs) -> TeacherScores:
    """:class:`TeacherScores` ``[B, T(, K)]`` (``T = steps``, float32 and int64, CPU) from each row's log-prob list
    (``lists[i][j]``: the entries of sequence position ``j``; None for a row without response tokens)."""
    batch, k = len(rows), needs.top_k if needs.teacher_topk else 0
    logprobs = torch.zeros(batch, steps) if needs.teacher_logprobs else None
    topk_ids = torch.arange(k).expand(batch, steps, k).clone() if k else None
    topk_logprobs = torch.full((batch, steps, k), -math.log(k + 1)) if k else None
    for i, ((sequence, p, n), entries) in enumerate(zip(rows, lists)):
        for t in range(n):
            position = entries[p + t]
            if logprobs is not None:
                logprobs[i, t] = position[sequence[p + t]][0]
            if k:
                best = topk_of(position, k)
                topk_ids[i, t] = torch.tensor([token for token, _ in best])
                topk_logprobs[i, t] = torch.tensor([lp for _, lp in best])
    return TeacherScores(teacher_logprobs=logprobs, teacher_topk_ids=topk_ids, teacher_topk_logprobs=topk_logprobs)


def row_seed(uniforms: torch.Tensor) -> int:
    """A 63-bit seed for vLLM's per-request generator, from the float64 bytes of one row's uniforms."""
    digest = hashlib.blake2b(uniforms.detach().to("cpu", torch.float64).contiguous().numpy().tobytes(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def rows_refusal(cfg: SamplingConfig, processed: bool, engine: str, setting: str) -> str | None:
    """Why ``engine`` cannot write rows under ``cfg`` with exact behaviour log-probs, else None: its sampled-token
    log-probs are those of the sampling distribution (after temperature and top-p) only when ``processed``
    (``--logprobs-mode processed_logprobs``); raw ones (the default) are right only at temperature 1 and top-p 1.
    Greedy rows (temperature 0) need none (the point mass: log-prob 0). ``setting`` names what the caller can
    change about the temperature and top-p."""
    if processed or cfg.greedy or (cfg.temperature == 1.0 and cfg.top_p >= 1.0):
        return None
    return (f"teacher-written rows at temperature {cfg.temperature:g} and top-p {cfg.top_p:g} need their behaviour "
            f"log-probs after temperature and top-p, but {engine} returns raw log-probs: restart it with "
            f"--logprobs-mode processed_logprobs, or set {setting} to 1")


def finished_row(tokens: list[int], logprobs: list[float] | None, budget: int, cfg: SamplingConfig) -> RolloutRow:
    """A written row as :func:`~tropd.rollout.sampling.decode_rows` gives it: ``eos`` when its last token is one of
    ``cfg.eos_token_ids``, ``truncated`` when it reached ``budget`` without; behaviour log-probs 0 when greedy."""
    eos = bool(tokens) and tokens[-1] in cfg.eos_token_ids
    lp = torch.zeros(len(tokens)) if cfg.greedy or logprobs is None else torch.tensor(logprobs, dtype=torch.float32)
    return RolloutRow(tokens=torch.tensor(tokens, dtype=torch.long), behavior_logprobs=lp, eos=eos,
                      truncated=not eos and len(tokens) >= budget)
