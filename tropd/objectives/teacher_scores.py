r"""Teacher scores from the teacher's final hidden states and its LM head: pure tensor math, no model call.

The LM head maps the hidden state ``h`` at each response position to logits ``z ∈ R^V`` **chunk by chunk over
positions**, so at most ``[chunk_size, V]`` float32 values (a few such temporaries) exist at once. Per position
and in float32:

- log-probs ``log π_T(v) = z_v − log Z`` with ``log Z = logsumexp_v z_v``, via ``log_softmax`` (which shifts by
  ``max_v z_v`` first: exact for logits of ±1e4; never softmax-then-log, so tiny probabilities keep their log).
- ``teacher_logprobs``: ``q_t = log π_T(y_t) = z_{y_t} − log Z`` for the sampled token ``y_t``.
- ``teacher_topk_ids`` / ``teacher_topk_logprobs``: the ``k`` largest logits and their ``log π_T`` (not
  renormalised over the k ids, so ``Σ_k exp(·) ≤ 1`` is the top-k mass).
- ``teacher_entropy``: ``H = −Σ_v π_T(v) log π_T(v)`` with ``π_T = exp(log π_T)`` and terms where
  ``π_T(v) = 0`` (underflow, or logits of −inf / −1e4) set to 0 instead of ``0 · (−inf) = NaN``.
- ``teacher_logits``: the full ``[B, T, V]`` float32 logits, only when an objective needs the whole
  distribution (gkd, trb); this is the one full-size tensor.

The teacher's forward that gives ``h`` is :func:`tropd.teacher.scoring.score_with_teacher`'s (tropd's own
runs) or TRL's (:mod:`tropd.integrations.trl`); both end here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from tropd.needs import Needs
from tropd.objectives.head import LMHead


@dataclass
class TeacherScores:
    """Teacher quantities per response position; field names match :class:`tropd.objectives.inputs.TokenInputs`.

    Attributes:
        teacher_logprobs: ``[B,T]`` float32 ``q_t = log π_T(y_t | h_t)``.
        teacher_topk_ids: ``[B,T,K]`` int64 ids of the teacher's k largest logits, in decreasing order.
        teacher_topk_logprobs: ``[B,T,K]`` float32 their log-probs, not renormalised.
        teacher_entropy: ``[B,T]`` float32 full-vocabulary entropy ``H_T(t)`` in nats.
        teacher_logits: ``[B,T,V]`` float32 full logits.

    A field is None when the objective's :class:`Needs` did not ask for it.
    """

    teacher_logprobs: torch.Tensor | None = None
    teacher_topk_ids: torch.Tensor | None = None
    teacher_topk_logprobs: torch.Tensor | None = None
    teacher_entropy: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None

    def as_kwargs(self) -> dict[str, torch.Tensor | None]:
        """Fields as a shallow dict (no tensor copies), for ``TokenInputs(..., **scores.as_kwargs())``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def entropy_from_logprobs(logprobs: torch.Tensor) -> torch.Tensor:
    """``H = −Σ_v p_v log p_v`` over the last dim from log-probs, with ``0 · log 0 = 0`` (no NaN at p = 0)."""
    p = logprobs.exp()
    return -torch.where(p > 0, p * logprobs, torch.zeros_like(logprobs)).sum(-1)


@torch.no_grad()
def scores_from_hidden(hidden: torch.Tensor, head: LMHead, tokens: torch.Tensor, needs: Needs,
                       chunk_size: int) -> TeacherScores:
    """Teacher scores from its final hidden states ``[B, T, H]`` at the response positions and its LM head, chunk
    by chunk over the ``B·T`` positions (the math of the module docstring); ``tokens`` ``[B, T]``."""
    batch, steps = tokens.shape
    device = hidden.device
    want_topk = needs.teacher_topk
    flat_hidden = hidden.reshape(batch * steps, hidden.shape[-1])
    flat_tokens = tokens.to(device).reshape(batch * steps)
    n = flat_hidden.shape[0]
    k = needs.top_k

    logprobs = torch.empty(n, device=device) if needs.teacher_logprobs else None
    entropy = torch.empty(n, device=device) if needs.teacher_entropy else None
    topk_ids = torch.empty(n, k, dtype=torch.long, device=device) if want_topk else None
    topk_logprobs = torch.empty(n, k, device=device) if want_topk else None
    full = None
    for start in range(0, n, chunk_size):
        rows = slice(start, min(start + chunk_size, n))
        logits = head(flat_hidden[rows]).float()
        if full is None and needs.teacher_logits:
            full = torch.empty(n, logits.shape[-1], device=device)
        if full is not None:
            full[rows] = logits
        if want_topk and k > logits.shape[-1]:
            raise ValueError(f"Needs.top_k={k} exceeds the teacher's vocabulary of {logits.shape[-1]}; lower top_k")
        logp = torch.log_softmax(logits, dim=-1)
        del logits
        if logprobs is not None:
            logprobs[rows] = logp.gather(-1, flat_tokens[rows, None]).squeeze(-1)
        if want_topk:
            values, ids = logp.topk(k, dim=-1)
            topk_ids[rows] = ids
            topk_logprobs[rows] = values
        if entropy is not None:
            entropy[rows] = entropy_from_logprobs(logp)

    def shaped(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.reshape(batch, steps, *x.shape[1:])

    return TeacherScores(
        teacher_logprobs=shaped(logprobs),
        teacher_topk_ids=shaped(topk_ids),
        teacher_topk_logprobs=shaped(topk_logprobs),
        teacher_entropy=shaped(entropy),
        teacher_logits=shaped(full),
    )
