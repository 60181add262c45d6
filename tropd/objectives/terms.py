"""Token-level terms (docs/method.md §2) and the row-wise evaluation of student log-softmax.

Every term is computed in float32 (float64 when the inputs are float64) from log-softmax, never from
softmax-then-log. Row functions take the student logits of ``n`` positions (``[n, V]``) and return ``[n]``
tensors; :func:`rowwise` evaluates them either over the whole batch at once or chunk by chunk over loss-bearing
positions with activation checkpointing (peak memory of one chunk), with identical values and gradients.
:func:`log_softmax_gather` gives the log-probs an objective reads without a full-size log-softmax tensor.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from tropd.objectives.head import FUSED_CHUNK

#: Upper bound on ``sg(s_t) − b_t`` inside the importance ratio, a guard against overflow when the behaviour
#: policy gave a token far less mass than the current student (never reached on-policy, where it is 0).
MAX_LOG_RATIO = 20.0
#: Elements per row block of :func:`log_softmax_gather`: its ``[rows, V]`` temporaries stay ~16 MB (cache-sized
#: on CPU; few enough blocks on GPU).
BLOCK_ELEMENTS = 1 << 22


def row_block(vocab: int) -> int:
    """Rows per block of :func:`log_softmax_gather` for a vocabulary of ``vocab``."""
    return max(1, BLOCK_ELEMENTS // max(vocab, 1))

RowFn = Callable[[torch.Tensor, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else (bf16, fp16, fp32) is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """``log π(·)`` over the last dimension, in the compute dtype."""
    return torch.log_softmax(logits.to(compute_dtype(logits)), dim=-1)


class _LogSoftmaxGather(torch.autograd.Function):
    """``(log_softmax(z)[ids], H(softmax(z)))`` per row without a ``[n, V]`` log-softmax tensor.

    Forward, in blocks of :func:`row_block` rows with ``m = max_v z``, ``e = exp(z − m)``, ``S = Σ_v e``::

        lse = m + log S,     picked = z[ids] − lse,     H = log S − Σ_v e (z − m) / S      (0 · (−inf) = 0)

    Backward (``g`` = upstream gradient of ``picked``; the entropy carries none)::

        ∂L/∂z = scatter_add(ids, g) − (Σ_k g_k) · exp(z − lse)

    so the only saved tensors are the input itself and ``lse`` ``[n]``; a row whose logits are all ``−inf`` or hold
    NaN/+inf gets a non-finite ``lse`` (the input checks reject such rows before a loss is formed).
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = compute_dtype(z)
        lse, ent = [], []
        rows = row_block(z.shape[-1])
        for blk in z.detach().split(rows):
            blk = blk.to(dtype)
            m = blk.amax(-1, keepdim=True)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            d = blk - m
            e = d.exp()
            total = e.sum(-1)
            log_total = total.log()
            lse.append(m[:, 0] + log_total)
            ent.append(log_total - torch.nansum(e.mul_(d), dim=-1) / total)
        lse_t = torch.cat(lse) if lse else z.new_zeros(0, dtype=dtype)
        ent_t = torch.cat(ent) if ent else z.new_zeros(0, dtype=dtype)
        picked = z.detach().gather(-1, ids).to(dtype) - lse_t[:, None]
        ctx.save_for_backward(z, ids, lse_t)
        ctx.mark_non_differentiable(ent_t)
        return picked, ent_t

    @staticmethod
    def backward(ctx, g: torch.Tensor, _g_ent: torch.Tensor) -> tuple[torch.Tensor, None]:
        z, ids, lse = ctx.saved_tensors
        g = g.to(lse.dtype)
        weight = g.sum(-1, keepdim=True).neg_()
        grad = torch.empty_like(z, dtype=lse.dtype)
        rows = row_block(z.shape[-1])
        for zb, lb, wb, out in zip(z.split(rows), lse.split(rows), weight.split(rows), grad.split(rows)):
            torch.sub(zb, lb[:, None], out=out).exp_().mul_(wb)
        return grad.scatter_add_(-1, ids, g).to(z.dtype), None


