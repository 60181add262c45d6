"""Independent float64 reference implementation of the objectives in docs/method.md §2-§4.

Written from docs/method.md and the project's stated design decisions only; it does not read or reuse
``tropd.objectives`` math. Everything is full-vocabulary, un-chunked, plain tensor ops, and meant to be run in
float64. The only thing taken from the package is the :class:`TokenInputs` container (any object with the same
attribute names works).

Entry points:

* :func:`reference_token_losses` -> ``[B,T]`` per-token losses (autograd flows into ``x.student_logits``).
* :func:`reference_loss` -> ``(loss, token_losses)`` with ``loss = Σ token_losses / N``.
* :func:`reference_metrics` -> the metrics the tests pin.
* :func:`fkl_full`, :func:`rkl_full`, :func:`kl` -> exact full-vocabulary divergences for the invariants.
"""

from __future__ import annotations

import math

import torch

OBJECTIVES = (
    "sft",
    "opd",
    "fkl",
    "jsd",
    "clip_outlier",
    "mask_outlier",
    "entropy_opd",
    "eopd",
    "reopold",
    "reopold_2stage",
    "fkl_outlier",
    "tropd",
    "gkd",
    "trb",
)

#: τ = log(λ/(1−λ)), λ = 0.2 (docs/method.md §3, §5).
TAU = math.log(0.2 / 0.8)


# ---------------------------------------------------------------------------------------------------------
# exact full-vocabulary divergences (docs/method.md §2 rkl_full / fkl_full), per position [B,T]
# ---------------------------------------------------------------------------------------------------------


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) = Σ_v p(v)(log p(v) − log q(v)) over the last axis, from log-probabilities."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def rkl_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(π_S‖π_T) per position."""
    return kl(torch.log_softmax(student_logits, -1), torch.log_softmax(teacher_logits, -1))


def fkl_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(π_T‖π_S) per position."""
    return kl(torch.log_softmax(teacher_logits, -1), torch.log_softmax(student_logits, -1))


def _log(c: float) -> float:
    return math.log(c) if c > 0 else float("-inf")


def generalised_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """GKD's JSD_β(π_T‖π_S) = β KL(π_T‖M) + (1−β) KL(π_S‖M), M = βπ_T + (1−β)π_S; exact limits at β ∈ {0,1}."""
    ls = torch.log_softmax(student_logits, -1)
    lt = torch.log_softmax(teacher_logits, -1)
    if beta == 0.0:
        return kl(lt, ls)
    if beta == 1.0:
        return kl(ls, lt)
    lm = torch.logaddexp(lt + _log(beta), ls + _log(1.0 - beta))
    return beta * kl(lt, lm) + (1.0 - beta) * kl(ls, lm)


# ---------------------------------------------------------------------------------------------------------
# the objectives
# ---------------------------------------------------------------------------------------------------------


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


def _top_entropy_mask(h: torch.Tensor, sm: torch.Tensor, top_frac: float) -> torch.Tensor:
    """1[H ≥ quantile_{1−p}(H over the student positions)] (torch.quantile, linear interpolation)."""
    if not bool(sm.any()):
        return torch.zeros_like(sm)
    thr = torch.quantile(h[sm], 1.0 - top_frac)
    return h >= thr


