"""Each objective's declared Needs is sufficient: with every undeclared teacher input absent it still runs and
gives the same result (the pipeline computes only what Needs asks for)."""

from __future__ import annotations

import pytest
import torch

from tropd.objectives import get_objective

from .helpers import CORE_CONFIGS, assert_close, build, config_id, fresh, make_inputs, run_impl


@pytest.mark.parametrize("cfg", CORE_CONFIGS, ids=config_id)
def test_declared_needs_suffice(cfg):
    name, kw, extra = cfg
    x = make_inputs(100, B=2, T=4, V=8, K=3)
    x.progress = 0.3
    for k, v in extra.items():
        setattr(x, k, v)
    needs = build(name, kw, 3).needs
    drop = {}
    if not needs.teacher_logprobs:
        drop["teacher_logprobs"] = None
    if not needs.teacher_topk:
        drop["teacher_topk_ids"] = None
        drop["teacher_topk_logprobs"] = None
    else:
        assert needs.top_k == 3, f"{name}: Needs.top_k {needs.top_k} != top_k keyword 3"
    if not needs.teacher_entropy:
        drop["teacher_entropy"] = None
    if not needs.teacher_logits:
        drop["teacher_logits"] = None
    if not needs.progress and "progress" not in extra:
        drop["progress"] = None
    full, g_full = run_impl(name, kw, x)
    part, g_part = run_impl(name, kw, fresh(x, **drop))
    assert_close(part.token_losses.detach(), full.token_losses.detach(), rtol=0, atol=0)
    assert_close(g_part, g_full, rtol=0, atol=0)


def test_needs_flags():
    assert get_objective("tropd").needs.guidance
    assert get_objective("tropd").needs.teacher_topk
    assert not get_objective("tropd", outlier="mask").needs.teacher_topk
    assert not get_objective("tropd", outlier="clip").needs.teacher_topk
    assert get_objective("reopold_2stage").needs.progress
    assert get_objective("gkd").needs.teacher_logits
    assert get_objective("trb").needs.teacher_logits
    assert get_objective("eopd").needs.teacher_entropy
    assert get_objective("tropd", top_k=17).needs.top_k == 17


def test_reopold_2stage_without_stage_or_progress_names_progress():
    x = make_inputs(101, B=2, T=3, V=6, K=2)
    x.progress = None
    with pytest.raises(ValueError, match="progress"):
        run_impl("reopold_2stage", {}, x)


def test_reopold_2stage_switches_at_half():
    x = make_inputs(102, B=3, T=6, V=8, K=2)
    x.teacher_logprobs = x.teacher_logprobs - 1.0
    outs = {}
    for prog in (0.0, 0.4999, 0.5, 1.0):
        outs[prog] = run_impl("reopold_2stage", {}, fresh(x, progress=prog))[0].token_losses.detach()
    s1 = run_impl("reopold_2stage", {"stage": 1}, x)[0].token_losses.detach()
    s2 = run_impl("reopold_2stage", {"stage": 2}, x)[0].token_losses.detach()
    assert not torch.equal(s1, s2)
    for prog, tl in outs.items():
        assert torch.equal(tl, s1 if prog < 0.5 else s2), prog


def test_gkd_mixed_needs_its_on_policy_fraction_with_a_clear_error():
    """GKD's λ has no default in Needs (the gkd objective passes its lmbda): leaving it out, or giving it to
    another rollout kind, is one error saying which."""
    from tropd.needs import Needs

    assert get_objective("gkd").needs.on_policy_fraction == 0.5  # the objective's documented default lmbda
    assert get_objective("gkd", lmbda=0.25).needs.on_policy_fraction == 0.25
    with pytest.raises(ValueError, match=r"Needs\(rollout='gkd_mixed'\) requires on_policy_fraction: GKD's λ"):
        Needs(teacher_logits=True, rollout="gkd_mixed")
    with pytest.raises(ValueError, match=r"on_policy_fraction=0.5 applies only to rollout='gkd_mixed'.*'student'"):
        Needs(on_policy_fraction=0.5)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\], got 1.5"):
        Needs(rollout="gkd_mixed", on_policy_fraction=1.5)
