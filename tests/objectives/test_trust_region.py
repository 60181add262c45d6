"""docs/method.md §4.1: the trust region (acceptance probability, sampled mask) and its bounded-weight consequences."""

from __future__ import annotations

import math

import pytest
import torch

from tropd.objectives import TokenInputs

from .helpers import INV_E, all_finite, assert_close, fresh, make_inputs, run_impl


def _reward_grid_inputs(r: torch.Tensor, V: int = 6, seed: int = 0, dtype=torch.float64) -> TokenInputs:
    """One sequence, one position per reward value, on-policy (b = sg(s)), q = b + r."""
    T = r.numel()
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, T, V, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (1, T), generator=g)
    s = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    lt = torch.log_softmax(logits + torch.randn(1, T, V, generator=g, dtype=torch.float64), -1)
    top = lt.topk(3, -1)
    return TokenInputs(
        student_logits=logits.to(dtype).requires_grad_(True),
        tokens=tokens,
        behavior_logprobs=s.to(dtype),
        teacher_logprobs=(s + r.view(1, T)).to(dtype),
        teacher_topk_ids=top.indices,
        teacher_topk_logprobs=top.values.to(dtype),
        teacher_entropy=-(lt.exp() * lt).sum(-1).to(dtype),
        teacher_logits=lt.to(dtype),
    )


def test_expected_weight_on_negative_reward_is_u_log_u():
    """Under "expected", the pg weight P·r on a negative reward is u·log u (u = π_T/π_beh) ≥ −1/e."""
    r = torch.cat([-torch.logspace(-4, math.log10(60), 200, dtype=torch.float64), torch.tensor([-1.0])])
    x = _reward_grid_inputs(r)
    out, grad = run_impl("tropd", {"trust_mode": "expected", "outlier": "mask"}, x)
    u = torch.exp(r)
    # token loss = −P·r·ρ with ρ = 1, i.e. −u log u ∈ [0, 1/e]
    tl = out.token_losses.detach().view(-1)
    assert_close(tl, -(u * torch.log(u)), rtol=1e-9, atol=1e-15)
    assert float(tl.max()) <= INV_E + 1e-12
    assert float(tl[-1]) == pytest.approx(INV_E, rel=1e-12)  # the bound is attained at u = 1/e
    # the logit gradient of each position is (−P r)(e_y − π_S)/N: every entry within [−1/e, 1/e]
    N = r.numel()
    assert float((grad * N).abs().max()) <= INV_E + 1e-12


