"""Random, self-consistent objective inputs and small utilities shared by the objective tests."""

from __future__ import annotations

import dataclasses
import math

import torch

from tropd.objectives import TokenInputs, get_objective, objective_keywords

from .reference import OBJECTIVES, reference_loss

#: (name, keywords, extra TokenInputs fields) — every configuration the reference-match tests sweep.
CONFIGS: list[tuple[str, dict, dict]] = [
    ("sft", {}, {}),
    ("opd", {}, {}),
    ("fkl", {}, {}),
    ("jsd", {}, {}),
    ("jsd", {"jsd_beta": 0.3}, {}),
    ("clip_outlier", {}, {}),
    ("clip_outlier", {"tau": -0.5}, {}),
    ("mask_outlier", {}, {}),
    ("mask_outlier", {"tau": -0.5}, {}),
    ("entropy_opd", {}, {}),
    ("entropy_opd", {"entropy_top_frac": 0.5}, {}),
    ("eopd", {}, {}),
    ("eopd", {"entropy_threshold": 1.2}, {}),
    ("reopold", {}, {}),
    ("reopold", {"tau": -0.5}, {}),
    ("reopold_2stage", {"stage": 1}, {}),
    ("reopold_2stage", {"stage": 2}, {}),
    ("reopold_2stage", {}, {"progress": 0.2}),
    ("reopold_2stage", {}, {"progress": 0.7}),
    ("reopold_2stage", {"tau": -0.5, "stage": 1}, {}),
    ("fkl_outlier", {}, {}),
    ("fkl_outlier", {"trust_mode": "expected"}, {}),
    ("tropd", {}, {}),
    ("tropd", {"trust_mode": "expected"}, {}),
    ("tropd", {"outlier": "mask"}, {}),
    ("tropd", {"outlier": "mask", "trust_mode": "expected"}, {}),
    ("tropd", {"outlier": "clip"}, {}),
    ("tropd", {"outlier": "clip", "trust_mode": "expected", "tau": -0.5}, {}),
    ("tropd", {"beta": 0.1}, {}),
    ("gkd", {"beta": 0.0}, {}),
    ("gkd", {"beta": 0.3}, {}),
    ("gkd", {"beta": 0.5}, {}),
    ("gkd", {"beta": 1.0}, {}),
    ("trb", {}, {}),
    ("trb", {"trb_support": 3}, {}),
]

#: One representative configuration per objective name (defaults, progress set for the curriculum).
DEFAULT_CONFIGS: list[tuple[str, dict, dict]] = [
    (n, {"beta": 0.5} if n == "gkd" else {}, {"progress": 0.3} if n == "reopold_2stage" else {}) for n in OBJECTIVES
]


#: Defaults plus the trust-region / outlier / GKD-limit variants: the sweep for the costlier invariant tests.
CORE_CONFIGS: list[tuple[str, dict, dict]] = DEFAULT_CONFIGS + [
    ("reopold_2stage", {}, {"progress": 0.7}),
    ("fkl_outlier", {"trust_mode": "expected"}, {}),
    ("tropd", {"trust_mode": "expected"}, {}),
    ("tropd", {"outlier": "mask"}, {}),
    ("tropd", {"outlier": "clip"}, {}),
    ("tropd", {"outlier": "clip", "trust_mode": "expected"}, {}),
    ("gkd", {"beta": 0.0}, {}),
    ("gkd", {"beta": 1.0}, {}),
]


def config_id(cfg) -> str:
    name, kw, extra = cfg
    parts = [name] + [f"{k}={v}" for k, v in {**kw, **extra}.items()]
    return "-".join(parts)


