"""TRB blending (docs/method.md §4.3, invariant §6.6): β* solver, KL monotonicity, budget schedule, blended decoding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.rollout.conftest import RaisingTeacher, fresh_logits, make_cfg, row_response
from tropd.rollout import TRBConfig, blend_logprobs, kl_blend_student, sample, sample_trb, solve_beta
from tropd.teacher import InProcessTeacher


def _kl(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """Reference KL(p‖q) = Σ p (log p − log q), float64."""
    p = p_logp.exp()
    return torch.where(p > 0, p * (p_logp - q_logp), torch.zeros_like(p)).sum(-1)


@st.composite
def pairs(draw):
    v = draw(st.integers(2, 24))
    rows = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    scale_s = draw(st.floats(0.1, 8.0))
    scale_t = draw(st.floats(0.1, 8.0))
    g = torch.Generator().manual_seed(seed)
    s = torch.log_softmax(torch.randn(rows, v, generator=g, dtype=torch.float64) * scale_s, -1)
    t = torch.log_softmax(torch.randn(rows, v, generator=g, dtype=torch.float64) * scale_t, -1)
    return s, t


@settings(max_examples=60, deadline=None)
@given(pairs(), st.floats(1e-5, 2.0))
def test_solve_beta_meets_budget(pair, eps):
    s, t = pair
    beta = solve_beta(s, t, eps)
    assert beta.dtype == torch.float64 and ((beta >= 0) & (beta <= 1)).all()
    kl = _kl(blend_logprobs(s, t, beta), s)
    assert (kl <= eps + 1e-12).all()
    interior = beta < 1
    assert (kl[interior] >= eps - 1e-6).all(), "β* is not the largest feasible β"
    full = _kl(t, s) <= eps
    assert (beta[full] == 1).all() and (beta[~full] < 1).all()


@settings(max_examples=40, deadline=None)
@given(pairs())
def test_beta_one_when_teacher_inside_budget(pair):
    s, t = pair
    kl_ts = _kl(t, s)
    assert (solve_beta(s, t, kl_ts) == 1).all()
    assert (solve_beta(s, t, kl_ts * 1.5 + 1e-9) == 1).all()
    torch.testing.assert_close(kl_blend_student(s, t, 1.0), kl_ts)


@settings(max_examples=40, deadline=None)
@given(pairs())
def test_kl_monotone_in_beta(pair):
    s, t = pair
    betas = torch.linspace(0, 1, 41, dtype=torch.float64)[:, None].expand(41, s.shape[0])
    kls = kl_blend_student(s.expand(41, *s.shape), t.expand(41, *t.shape), betas)  # [41, rows], β per row
    assert (kls[0].abs() < 1e-12).all()
    assert (kls.diff(dim=0) >= -1e-12).all()


def test_blend_endpoints_and_zero_support():
    s = torch.log(torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64))
    t = torch.log(torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64))
    torch.testing.assert_close(blend_logprobs(s, t, 0.0), s)
    torch.testing.assert_close(blend_logprobs(s, t, 1.0), t)
    mid = blend_logprobs(s, t, 0.5)
    assert torch.isinf(mid[0, 2]) and not torch.isnan(mid).any()
    # teacher mass outside the student's support: KL(π_T‖π_S) = ∞, so β* < 1, finite KL at β*
    beta = solve_beta(s, t, 0.01)
    assert 0 < float(beta) < 1 and float(kl_blend_student(s, t, beta)) <= 0.01
    # per-row β and per-row budgets
    ss, tt = torch.cat([s, s]), torch.cat([t, t])
    rows = solve_beta(ss, tt, torch.tensor([0.0, 0.01], dtype=torch.float64))
    assert float(rows[0]) == 0.0 and float(rows[1]) == float(beta)


def test_budget_schedule():
    assert TRBConfig().budget(0) == pytest.approx(0.02)
    assert TRBConfig().budget(25) == pytest.approx(0.01)
    assert TRBConfig().budget(50) == 0.0 and TRBConfig().budget(80) == 0.0
    assert TRBConfig(eps0=0.1, warmup_steps=0).budget(3) == 0.0


def test_budget_zero_is_plain_student_sampling(student, prompts):
    cfg = make_cfg(max_new_tokens=8, top_p=0.9)
    b = sample_trb(student, RaisingTeacher(), prompts, cfg, eps=0.0, streams=9)
    plain = sample(student, prompts, cfg, streams=9)
    assert torch.equal(b.tokens, plain.tokens) and torch.equal(b.behavior_logprobs, plain.behavior_logprobs)
    assert b.blend_beta is None and b.info["trb_eps"] == 0.0


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.8, 0.9)])
def test_blended_decoding_logprobs(student, teacher, prompts, temperature, top_p):
    eps = 0.05
    cfg = make_cfg(max_new_tokens=8, temperature=temperature, top_p=top_p)
    b = sample_trb(student, InProcessTeacher(teacher), prompts, cfg, eps=eps, streams=13)
    assert b.blend_beta is not None and b.blend_beta_per_step.shape == (b.tokens.shape[1],)
    assert 0 < float(b.blend_beta[b.loss_mask].mean()) < 1
    mean0 = b.blend_beta[:, 0][b.loss_mask[:, 0]].mean()
    torch.testing.assert_close(b.blend_beta_per_step[0], mean0)
    for i, prompt in enumerate(prompts):
        resp = row_response(b, i)
        s = torch.log_softmax(fresh_logits(student, prompt, resp).double() / temperature, -1)
        t = torch.log_softmax(fresh_logits(teacher, prompt, resp).double() / temperature, -1)
        beta = solve_beta(s, t, eps)
        torch.testing.assert_close(b.blend_beta[i, :len(resp)].double(), beta, atol=1e-4, rtol=0)
        kl = kl_blend_student(s, t, beta)
        assert (kl <= eps + 1e-9).all()
        mu = blend_logprobs(s, t, beta)
        if top_p < 1:  # top-p applied to the blend, renormalised
            p_sorted, order = mu.exp().sort(-1, descending=True)
            keep_sorted = (p_sorted.cumsum(-1) - p_sorted) < top_p
            keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
            mu = mu.masked_fill(~keep, float("-inf"))
            mu = mu - mu.logsumexp(-1, keepdim=True)
        expected = mu.gather(-1, torch.tensor(resp)[:, None])[:, 0]
        torch.testing.assert_close(b.behavior_logprobs[i, :len(resp)].double(), expected, atol=1e-5, rtol=0)


def test_large_budget_samples_the_teacher(student, teacher, prompts):
    cfg = make_cfg(max_new_tokens=6)
    b = sample_trb(student, InProcessTeacher(teacher), prompts, cfg, eps=1e6, streams=1)
    assert b.blend_beta[b.loss_mask].eq(1).all()
    for i, prompt in enumerate(prompts):
        resp = row_response(b, i)
        t_lp = torch.log_softmax(fresh_logits(teacher, prompt, resp), -1).gather(-1, torch.tensor(resp)[:, None])
        torch.testing.assert_close(b.behavior_logprobs[i, :len(resp)], t_lp[:, 0], atol=1e-5, rtol=0)