def reference_token_losses(
    name: str,
    x,
    *,
    top_k: int | None = None,
    beta: float | None = None,
    tau: float = TAU,
    trust_mode: str = "sample",
    outlier: str = "fkl",
    jsd_beta: float = 0.5,
    entropy_threshold: float = 0.8,
    entropy_top_frac: float = 0.2,
    stage: int | None = None,
    trb_support: int = 16,
    chunk_size: int | None = None,  # accepted and ignored: the reference is never chunked
) -> torch.Tensor:
    """Per-token losses ``[B,T]`` of objective ``name`` (zero where no loss), differentiable in the logits."""
    del top_k, chunk_size  # the reference uses the top-k tensors as given
    logits = x.student_logits
    lp = torch.log_softmax(logits, -1)  # full-vocabulary student log-softmax
    tokens = x.tokens
    s = lp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # s_t, with grad
    zero = torch.zeros_like(s)

    lm = x.loss_mask.bool() if x.loss_mask is not None else torch.ones_like(tokens, dtype=torch.bool)
    tm = x.teacher_token_mask.bool() & lm if x.teacher_token_mask is not None else torch.zeros_like(lm)
    sm = lm & ~tm  # student-sampled loss positions

    b = x.behavior_logprobs.detach().to(lp.dtype) if x.behavior_logprobs is not None else None
    q = x.teacher_logprobs.detach().to(lp.dtype) if x.teacher_logprobs is not None else None
    r = (q - b) if (q is not None and b is not None) else None  # K1 reward
    rho = torch.exp(s - b) if b is not None else None  # importance ratio, value 1 on-policy

    def pg_k1(reward: torch.Tensor) -> torch.Tensor:
        return -reward.detach() * rho

    def fkl_topk() -> torch.Tensor:
        ids = x.teacher_topk_ids
        lt = x.teacher_topk_logprobs.detach().to(lp.dtype)
        pt = lt.exp()
        lps = lp.gather(-1, ids)  # full-vocabulary student log-probs at the teacher's top-k ids
        term = torch.where(pt > 0, pt * (lt - lps), torch.zeros_like(pt))
        return term.sum(-1)

    def student_only(v: torch.Tensor) -> torch.Tensor:
        return torch.where(sm, v, zero)

    def p_trust() -> torch.Tensor:
        return torch.exp(torch.clamp(r, max=0.0))  # min(exp(r), 1)

    def trust_region(out_kind: str) -> torch.Tensor:
        if out_kind == "fkl":
            out = fkl_topk()
        elif out_kind == "mask":
            out = zero
        elif out_kind == "clip":
            out = pg_k1(torch.full_like(r, tau))
        else:
            raise ValueError(out_kind)
        main = pg_k1(r)
        if trust_mode == "expected":
            p = p_trust()
            return p * main + (1.0 - p) * out
        if trust_mode == "sample":
            if x.trust_mask is None:
                raise ValueError("the reference needs an explicit trust_mask for trust_mode='sample'")
            return torch.where(x.trust_mask.bool(), main, out)
        raise ValueError(trust_mode)

    if name == "sft":
        return torch.where(tm, -s, zero)
    if name == "opd":
        return student_only(pg_k1(r))
    if name == "fkl":
        return student_only(fkl_topk())
    if name == "jsd":
        bj = float(jsd_beta)
        lt = x.teacher_topk_logprobs.detach().to(lp.dtype)
        pt = lt.exp()
        lps = lp.gather(-1, x.teacher_topk_ids)
        lmix = torch.logaddexp(lt + _log(bj), lps + _log(1.0 - bj))
        first = torch.where(pt > 0, pt * (lt - lmix), torch.zeros_like(pt)).sum(-1)
        lmix_y = torch.logaddexp(q + _log(bj), s.detach() + _log(1.0 - bj))
        return student_only(bj * first + (1.0 - bj) * pg_k1(lmix_y - b))
    if name in ("clip_outlier", "reopold"):
        return student_only(pg_k1(torch.clamp(r, min=tau)))
    if name == "mask_outlier":
        return student_only((r > tau).to(lp.dtype) * pg_k1(r))
    if name == "entropy_opd":
        sel = _top_entropy_mask(_entropy(lp.detach()), sm, entropy_top_frac)
        return torch.where(sm & sel, pg_k1(r), zero)
    if name == "eopd":
        ht = x.teacher_entropy.to(lp.dtype)
        return student_only(pg_k1(r) + (ht > entropy_threshold).to(lp.dtype) * fkl_topk())
    if name == "reopold_2stage":
        st = stage if stage is not None else (1 if x.progress < 0.5 else 2)
        if st == 1:
            return student_only((r >= tau).to(lp.dtype) * pg_k1(r))
        sel = _top_entropy_mask(_entropy(lp.detach()), sm, 0.5)
        return torch.where(sm & sel, pg_k1(r), zero)
    if name == "fkl_outlier":
        return student_only(trust_region("fkl"))
    if name == "tropd":
        g = 1e-3 if beta is None else float(beta)
        guidance = g * (q - s)
        return torch.where(tm, guidance, student_only(trust_region(outlier)))
    if name == "gkd":
        g = 0.5 if beta is None else float(beta)
        return student_only(generalised_jsd(logits, x.teacher_logits.to(lp.dtype), g))
    if name == "trb":
        k = min(int(trb_support), logits.shape[-1])
        idx = logits.detach().topk(k, dim=-1).indices
        ls = lp.gather(-1, idx)
        ls = ls - torch.logsumexp(ls, -1, keepdim=True)
        lt_full = torch.log_softmax(x.teacher_logits.to(lp.dtype), -1)
        lt = lt_full.gather(-1, idx)
        lt = lt - torch.logsumexp(lt, -1, keepdim=True)
        return student_only(kl(ls, lt))
    raise KeyError(name)


def reference_loss(name: str, x, num_tokens=None, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, token_losses)``; ``loss = Σ token_losses / N`` with N = num_tokens or the loss_mask count (0 → 0)."""
    tl = reference_token_losses(name, x, **kw)
    n = float(x.loss_mask.sum()) if num_tokens is None else float(num_tokens)
    loss = tl.sum() / n if n > 0 else tl.sum() * 0.0
    return loss, tl


def reference_metrics(x) -> dict[str, float]:
    """The reward metrics every reward-based objective reports (means over student positions)."""
    lm = x.loss_mask.bool()
    sm = lm & ~x.teacher_token_mask.bool()
    r = (x.teacher_logprobs - x.behavior_logprobs).detach().double()[sm]
    if r.numel() == 0:
        return {}
    return {
        "k1_rkl": float((-r).mean()),
        "reward_min": float(r.min()),
        "reward_p01": float(torch.quantile(r, 0.01)),
        "mean_p_trust": float(torch.exp(torch.clamp(r, max=0.0)).mean()),
    }
