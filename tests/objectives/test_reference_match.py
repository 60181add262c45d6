"""Every objective's loss, per-token losses and logit gradient match the independent float64 reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from .helpers import CONFIGS, CORE_CONFIGS, assert_close, build, config_id, fresh, make_inputs, run_impl, run_ref
from .reference import reference_metrics


def _check(cfg, x, num_tokens=None):
    name, kw, _ = cfg
    out, grad = run_impl(name, kw, x, num_tokens=num_tokens)
    ref_loss, ref_tl, ref_grad = run_ref(name, kw, x, num_tokens=num_tokens)
    tag = f"{config_id(cfg)}"
    assert out.token_losses.shape == x.tokens.shape, tag
    assert_close(out.token_losses.detach(), ref_tl, msg=f"{tag}: token_losses")
    assert_close(out.loss.detach(), ref_loss, msg=f"{tag}: loss")
    assert_close(grad, ref_grad, msg=f"{tag}: grad wrt student_logits")
    return out


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
@pytest.mark.parametrize("on_policy", [True, False], ids=["b=sg(s)", "b!=s,global_N"])
def test_matches_reference(cfg, on_policy):
    """Loss, token losses and gradient; the off-policy case also passes a global num_tokens."""
    x = make_inputs(1 if on_policy else 0, B=3, T=6, V=11, K=4, on_policy=on_policy)
    for k, v in cfg[2].items():
        setattr(x, k, v)
    _check(cfg, x, num_tokens=None if on_policy else int(x.loss_mask.sum()) + 7)


@pytest.mark.parametrize("cfg", CORE_CONFIGS + [("trb", {"trb_support": 3}, {})], ids=config_id)
def test_matches_reference_large_vocab_k_equals_v(cfg):
    """V > 16 exercises trb's top-16 truncation; K = V exercises full-vocabulary top-k."""
    x = make_inputs(3, B=2, T=3, V=24, K=24)
    for k, v in cfg[2].items():
        setattr(x, k, v)
    _check(cfg, x)


@settings(max_examples=25, deadline=None)
@given(
    cfg=st.sampled_from(CONFIGS),
    B=st.integers(1, 4),
    T=st.integers(1, 6),
    V=st.integers(2, 20),
    kfrac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
    on_policy=st.booleans(),
)
def test_matches_reference_random_shapes(cfg, B, T, V, kfrac, seed, on_policy):
    K = max(1, min(V, round(kfrac * V)))
    x = make_inputs(seed, B=B, T=T, V=V, K=K, on_policy=on_policy)
    for k, v in cfg[2].items():
        setattr(x, k, v)
    _check(cfg, x)


# ---------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------

REWARD_OBJECTIVES = ["opd", "clip_outlier", "mask_outlier", "entropy_opd", "eopd", "reopold", "fkl_outlier", "tropd"]


@pytest.mark.parametrize("name", REWARD_OBJECTIVES)
def test_reward_metrics(name):
    x = make_inputs(11, B=4, T=6, V=10, K=4)
    out, _ = run_impl(name, {}, x)
    ref = reference_metrics(x)
    m = out.metrics
    for key in ("loss", "k1_rkl", "frac_masked", "reward_min", "reward_p01"):
        assert key in m, f"{name}: metric {key!r} missing; got {sorted(m)}"
        assert isinstance(m[key], float), f"{name}: metric {key!r} is {type(m[key])}, not float"
    assert m["loss"] == pytest.approx(float(out.loss.detach()), rel=1e-9, abs=1e-12)
    for key in ("k1_rkl", "reward_min", "reward_p01"):
        assert m[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-9), f"{name}: {key}"


def _frac_masked_expected(name, x):
    sm = x.loss_mask & ~x.teacher_token_mask
    r = (x.teacher_logprobs - x.behavior_logprobs)[sm]
    tau = torch.log(torch.tensor(0.25, dtype=torch.float64))
    if name == "opd":
        return 0.0
    if name == "mask_outlier":
        return float((r <= tau).double().mean())
    if name in ("clip_outlier", "reopold"):
        return float((r < tau).double().mean())
    if name == "tropd":
        return float((~x.trust_mask[sm]).double().mean())
    raise KeyError(name)


