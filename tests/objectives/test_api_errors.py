"""Registry and input-validation errors of the objectives API."""

from __future__ import annotations

import pytest
import torch

from tropd.objectives import get_objective, list_objectives, objective_keywords

from .helpers import fresh, make_inputs, run_impl
from .reference import OBJECTIVES


def test_all_fourteen_objectives_registered():
    assert set(OBJECTIVES) <= set(list_objectives()), sorted(set(OBJECTIVES) - set(list_objectives()))
    assert len(OBJECTIVES) == 14


def test_unknown_objective_name():
    with pytest.raises(KeyError, match="no_such_objective"):
        get_objective("no_such_objective")


@pytest.mark.parametrize("name", OBJECTIVES)
def test_unknown_keyword_is_named(name):
    with pytest.raises(TypeError, match="bogus_knob"):
        get_objective(name, bogus_knob=1)


@pytest.mark.parametrize(
    "name, keywords",
    [
        ("tropd", {"top_k", "beta", "tau", "trust_mode", "outlier", "chunk_size"}),
        ("fkl_outlier", {"top_k", "trust_mode", "chunk_size"}),
        ("jsd", {"top_k", "jsd_beta", "chunk_size"}),
        ("eopd", {"top_k", "entropy_threshold", "chunk_size"}),
        ("entropy_opd", {"entropy_top_frac", "chunk_size"}),
        ("reopold_2stage", {"stage", "tau", "chunk_size"}),
        ("clip_outlier", {"tau", "chunk_size"}),
        ("mask_outlier", {"tau", "chunk_size"}),
        ("reopold", {"tau", "chunk_size"}),
        ("gkd", {"beta", "chunk_size"}),
        ("trb", {"trb_support", "chunk_size"}),
        ("fkl", {"top_k", "chunk_size"}),
    ],
)
def test_documented_keywords_accepted(name, keywords):
    assert keywords <= set(objective_keywords(name)), sorted(keywords - set(objective_keywords(name)))


def test_default_keyword_values():
    import math

    kw = objective_keywords("tropd")
    assert kw["beta"] == pytest.approx(1e-3)
    assert kw["tau"] == pytest.approx(math.log(0.2 / 0.8))
    assert kw["trust_mode"] == "sample"
    assert kw["outlier"] == "fkl"
    assert kw["top_k"] == 64
    assert objective_keywords("jsd")["jsd_beta"] == pytest.approx(0.5)
    assert objective_keywords("eopd")["entropy_threshold"] == pytest.approx(0.8)
    assert objective_keywords("entropy_opd")["entropy_top_frac"] == pytest.approx(0.2)
    assert objective_keywords("trb")["trb_support"] == 16


@pytest.mark.parametrize("name", ["tropd", "fkl_outlier"])
def test_bad_trust_mode(name):
    with pytest.raises(ValueError, match="trust_mode"):
        get_objective(name, trust_mode="sometimes")


def test_bad_outlier():
    with pytest.raises(ValueError, match="outlier"):
        get_objective("tropd", outlier="ignore")


def test_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        get_objective("opd", chunk_size=0)


def _without(x, *names):
    return fresh(x, **{n: None for n in names})


@pytest.mark.parametrize(
    "name, kw, drop, field",
    [
        ("tropd", {}, ("teacher_topk_ids", "teacher_topk_logprobs"), "teacher_topk_ids"),
        ("tropd", {}, ("teacher_logprobs",), "teacher_logprobs"),
        ("tropd", {}, ("behavior_logprobs",), "behavior_logprobs"),
        ("fkl_outlier", {}, ("teacher_topk_ids", "teacher_topk_logprobs"), "teacher_topk_ids"),
        ("fkl", {}, ("teacher_topk_ids", "teacher_topk_logprobs"), "teacher_topk_ids"),
        ("jsd", {}, ("teacher_topk_ids", "teacher_topk_logprobs"), "teacher_topk_ids"),
        ("eopd", {}, ("teacher_entropy",), "teacher_entropy"),
        ("eopd", {}, ("teacher_topk_ids", "teacher_topk_logprobs"), "teacher_topk_ids"),
        ("opd", {}, ("teacher_logprobs",), "teacher_logprobs"),
        ("opd", {}, ("behavior_logprobs",), "behavior_logprobs"),
        ("clip_outlier", {}, ("teacher_logprobs",), "teacher_logprobs"),
        ("mask_outlier", {}, ("teacher_logprobs",), "teacher_logprobs"),
        ("entropy_opd", {}, ("teacher_logprobs",), "teacher_logprobs"),
        ("reopold", {}, ("teacher_logprobs",), "teacher_logprobs"),
        ("reopold_2stage", {"stage": 1}, ("teacher_logprobs",), "teacher_logprobs"),
        ("gkd", {}, ("teacher_logits",), "teacher_logits"),
        ("trb", {}, ("teacher_logits",), "teacher_logits"),
    ],
)
def test_missing_required_input_names_field(name, kw, drop, field):
    x = make_inputs(0, B=2, T=3, V=6, K=2)
    x.progress = 0.3
    y = _without(x, *drop)
    with pytest.raises(ValueError, match=field):
        run_impl(name, kw, y)


@pytest.mark.parametrize("outlier", ["mask", "clip"])
def test_tropd_non_fkl_outlier_does_not_need_topk(outlier):
    x = make_inputs(1, B=2, T=3, V=6, K=2)
    y = _without(x, "teacher_topk_ids", "teacher_topk_logprobs", "teacher_entropy", "teacher_logits")
    out, grad = run_impl("tropd", {"outlier": outlier}, y)
    assert torch.isfinite(out.loss)


def test_sft_needs_no_teacher_scores():
    x = make_inputs(2, B=2, T=3, V=6, K=2)
    y = _without(x, "teacher_topk_ids", "teacher_topk_logprobs", "teacher_entropy", "teacher_logits",
                 "teacher_logprobs", "behavior_logprobs")
    out, _ = run_impl("sft", {}, y)
    assert torch.isfinite(out.loss)
