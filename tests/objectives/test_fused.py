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


def _grads(objective, x: TokenInputs, hidden, weight, softcap, fused: bool):
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    head = LMHead(lambda z: z @ w.T, w.shape[0], softcap=softcap)
    if fused:
        x = dataclasses.replace(x, student_logits=None, student_hidden=h, student_head=head)
    else:
        x = dataclasses.replace(x, student_logits=head(h))
    out = objective(x, num_tokens=7)
    out.loss.backward()
    return out, h.grad, w.grad


@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_fused_equals_logits(cfg, chunk_size, softcap):
    name, kw, extra = cfg
    x = dataclasses.replace(make_inputs(11), **extra)
    b, t, v = x.student_logits.shape
    hidden, weight = _leaves(5, b, t, v)
    objective = get_objective(name, chunk_size=chunk_size, **kw)
    ref, gh_ref, gw_ref = _grads(get_objective(name, **kw), x, hidden, weight, softcap, fused=False)
    got, gh, gw = _grads(objective, x, hidden, weight, softcap, fused=True)
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