@pytest.mark.parametrize("name", ["opd", "mask_outlier", "clip_outlier", "reopold", "tropd"])
def test_frac_masked(name):
    x = make_inputs(12, B=4, T=8, V=10, K=4)
    # make a good share of rewards fall below τ
    x.teacher_logprobs = x.teacher_logprobs - 1.0
    out, _ = run_impl(name, {}, x)
    assert out.metrics["frac_masked"] == pytest.approx(_frac_masked_expected(name, x), abs=1e-9)


def test_tropd_trust_metrics():
    x = make_inputs(13, B=4, T=8, V=10, K=4)
    out, _ = run_impl("tropd", {}, x)
    sm = x.loss_mask & ~x.teacher_token_mask
    m = out.metrics
    assert m["trust_frac"] == pytest.approx(float(x.trust_mask[sm].double().mean()), abs=1e-9)
    keys = [k for k in m if "p_trust" in k]
    assert keys, f"tropd reports no mean P_trust metric; got {sorted(m)}"
    ref = reference_metrics(x)["mean_p_trust"]
    assert any(m[k] == pytest.approx(ref, rel=1e-6) for k in keys), f"{ {k: m[k] for k in keys} } vs {ref}"


@pytest.mark.parametrize("cfg", CORE_CONFIGS, ids=config_id)
def test_float32_close_to_float64_reference(cfg):
    """In float32 the objectives stay within float32 accuracy of the float64 reference."""
    name, kw, extra = cfg
    x = make_inputs(5, B=3, T=6, V=11, K=4)
    for k, v in extra.items():
        setattr(x, k, v)
    ref_loss, ref_tl, ref_grad = run_ref(name, kw, x)
    x32 = fresh(
        x,
        student_logits=x.student_logits.detach().float(),
        behavior_logprobs=x.behavior_logprobs.float(),
        teacher_logprobs=x.teacher_logprobs.float(),
        teacher_topk_logprobs=x.teacher_topk_logprobs.float(),
        teacher_entropy=x.teacher_entropy.float(),
        teacher_logits=x.teacher_logits.float(),
    )
    out, grad = run_impl(name, kw, x32)
    assert out.loss.dtype == torch.float32 and out.token_losses.dtype == torch.float32
    assert_close(out.token_losses.detach(), ref_tl, rtol=1e-4, atol=1e-5, msg=config_id(cfg))
    assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6, msg=config_id(cfg))


def _live_inputs(cfg):
    """Inputs whose b is the live s (autograd history into the student logits) and whose teacher tensors are
    grad-requiring leaves, plus the result with ordinary detached inputs."""
    name, kw, extra = cfg
    x = make_inputs(9, B=2, T=5, V=8, K=3, on_policy=True)
    for k, v in extra.items():
        setattr(x, k, v)
    out_ref, g_ref = run_impl(name, kw, x)
    leaf = x.student_logits.detach().clone().requires_grad_(True)
    s_live = torch.log_softmax(leaf, -1).gather(-1, x.tokens.unsqueeze(-1)).squeeze(-1)  # b = s, not detached
    teacher = {k: getattr(x, k).detach().clone().requires_grad_(True)
               for k in ("teacher_logprobs", "teacher_topk_logprobs", "teacher_entropy", "teacher_logits")}
    y = fresh(x, behavior_logprobs=s_live, **teacher)
    y.student_logits = leaf
    out = build(name, kw, 3)(y)
    out.loss.backward()
    return out, leaf.grad, teacher, out_ref, g_ref