def make_inputs(
    seed: int,
    B: int = 3,
    T: int = 5,
    V: int = 11,
    K: int = 4,
    *,
    dtype: torch.dtype = torch.float64,
    loss_mask: torch.Tensor | None = None,
    teacher_mask: torch.Tensor | None = None,
    on_policy: bool = False,
    same: bool = False,
    student_scale: float = 2.0,
) -> TokenInputs:
    """Random but self-consistent inputs: the teacher fields all come from one set of teacher logits.

    ``same=True`` makes the teacher identical to the student (teacher logits = student logits, q = s), and
    implies ``on_policy``. ``on_policy`` sets b = sg(s); otherwise b = sg(s) + noise (ρ ≠ 1).
    """
    g = torch.Generator().manual_seed(seed)
    # per-position temperature spreads the entropies (some below and above eopd's 0.8 nats)
    temp = torch.exp(torch.randn(B, T, 1, generator=g, dtype=torch.float64))
    student = torch.randn(B, T, V, generator=g, dtype=torch.float64) * student_scale * temp
    if same:
        teacher = student.clone()
    else:
        teacher = student + 1.5 * torch.randn(B, T, V, generator=g, dtype=torch.float64) * temp
    tokens = torch.randint(0, V, (B, T), generator=g)
    if loss_mask is None:
        loss_mask = torch.rand(B, T, generator=g) < 0.8
    if teacher_mask is None:
        teacher_mask = torch.rand(B, T, generator=g) < 0.3
    trust_mask = torch.rand(B, T, generator=g) < 0.6
    noise = 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)

    lt = torch.log_softmax(teacher, -1)
    ls = torch.log_softmax(student, -1)
    s = ls.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    q = lt.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    b = s if (on_policy or same) else s + noise
    top = lt.topk(K, dim=-1)
    h_t = -(lt.exp() * lt).sum(-1)
    return TokenInputs(
        student_logits=student.to(dtype).requires_grad_(True),
        tokens=tokens,
        behavior_logprobs=b.to(dtype),
        teacher_logprobs=q.to(dtype),
        teacher_topk_ids=top.indices,
        teacher_topk_logprobs=top.values.to(dtype),
        teacher_entropy=h_t.to(dtype),
        teacher_logits=teacher.to(dtype),
        loss_mask=loss_mask.clone(),
        teacher_token_mask=teacher_mask.clone(),
        trust_mask=trust_mask,
    )


def fresh(x: TokenInputs, **changes) -> TokenInputs:
    """A copy of ``x`` with a new leaf for the student logits (so two runs don't share .grad)."""
    logits = changes.pop("student_logits", x.student_logits)
    leaf = logits.detach().clone().requires_grad_(True)
    return dataclasses.replace(x, student_logits=leaf, **changes)


def build(name: str, kw: dict, K: int | None = None):
    """get_objective(name, **kw), adding top_k=K when the objective takes a top_k keyword."""
    kw = dict(kw)
    if K is not None and "top_k" in objective_keywords(name) and "top_k" not in kw:
        kw["top_k"] = K
    return get_objective(name, **kw)


def run_impl(name: str, kw: dict, x: TokenInputs, num_tokens=None):
    """Run the implementation on a fresh leaf; returns (output, grad of out.loss w.r.t. the logits)."""
    x = fresh(x)
    K = x.teacher_topk_ids.shape[-1] if x.teacher_topk_ids is not None else None
    out = build(name, kw, K)(x, num_tokens=num_tokens)
    out.loss.backward()
    grad = x.student_logits.grad
    if grad is None:
        grad = torch.zeros_like(x.student_logits)
    return out, grad


def run_ref(name: str, kw: dict, x: TokenInputs, num_tokens=None):
    """Run the float64 reference on a fresh float64 leaf; returns (loss, token_losses, grad)."""
    x = fresh(x, student_logits=x.student_logits.detach().double())
    loss, tl = reference_loss(name, x, num_tokens=num_tokens, **kw)
    loss.backward()
    grad = x.student_logits.grad
    if grad is None:
        grad = torch.zeros_like(x.student_logits)
    return loss.detach(), tl.detach(), grad


def assert_close(actual, expected, rtol=1e-6, atol=1e-10, msg=""):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{msg}\n{m}")


def all_finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


INV_E = 1.0 / math.e