def log_softmax_gather(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``log π(ids)`` ``[n, K]`` (differentiable) and the entropy ``H = −Σ_v π(v) log π(v)`` ``[n]`` (no gradient)
    of ``π = softmax(logits)`` for ``logits`` ``[n, V]``, in the compute dtype, without forming the ``[n, V]``
    log-softmax (see :class:`_LogSoftmaxGather`; equal to ``log_softmax(logits).gather(-1, ids)``)."""
    return _LogSoftmaxGather.apply(logits, ids)


def importance_ratio(s: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``ρ = exp(s − b)``: value ``exp(sg(s) − b)`` (1 on-policy), gradient ``ρ ∇s``."""
    log_ratio = (s.detach() - b).clamp(max=MAX_LOG_RATIO)
    return torch.exp(s - s.detach()) * torch.exp(log_ratio)


def pg_k1(reward: torch.Tensor, s: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``pg_k1(r) = −sg(r)·ρ``: REINFORCE with reward ``r``; gradient ``−r ρ ∇s`` (``−r ∇s`` on-policy)."""
    return -reward.detach() * importance_ratio(s, b)


def nll(s: torch.Tensor) -> torch.Tensor:
    """``−s_t``."""
    return -s


def fkl_topk(student_topk: torch.Tensor, topk_logprobs: torch.Tensor) -> torch.Tensor:
    """``Σ_{v∈V_t} π_T(v)(log π_T(v) − log π_S(v))`` with unrenormalised teacher top-k probabilities.

    ``student_topk`` is the student's log-softmax at the teacher's top-k ids ``[..., K]``. Gradient w.r.t. the
    student logits is ``m·π_S − π_T·1[V_t]`` (``m`` = teacher top-k mass): every entry lies in [−1, 1].
    Zero-probability teacher entries contribute exactly 0.
    """
    p_t = topk_logprobs.to(student_topk.dtype).exp()
    lq = torch.where(p_t > 0, topk_logprobs.to(student_topk.dtype), torch.zeros_like(p_t))
    return (p_t * (lq - student_topk)).sum(-1)


def _kl(lp_p: torch.Tensor, lp_q: torch.Tensor) -> torch.Tensor:
    """``KL(p‖q) = Σ p (log p − log q)`` from log-probabilities, 0·log 0 = 0."""
    p = lp_p.exp()
    return torch.where(p > 0, p * (lp_p - lp_q), torch.zeros_like(p)).sum(-1)


def rkl_full(lp_s: torch.Tensor, lp_t: torch.Tensor) -> torch.Tensor:
    """Exact reverse KL ``Σ_v π_S (log π_S − log π_T)``."""
    return _kl(lp_s, lp_t)


def fkl_full(lp_s: torch.Tensor, lp_t: torch.Tensor) -> torch.Tensor:
    """Exact forward KL ``Σ_v π_T (log π_T − log π_S)``."""
    return _kl(lp_t, lp_s)


def generalized_jsd(lp_s: torch.Tensor, lp_t: torch.Tensor, beta: float) -> torch.Tensor:
    """GKD's ``JSD_β(π_T‖π_S) = β KL(π_T‖M) + (1−β) KL(π_S‖M)``, ``M = β π_T + (1−β) π_S``.

    The endpoints are taken as their named limits exactly: β = 0 is forward ``KL(π_T‖π_S)``, β = 1 is reverse
    ``KL(π_S‖π_T)`` (the formula itself vanishes there; GKD defines the endpoints this way).
    """
    if beta == 0.0:
        return fkl_full(lp_s, lp_t)
    if beta == 1.0:
        return rkl_full(lp_s, lp_t)
    lp_m = torch.logaddexp(lp_t + torch.log(torch.tensor(beta, dtype=lp_s.dtype)),
                           lp_s + torch.log(torch.tensor(1.0 - beta, dtype=lp_s.dtype)))
    return beta * _kl(lp_t, lp_m) + (1.0 - beta) * _kl(lp_s, lp_m)


def topk_support_rkl(lp_s: torch.Tensor, lp_t: torch.Tensor, support: int) -> torch.Tensor:
    """Reverse KL on the student's top-``support`` tokens, both distributions renormalised on that support.

    ``KL(π̃_S‖π̃_T)`` with ``π̃(v) = π(v)/Σ_{u∈S_t} π(u)`` for ``v ∈ S_t`` (the support is chosen without gradient).
    Renormalising both keeps the invariant that student ≡ teacher gives exactly zero loss and gradient.
    """
    k = min(support, lp_s.shape[-1])
    ids = lp_s.detach().topk(k, dim=-1).indices
    sub_s = lp_s.gather(-1, ids)
    sub_t = lp_t.to(lp_s.dtype).gather(-1, ids)
    sub_s = sub_s - sub_s.logsumexp(-1, keepdim=True)
    sub_t = sub_t - sub_t.logsumexp(-1, keepdim=True)
    return _kl(sub_s, sub_t)


def jsd_topk(student_topk: torch.Tensor, topk_logprobs: torch.Tensor, jsd_beta: float) -> torch.Tensor:
    """Teacher-side JSD part ``Σ_{v∈V_t} π_T(v) log(π_T(v)/π_M(v))``, ``π_M = β_J π_T + (1−β_J) π_S``
    (``student_topk``: the student's log-softmax at the teacher's top-k ids)."""
    dtype = student_topk.dtype
    lq = topk_logprobs.to(dtype)
    p_t = lq.exp()
    lp_m = torch.logaddexp(lq + torch.log(torch.tensor(jsd_beta, dtype=dtype)),
                           student_topk + torch.log(torch.tensor(1.0 - jsd_beta, dtype=dtype)))
    lq = torch.where(p_t > 0, lq, torch.zeros_like(lq))
    return (p_t * (lq - lp_m)).sum(-1)


def rowwise(
    logits: torch.Tensor,
    mask: torch.Tensor,
    rows: dict[str, torch.Tensor],
    fn: RowFn,
    names: tuple[str, ...],
    chunk_size: int | None = None,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Evaluate ``fn(logits_rows, rows_rows)`` and return ``[B,T]`` tensors named ``names``.

    ``rows`` holds per-position side inputs shaped ``[B,T,...]`` (token ids, teacher top-k, teacher logits).
    With ``chunk_size=None`` ``fn`` sees all ``B·T`` positions at once. Otherwise only loss-bearing positions are visited, ``chunk_size`` at a time, each chunk under activation
    checkpointing so that only one chunk's intermediates are alive; positions outside ``mask`` get 0.
    Both paths give the same values and gradients.

    Fused path, two-pass form (objectives use :mod:`tropd.objectives.fused`, one pass, whenever their loss is
    row-local): with ``head``, ``logits`` are hidden states ``[B,T,H]`` and each chunk's logits are
    ``head(hidden_rows)``, made inside the checkpointed chunk (``chunk_size``, default
    :data:`~tropd.objectives.head.FUSED_CHUNK`) and made again in backward: no ``[B·T, V]`` tensor exists, and
    gradients reach the hidden states and the head's weight.
    """
    b, t, v = logits.shape
    flat = logits.reshape(b * t, v)
    flat_rows = {k: x.reshape(b * t, *x.shape[2:]) for k, x in rows.items()}
    keys = tuple(flat_rows)
    if head is not None and chunk_size is None:
        chunk_size = FUSED_CHUNK

    def run(logit_rows: torch.Tensor, *side: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if head is not None:
            logit_rows = head(logit_rows)
        out = fn(logit_rows, dict(zip(keys, side)))
        return tuple(out[n] for n in names)

    if chunk_size is None:
        values = run(flat, *flat_rows.values())
        return {n: x.reshape(b, t) for n, x in zip(names, values)}
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of positions or None, got {chunk_size}")
    index = mask.reshape(-1).nonzero().squeeze(1)
    pieces: list[tuple[torch.Tensor, ...]] = []
    for idx in index.split(chunk_size):
        side = [x.index_select(0, idx) for x in flat_rows.values()]
        pieces.append(checkpoint(lambda f, *s, _i=idx: run(f.index_select(0, _i), *s), flat, *side,
                                 use_reentrant=False))
    dtype = compute_dtype(pieces[0][0]) if pieces else compute_dtype(logits)
    result = {}
    for j, n in enumerate(names):
        full = torch.zeros(b * t, dtype=dtype, device=logits.device)
        if pieces:
            full = full.index_copy(0, index, torch.cat([p[j] for p in pieces]))
        result[n] = full.reshape(b, t)
    return result