def test_expected_weight_nonnegative_reward_is_plain_pg():
    r = torch.linspace(0.0, 5.0, 11, dtype=torch.float64)
    x = _reward_grid_inputs(r)
    out, _ = run_impl("tropd", {"trust_mode": "expected", "outlier": "mask"}, x)
    assert_close(out.token_losses.detach().view(-1), -r, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fkl_topk_logit_gradient_in_unit_interval(seed, dtype):
    """The fkl_topk logit-gradient p_S(u)·m − π_T(u)·1[u∈V_t] has every entry in [−1, 1]."""
    x = make_inputs(90 + seed, B=3, T=5, V=16, K=6, student_scale=8.0)
    x.student_logits = x.student_logits.detach().to(dtype).requires_grad_(True)
    x.teacher_topk_logprobs = x.teacher_topk_logprobs.to(dtype)
    out, grad = run_impl("fkl", {}, x)
    N = float(x.loss_mask.sum())
    g = grad.double() * N
    assert float(g.max()) <= 1.0 + 1e-6 and float(g.min()) >= -1.0 - 1e-6
    # and the exact form
    p = torch.softmax(x.student_logits.detach().double(), -1)
    pt = torch.zeros_like(p).scatter(-1, x.teacher_topk_ids, x.teacher_topk_logprobs.double().exp())
    m = pt.sum(-1, keepdim=True)
    sm = (x.loss_mask & ~x.teacher_token_mask).unsqueeze(-1)
    expected = torch.where(sm, p * m - pt, torch.zeros_like(p))
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert_close(g, expected, rtol=tol, atol=tol)


def test_p_trust_is_min_exp_r_one():
    """Under "expected" with the clip outlier the loss is −ρ(P·r + (1−P)·τ) with P = min(e^r, 1)."""
    r = torch.linspace(-6, 3, 37, dtype=torch.float64)
    x = _reward_grid_inputs(r)
    tau = -0.5
    out, _ = run_impl("tropd", {"trust_mode": "expected", "outlier": "clip", "tau": tau}, x)
    p = torch.clamp(torch.exp(r), max=1.0)
    assert_close(out.token_losses.detach().view(-1), -(p * r + (1 - p) * tau), rtol=1e-12, atol=1e-15)


def test_sampled_trust_mask_frequency():
    """M ~ Bernoulli(P_trust): the empirical acceptance per reward level matches P within 5 sigma."""
    levels = torch.tensor([-3.0, -1.0, -0.3, 0.0, 0.5], dtype=torch.float64)
    reps = 4000
    r = levels.repeat(reps)
    x = _reward_grid_inputs(r, V=3)
    x.generator = torch.Generator().manual_seed(1234)
    out, _ = run_impl("tropd", {"outlier": "mask"}, x)
    tl = out.token_losses.detach().view(reps, len(levels))
    # accepted positions carry −r·ρ = −r (nonzero unless r = 0); masked ones carry 0
    p = torch.clamp(torch.exp(levels), max=1.0)
    for j, lv in enumerate(levels.tolist()):
        if lv == 0.0:
            continue
        acc = (tl[:, j] != 0).double().mean()
        sigma = math.sqrt(max(float(p[j] * (1 - p[j])), 1e-12) / reps)
        assert abs(float(acc) - float(p[j])) <= 5 * sigma + 1e-12, (lv, float(acc), float(p[j]))
    # the trust_frac metric reports the same draws
    acc_all = (tl[:, levels != 0] != 0).double().sum() + reps  # r = 0 positions are always accepted
    assert out.metrics["trust_frac"] == pytest.approx(float(acc_all) / r.numel(), abs=1e-9)


def test_sampled_trust_mask_reproducible_with_generator():
    x = make_inputs(95, B=4, T=8, V=7, K=3)
    x.teacher_logprobs = x.teacher_logprobs - 1.0
    x.trust_mask = None
    outs = []
    for _ in range(2):
        y = fresh(x, generator=torch.Generator().manual_seed(7))
        outs.append(run_impl("tropd", {"outlier": "mask"}, y))
    assert_close(outs[0][0].token_losses.detach(), outs[1][0].token_losses.detach(), rtol=0, atol=0)
    assert_close(outs[0][1], outs[1][1], rtol=0, atol=0)


def test_trust_mask_overrides_sampling():
    """An explicit trust_mask replaces the Bernoulli draw (even where P_trust = 0-ish or 1)."""
    x = make_inputs(96, B=3, T=6, V=7, K=3)
    x.teacher_logprobs = x.behavior_logprobs + torch.where(torch.rand(3, 6, generator=torch.Generator().manual_seed(0)) < 0.5, -50.0, 2.0).double()
    out, _ = run_impl("tropd", {"outlier": "mask"}, x)
    sm = x.loss_mask & ~x.teacher_token_mask
    r = x.teacher_logprobs - x.behavior_logprobs
    rho = torch.exp(torch.log_softmax(x.student_logits.detach(), -1).gather(-1, x.tokens.unsqueeze(-1)).squeeze(-1)
                    - x.behavior_logprobs)
    expected = torch.where(sm & x.trust_mask, -r * rho, torch.zeros_like(r))
    assert_close(out.token_losses.detach()[sm], expected[sm], rtol=1e-12, atol=1e-15)


def test_guidance_positions_tropd():
    """Teacher-prefix positions: β·(q − s), gradient β·∇nll, regardless of trust mode / outlier."""
    x = make_inputs(97, B=3, T=6, V=7, K=3, teacher_mask=torch.rand(3, 6, generator=torch.Generator().manual_seed(1)) < 0.5)
    tm = x.teacher_token_mask & x.loss_mask
    s = torch.log_softmax(x.student_logits.detach(), -1).gather(-1, x.tokens.unsqueeze(-1)).squeeze(-1)
    for kw in ({}, {"trust_mode": "expected"}, {"outlier": "mask", "beta": 0.25}, {"outlier": "clip"}):
        out, _ = run_impl("tropd", kw, x)
        beta = kw.get("beta", 1e-3)
        assert_close(out.token_losses.detach()[tm], (beta * (x.teacher_logprobs - s))[tm], rtol=1e-12, atol=1e-15)
    assert all_finite(out.loss.detach())