@pytest.mark.parametrize("cfg", CORE_CONFIGS, ids=config_id)
def test_behavior_and_teacher_inputs_are_constants_for_the_student(cfg):
    """b, q and the teacher tensors act as constants (sg): passing b = s with autograd history, or teacher
    tensors that require grad, changes neither the loss nor the student gradient."""
    out, g, _, out_ref, g_ref = _live_inputs(cfg)
    assert_close(out.token_losses.detach(), out_ref.token_losses.detach(), rtol=1e-12, atol=1e-15)
    assert_close(g, g_ref, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("cfg", CORE_CONFIGS, ids=config_id)
def test_no_gradient_reaches_teacher_inputs(cfg):
    """docs/method.md §1: teacher quantities are detached; a teacher tensor with autograd history (self-distillation with
    shared weights, a teacher pass outside no_grad) must receive no gradient."""
    _, _, teacher, _, _ = _live_inputs(cfg)
    for k, t in teacher.items():
        assert t.grad is None or bool((t.grad == 0).all()), f"gradient reached {k}"


@pytest.mark.parametrize("cfg", CORE_CONFIGS, ids=config_id)
def test_bfloat16_logits_computed_in_float32(cfg):
    """docs/method.md §2: terms are computed in float32 from log-softmax. bf16 student logits give exactly the float32
    result of the same (upcast) logits; the gradient is that float32 gradient rounded to bf16."""
    name, kw, extra = cfg
    x = make_inputs(10, B=2, T=4, V=40, K=5)
    for k, v in extra.items():
        setattr(x, k, v)
    bf = x.student_logits.detach().bfloat16()
    f32 = {k: getattr(x, k).float() for k in
           ("behavior_logprobs", "teacher_logprobs", "teacher_topk_logprobs", "teacher_entropy", "teacher_logits")}
    xb = fresh(x, student_logits=bf, **f32)
    xf = fresh(x, student_logits=bf.float(), **f32)
    ob, gb = run_impl(name, kw, xb)
    of, gf = run_impl(name, kw, xf)
    assert ob.token_losses.dtype == torch.float32 and ob.loss.dtype == torch.float32
    assert_close(ob.token_losses.detach(), of.token_losses.detach(), rtol=0, atol=0)
    assert gb.dtype == torch.bfloat16
    assert_close(gb.float(), gf.bfloat16().float(), rtol=1e-2, atol=1e-6)


def test_diagnostic_metrics():
    """docs/method.md §7 diagnostics: student entropy, teacher top-k mass at student positions, reward median, and the
    tropd loss split by region (trust + outlier + guidance = loss)."""
    x = make_inputs(14, B=4, T=6, V=10, K=4)
    out, _ = run_impl("tropd", {}, x)
    m = out.metrics
    sm = x.loss_mask & ~x.teacher_token_mask
    lp = torch.log_softmax(x.student_logits.detach(), -1)
    h = -(lp.exp() * lp).sum(-1)
    r = (x.teacher_logprobs - x.behavior_logprobs)[sm]
    assert m["student_entropy"] == pytest.approx(float(h[sm].mean()), rel=1e-9)
    assert m["teacher_topk_mass"] == pytest.approx(float(x.teacher_topk_logprobs.exp().sum(-1)[sm].mean()), rel=1e-9)
    assert m["reward_p50"] == pytest.approx(float(torch.quantile(r, 0.5)), rel=1e-9)
    parts = m["loss_trust"] + m["loss_outlier"] + m["loss_guidance"]
    assert parts == pytest.approx(m["loss"], rel=1e-9, abs=1e-12)


def test_metrics_finite_with_no_loss_positions():
    x = make_inputs(15, B=2, T=3, V=6, K=2, loss_mask=torch.zeros(2, 3, dtype=torch.bool))
    x.progress = 0.3
    for name, kw, _ in CORE_CONFIGS:
        out, _ = run_impl(name, kw, x)
        bad = {k: v for k, v in out.metrics.items() if not (isinstance(v, float) and torch.isfinite(torch.tensor(v)))}
        assert not bad, f"{name}: {bad}"
        assert out.metrics["loss"] == 0.0


@pytest.mark.parametrize("name", ["opd", "tropd", "gkd"])
def test_num_tokens_forms(name):
    """num_tokens may be an int, a float or a (reduced) tensor; 0 gives loss 0, not NaN."""
    kw = {"beta": 0.5} if name == "gkd" else {}
    x = make_inputs(16, B=2, T=4, V=7, K=3)
    a, ga = run_impl(name, kw, x, num_tokens=37)
    for n in (37.0, torch.tensor(37), torch.tensor(37.0, dtype=torch.float64)):
        b, gb = run_impl(name, kw, x, num_tokens=n)
        assert_close(b.loss.detach(), a.loss.detach(), rtol=1e-12, atol=0)
        assert_close(gb, ga, rtol=1e-12, atol=0)
    y = make_inputs(16, B=2, T=4, V=7, K=3, loss_mask=torch.zeros(2, 4, dtype=torch.bool))
    z, gz = run_impl(name, kw, y, num_tokens=0)
    assert float(z.loss.detach()) == 0.0 and bool((gz == 0).all())
