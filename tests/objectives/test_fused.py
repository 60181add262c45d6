"""The fused path (student hidden states + LM head, projected chunk by chunk) equals the logits path for every
objective: loss, metrics, and the gradients w.r.t. the hidden states and the head's weight (float64, 1e-6
relative), with and without logit post-processing; and it never builds the full [B·T, V] student logits."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tropd.objectives import TokenInputs, get_objective
from tropd.objectives.head import LMHead

from .helpers import CONFIGS, config_id, make_inputs

H = 6


def _leaves(seed: int, b: int, t: int, v: int):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, H, generator=g, dtype=torch.float64)
    weight = torch.randn(v, H, generator=g, dtype=torch.float64)
    return hidden, weight


def _head(w: torch.Tensor, softcap, kind: str) -> LMHead:
    """``function``: a plain function (the head is projected again in backward); ``params``: the same with its
    weight named, ``module``: an ``nn.Linear`` (both: the gradient is formed in forward, tropd.objectives.fused)."""
    if kind == "module":
        linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
        linear.weight = torch.nn.Parameter(w)
        return LMHead(linear, w.shape[0], softcap=softcap)
    return LMHead(lambda z: z @ w.T, w.shape[0], softcap=softcap, params=(w,) if kind == "params" else ())


def _grads(objective, x: TokenInputs, hidden, weight, softcap, fused: bool, kind: str = "function"):
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    head = _head(w, softcap, kind)
    if kind == "module":
        w = head.project.weight
    if fused:
        x = dataclasses.replace(x, student_logits=None, student_hidden=h, student_head=head)
    else:
        x = dataclasses.replace(x, student_logits=head(h))
    out = objective(x, num_tokens=7)
    out.loss.backward()
    return out, h.grad, w.grad


@pytest.mark.parametrize("kind", ["function", "params", "module"])
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_fused_equals_logits(cfg, chunk_size, softcap, kind):
    name, kw, extra = cfg
    x = dataclasses.replace(make_inputs(11), **extra)
    b, t, v = x.student_logits.shape
    hidden, weight = _leaves(5, b, t, v)
    objective = get_objective(name, chunk_size=chunk_size, **kw)
    ref, gh_ref, gw_ref = _grads(get_objective(name, **kw), x, hidden, weight, softcap, fused=False)
    got, gh, gw = _grads(objective, x, hidden, weight, softcap, fused=True, kind=kind)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(got.token_losses, ref.token_losses, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(gh, gh_ref, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-6, atol=1e-12)
    assert got.metrics.keys() == ref.metrics.keys()
    for key in ref.metrics:
        if key != "fkl_outlier":  # a ratio over chunks in the chunked path (docs/objectives.md)
            assert got.metrics[key] == pytest.approx(ref.metrics[key], rel=1e-6, abs=1e-12), key


def test_no_full_size_student_tensor_exists():
    """Every tensor autograd saves or the head returns on the fused path has at most chunk_size rows of V."""
    x = make_inputs(3, B=4, T=16, V=50)
    hidden, weight = _leaves(1, 4, 16, 50)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    widest = []

    def project(z):
        out = z @ w.T
        widest.append(out.shape[0])
        return out

    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    x = dataclasses.replace(x, student_logits=None, student_hidden=h, student_head=LMHead(project, 50))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = get_objective("tropd", chunk_size=8)(x)
    out.loss.backward()
    assert max(widest) <= 8 and len(widest) >= 2 * (int(x.loss_mask.sum()) // 8)  # chunks, recomputed in backward
    assert not any(len(s) >= 2 and s[-1] == 50 and s[0] > 8 for s in saved)


def test_inputs_need_logits_or_hidden_with_a_head():
    x = make_inputs(0)
    with pytest.raises(ValueError, match="either student_logits, or student_hidden"):
        dataclasses.replace(x, student_logits=None)
    with pytest.raises(ValueError, match="student_hidden needs student_head"):
        dataclasses.replace(x, student_logits=None, student_hidden=torch.zeros(3, 5, H))


def _counting_head(w: torch.Tensor, v: int, calls: list, named: bool = True) -> LMHead:
    def project(z):
        calls.append(z.shape[0])
        return z @ w.T
    return LMHead(project, v, params=(w,) if named else ())


def test_gradient_formed_in_forward_projects_each_chunk_once():
    """With the head's weight known, forward projects each chunk once and backward projects nothing."""
    x = make_inputs(3, B=4, T=16, V=50)
    hidden, weight = _leaves(1, 4, 16, 50)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    calls, saved = [], []
    x = dataclasses.replace(x, student_logits=None, student_hidden=h, student_head=_counting_head(w, 50, calls))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = get_objective("tropd", chunk_size=8)(x)
    in_forward = len(calls)
    out.loss.backward()
    n = int(x.loss_mask.sum())
    assert calls[0] == 1  # a one-row probe of the head's graph (fused.reads_only), then one call per chunk
    assert in_forward == len(calls) == 1 + -(-n // 8) and max(calls) <= 8
    assert not any(len(s) >= 2 and s[-1] == 50 and s[0] > 8 for s in saved)
    assert h.grad is not None and w.grad is not None and h.grad.abs().sum() > 0 and w.grad.abs().sum() > 0


@pytest.mark.parametrize("name, kw, extra", [
    ("entropy_opd", {}, {}),                      # an entropy quantile over the batch
    ("reopold_2stage", {"stage": 2}, {}),         # the same in stage 2
    ("tropd", {}, {"trust_mask": None}),          # Bernoulli draws over the batch with a generator
])
def test_batch_statistics_project_again_in_backward(name, kw, extra):
    """Objectives whose loss at a position reads the whole batch keep the two-pass path, with equal results."""
    x = dataclasses.replace(make_inputs(4, B=4, T=16, V=50), **extra)
    hidden, weight = _leaves(2, 4, 16, 50)
    results = []
    for fused in (False, True):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        calls = []
        head = _counting_head(w, 50, calls)
        student = {"student_logits": None, "student_hidden": h, "student_head": head} if fused else \
            {"student_logits": head(h)}
        y = dataclasses.replace(x, **student, generator=torch.Generator().manual_seed(0))
        out = get_objective(name, chunk_size=8, **kw)(y)
        out.loss.backward()
        results.append((out.loss.detach(), h.grad, w.grad, len(calls)))
    (loss0, gh0, gw0, _), (loss1, gh1, gw1, n_calls) = results
    assert n_calls == 2 * -(-int(x.loss_mask.sum()) // 8)
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(gh1, gh0, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(gw1, gw0, rtol=1e-6, atol=1e-12)


def test_frozen_head_no_grad_and_one_backward_only():
    """A frozen head gives gradients to the hidden states only; under no_grad nothing is differentiated; the
    gradient formed in forward is handed out once (a second backward through the same graph is an error)."""
    x = make_inputs(5, B=3, T=10, V=40)
    hidden, weight = _leaves(3, 3, 10, 40)
    objective = get_objective("opd", chunk_size=4)
    ref_h = hidden.clone().requires_grad_(True)
    ref = objective(dataclasses.replace(x, student_logits=ref_h @ weight.T), num_tokens=9)
    ref.loss.backward()

    h = hidden.clone().requires_grad_(True)
    head = LMHead(lambda z: z @ weight.T, 40, params=(weight,))  # weight does not require grad
    out = objective(dataclasses.replace(x, student_logits=None, student_hidden=h, student_head=head), num_tokens=9)
    out.loss.backward(retain_graph=True)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=1e-6, atol=1e-12)
    with pytest.raises(RuntimeError, match="hands it out once"):
        out.loss.backward()

    with torch.no_grad():
        quiet = objective(dataclasses.replace(x, student_logits=None, student_hidden=h, student_head=head),
                          num_tokens=9)
    assert not quiet.loss.requires_grad
    torch.testing.assert_close(quiet.loss, ref.loss.detach(), rtol=1e-6, atol=1e-12)


class _ViewHead(torch.nn.Module):
    """Reads its weight from a tensor ``.parameters()`` does not list (as FSDP1's flat-parameter views do)."""

    def __init__(self, flat: torch.Tensor, v: int):
        super().__init__()
        self.flat, self.v = flat, v

    def forward(self, z):
        return z @ self.flat.view(self.v, -1).T


def test_a_head_reading_unlisted_tensors_keeps_their_gradient():
    """The one-pass loss hands gradients only to the tensors it knows; a head that reads others keeps the
    two-pass path, so they get theirs (equal to the logits path)."""
    x = make_inputs(6, B=3, T=5, V=11)
    hidden, weight = _leaves(4, 3, 5, 11)
    grads = []
    for fused in (False, True):
        h, flat = hidden.clone().requires_grad_(True), weight.reshape(-1).clone().requires_grad_(True)
        head = LMHead(_ViewHead(flat, 11), 11)
        assert head.trainable() == ()
        student = {"student_logits": None, "student_hidden": h, "student_head": head} if fused else \
            {"student_logits": head(h)}
        get_objective("opd")(dataclasses.replace(x, **student)).loss.backward()
        grads.append((h.grad, flat.grad))
    (gh0, gw0), (gh1, gw1) = grads
    assert gw1 is not None
    torch.testing.assert_close(gh1, gh0, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(gw1, gw0, rtol=1e-6, atol=1e-12)


def test_take_rows_reads_non_contiguous_fields():
    x = make_inputs(7, B=3, T=6, V=9)
    x = dataclasses.replace(x, student_logits=x.student_logits.transpose(0, 1).contiguous().transpose(0, 1))
    assert not x.student_logits.is_contiguous()
    index = torch.tensor([0, 4, 7, 17])
    part = x.take_rows(index)
    assert torch.equal(part.student_logits[0], x.student_logits.reshape(18, 9)[index])
    assert torch.equal(part.tokens[0], x.tokens.reshape(-1)[index])
    assert torch.equal(part.loss_mask[0], x.loss_mask.reshape(-1)[index])
