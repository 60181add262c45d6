"""tropd.teacher.scoring: one chunked no-grad teacher pass, checked against a float64 reference from full logits."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
import torch

from tests.helpers import TINY_MODELS, tiny_llama
from tests.teacher.test_forward import padded_batch
from tropd.forward import response_logits
from tropd.objectives.inputs import TokenInputs
from tropd.objectives.registry import Needs
from tropd.teacher.scoring import TeacherScores, entropy_from_logprobs, score_with_teacher

ALL = Needs(teacher_logprobs=True, teacher_topk=True, teacher_entropy=True, teacher_logits=True, top_k=5)


def reference(model, ids, mask, P, k):
    """Float64 log-probs of the response tokens, top-k, entropy, straight from the full ``[B,T,V]`` logits."""
    with torch.no_grad():
        logits = response_logits(model, ids, mask, P).double()
    logp = torch.log_softmax(logits, -1)
    tokens = ids[:, P:]
    top = logp.topk(k, -1)
    return {
        "teacher_logits": logits,
        "teacher_logprobs": logp.gather(-1, tokens[..., None])[..., 0],
        "teacher_topk_ids": top.indices,
        "teacher_topk_logprobs": top.values,
        "teacher_entropy": -(logp.exp() * logp).sum(-1),
    }


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
@pytest.mark.parametrize("chunk_size", [1, 4, 512])
def test_scores_match_float64_reference(arch, chunk_size):
    model = TINY_MODELS[arch](seed=5)
    ids, mask, P = padded_batch()
    scores = score_with_teacher(model, ids, mask, P, ids[:, P:], ALL, chunk_size=chunk_size)
    ref = reference(model, ids, mask, P, k=5)
    for name, expected in ref.items():
        got = getattr(scores, name)
        assert got.shape == expected.shape, name
        if name == "teacher_topk_ids":
            assert got.dtype == torch.long and torch.equal(got, expected)
        else:
            assert got.dtype == torch.float32, name
            torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-5, msg=name)
    assert not any(getattr(scores, f.name).requires_grad for f in fields(scores))
    # not renormalised: top-5 mass is below 1, and the entropy is positive and at most log V
    assert (scores.teacher_topk_logprobs.exp().sum(-1) < 1).all()
    assert (scores.teacher_entropy > 0).all() and (scores.teacher_entropy <= math.log(64) + 1e-5).all()


def test_chunked_equals_unchunked():
    model = tiny_llama(seed=6)
    ids, mask, P = padded_batch()
    one = score_with_teacher(model, ids, mask, P, ids[:, P:], ALL, chunk_size=10_000)
    for chunk in (1, 2, 7):
        other = score_with_teacher(model, ids, mask, P, ids[:, P:], ALL, chunk_size=chunk)
        for f in fields(TeacherScores):
            # different chunk shapes may take different BLAS kernels: agree to float32 rounding, ids exactly
            torch.testing.assert_close(getattr(other, f.name), getattr(one, f.name), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "needs,present",
    [
        (Needs(), {"teacher_logprobs"}),
        (Needs(teacher_logprobs=False, teacher_entropy=True), {"teacher_entropy"}),
        (Needs(teacher_topk=True, top_k=3), {"teacher_logprobs", "teacher_topk_ids", "teacher_topk_logprobs"}),
        (Needs(teacher_logprobs=False, teacher_logits=True), {"teacher_logits"}),
        (Needs(teacher_logprobs=False), set()),
    ],
)
def test_only_needed_fields_are_computed(needs, present):
    ids, mask, P = padded_batch()
    scores = score_with_teacher(tiny_llama(), ids, mask, P, ids[:, P:], needs, chunk_size=3)
    assert {f.name for f in fields(scores) if getattr(scores, f.name) is not None} == present
    if needs.teacher_topk:
        assert scores.teacher_topk_ids.shape == (3, 5, 3)


def test_scores_splat_into_token_inputs():
    assert {f.name for f in fields(TeacherScores)} <= {f.name for f in fields(TokenInputs)}
    ids, mask, P = padded_batch()
    teacher = tiny_llama(seed=7)
    student = tiny_llama(seed=8)
    scores = score_with_teacher(teacher, ids, mask, P, ids[:, P:], ALL)
    inputs = TokenInputs(student_logits=response_logits(student, ids, mask, P), tokens=ids[:, P:], **scores.as_kwargs())
    assert inputs.teacher_topk_ids is scores.teacher_topk_ids  # no copies


def test_teacher_pass_takes_no_gradient_even_if_parameters_require_it():
    teacher = tiny_llama()
    assert all(p.requires_grad for p in teacher.parameters())
    ids, mask, P = padded_batch()
    scores = score_with_teacher(teacher, ids, mask, P, ids[:, P:], ALL)
    assert not scores.teacher_logprobs.requires_grad and not scores.teacher_logits.requires_grad
    # usable in a later backward (no_grad, not inference_mode)
    student_logits = torch.zeros(3, 5, 64, requires_grad=True)
    (scores.teacher_logits.softmax(-1) * student_logits.log_softmax(-1)).sum().backward()
    assert student_logits.grad is not None


def test_entropy_is_stable_at_extreme_logits():
    logits = torch.tensor(
        [[0.0, -1e4, 1e4, -float("inf")], [0.0, 0.0, 0.0, 0.0], [1e4, 1e4, -1e4, -1e4], [50.0, 0.0, -50.0, -1e4]]
    )
    logp = torch.log_softmax(logits, -1)
    h = entropy_from_logprobs(logp)
    assert torch.isfinite(h).all()
    expected = [0.0, math.log(4), math.log(2)]
    torch.testing.assert_close(h[:3], torch.tensor(expected), rtol=0, atol=1e-6)
    ref = logits[3].double()
    ref_logp = ref - ref.logsumexp(-1)
    torch.testing.assert_close(h[3].double(), -(ref_logp.exp() * ref_logp).sum(), rtol=1e-5, atol=1e-30)


def test_errors_name_the_setting():
    ids, mask, P = padded_batch()
    model = tiny_llama()
    with pytest.raises(ValueError, match="tokens must be"):
        score_with_teacher(model, ids, mask, P, ids[:, P + 1 :], Needs())
    with pytest.raises(ValueError, match="top_k=65 exceeds"):
        score_with_teacher(model, ids, mask, P, ids[:, P:], Needs(teacher_topk=True, top_k=65))
    with pytest.raises(ValueError, match="chunk_size"):
        score_with_teacher(model, ids, mask, P, ids[:, P:], Needs(), chunk_size=0)
