"""GKD mixing and the sample_for_needs dispatcher (Needs.rollout / Needs.guidance -> sampler)."""

from __future__ import annotations

import pytest
import torch

from tests.rollout.conftest import RaisingTeacher, fresh_logits, make_cfg, row_response
from tropd.objectives.registry import Needs
from tropd.rollout import GuidanceConfig, TRBConfig, sample, sample_for_needs, sample_gkd_mixed, sample_teacher
from tropd.teacher import InProcessTeacher


def _assert_logprobs_of(model, prompt, resp, got):
    lp = torch.log_softmax(fresh_logits(model, prompt, resp), -1).gather(-1, torch.tensor(resp)[:, None])[:, 0]
    torch.testing.assert_close(got[:len(resp)], lp, atol=1e-5, rtol=0)


def test_gkd_mixed_rows(student, teacher, prompts):
    prompts = prompts * 3
    cfg = make_cfg(max_new_tokens=6)
    b = sample_gkd_mixed(student, InProcessTeacher(teacher), prompts, cfg, lmbda=0.5, streams=4)
    assert 0 < int(b.teacher_rows.sum()) < len(prompts), "premise: both sources present"
    assert not b.teacher_token_mask.any()  # GKD does not tag teacher-written tokens
    assert torch.equal(b.loss_mask.sum(1), b.response_lengths)
    for i, prompt in enumerate(prompts):
        _assert_logprobs_of(teacher if b.teacher_rows[i] else student, prompt, row_response(b, i),
                            b.behavior_logprobs[i])
    assert b.stats()["teacher_row_share"] == pytest.approx(float(b.teacher_rows.float().mean()))


def test_gkd_extremes(student, teacher, prompts):
    cfg = make_cfg(max_new_tokens=5)
    on_policy = sample_gkd_mixed(student, RaisingTeacher(), prompts, cfg, lmbda=1.0, streams=3)
    plain = sample(student, prompts, cfg, streams=3)
    assert torch.equal(on_policy.tokens, plain.tokens) and not on_policy.teacher_rows.any()
    off_policy = sample_gkd_mixed(student, InProcessTeacher(teacher), prompts, cfg, lmbda=0.0, streams=3)
    assert off_policy.teacher_rows.all()
    written = sample_teacher(InProcessTeacher(teacher), prompts, cfg, streams=3)
    assert torch.equal(off_policy.tokens, written.tokens)  # its streams
    with pytest.raises(ValueError):
        sample_gkd_mixed(student, InProcessTeacher(teacher), prompts, cfg, lmbda=1.5)


def _sample(student, teacher, prompts, needs, step=0, **kw):
    teacher = InProcessTeacher(teacher) if isinstance(teacher, torch.nn.Module) else teacher
    return sample_for_needs(student, teacher, prompts, make_cfg(max_new_tokens=6), needs, step=step,
                            total_steps=10, streams=5, **kw)


def test_dispatch_plain_and_guidance(student, teacher, prompts):
    plain = sample(student, prompts, make_cfg(max_new_tokens=6), streams=5)
    b = _sample(student, RaisingTeacher(), prompts, Needs())
    assert torch.equal(b.tokens, plain.tokens)
    b = _sample(student, None, prompts, Needs(guidance=True), guidance_settings=GuidanceConfig(enabled=False))
    assert torch.equal(b.tokens, plain.tokens)
    b = _sample(student, teacher, prompts * 2, Needs(guidance=True))
    assert b.guidance_lengths.gt(0).any() and b.info["guidance_cap"] == 6
    assert torch.equal(b.teacher_token_mask.sum(1), b.guidance_lengths)
    late = _sample(student, RaisingTeacher(), prompts, Needs(guidance=True), step=10)
    assert late.guidance_lengths.eq(0).all()


def test_dispatch_trb(student, teacher, prompts):
    needs = Needs(teacher_logits=True, rollout="trb_blend")
    settings = TRBConfig(eps0=0.04, warmup_steps=4, iters=50)
    b = _sample(student, teacher, prompts, needs, step=2, trb_settings=settings)
    assert b.blend_beta is not None and b.info["trb_eps"] == pytest.approx(0.02)
    after = _sample(student, RaisingTeacher(), prompts, needs, step=4, trb_settings=settings)
    assert after.blend_beta is None and after.info["trb_eps"] == 0.0


def test_dispatch_gkd_and_teacher(student, teacher, prompts):
    b = _sample(student, teacher, prompts, Needs(teacher_logits=True, rollout="gkd_mixed", on_policy_fraction=0.0))
    assert b.teacher_rows.all() and not b.teacher_token_mask.any()
    with pytest.raises(ValueError, match="on_policy_fraction"):
        _sample(student, teacher, prompts, Needs(rollout="gkd_mixed"))
    sft = _sample(student, teacher, prompts, Needs(teacher_logprobs=False, rollout="teacher"))
    assert torch.equal(sft.teacher_token_mask, sft.loss_mask) and sft.teacher_rows.all()
    assert torch.equal(sft.guidance_lengths, sft.response_lengths)
    for i, prompt in enumerate(prompts):
        _assert_logprobs_of(teacher, prompt, row_response(sft, i), sft.behavior_logprobs[i])


def test_dispatch_errors(student, teacher, prompts):
    with pytest.raises(ValueError, match="guidance"):
        _sample(student, teacher, prompts, Needs(guidance=True, rollout="trb_blend"))
    with pytest.raises(ValueError, match="teacher"):
        _sample(student, None, prompts, Needs(guidance=True))
