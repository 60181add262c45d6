"""Input checks: an objective call either gets finite numbers at its loss positions or fails naming the input.

NaN/±inf at a loss position (−inf allowed only in the top-k log-probs), top-k ids out of range or repeated, token
ids out of range, bad ``num_tokens`` / ``progress``: :class:`NonFiniteInputError` (a ``ValueError``) naming the
input. The same values at padding change nothing: no error, and the same loss, token losses and gradient.
"""

from __future__ import annotations

import math

import pytest
import torch

from tropd.objectives import get_objective, list_objectives
from tropd.objectives.checks import check_inputs
from tropd.objectives.errors import NonFiniteInputError

from .helpers import DEFAULT_CONFIGS, all_finite, build, config_id, fresh, make_inputs, run_impl

B, T, V, K = 2, 4, 8, 3
LOSS_MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
TEACHER_MASK = torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
STUDENT_POS, TEACHER_POS, PAD_POS = (1, 0), (0, 1), (1, 2)
#: entry of the K (or V) axis that gets the bad value
ENTRY = {"teacher_topk_logprobs": 1, "teacher_topk_ids": 1, "student_logits": 3, "teacher_logits": 5}
NAN, INF = float("nan"), float("inf")


def needed_inputs(name: str, kw: dict) -> list[str]:
    """Float inputs the pipeline gives ``name`` (its Needs), plus the always-recorded behaviour log-probs."""
    needs = build(name, kw, K).needs
    out = ["student_logits", "behavior_logprobs"]
    out += ["teacher_logprobs"] * needs.teacher_logprobs + ["teacher_topk_logprobs"] * needs.teacher_topk
    out += ["teacher_entropy"] * needs.teacher_entropy + ["teacher_logits"] * needs.teacher_logits
    return out


def pipeline_inputs(cfg, seed: int = 3, dtype=torch.float32):
    """Inputs as the trainer builds them for ``cfg``: only what its Needs asks for, fixed masks."""
    name, kw, extra = cfg
    x = make_inputs(seed, B, T, V, K, dtype=dtype, loss_mask=LOSS_MASK, teacher_mask=TEACHER_MASK)
    needs = build(name, kw, K).needs
    drop = {}
    if not needs.teacher_logprobs:
        drop["teacher_logprobs"] = None
    if not needs.teacher_topk:
        drop["teacher_topk_ids"] = drop["teacher_topk_logprobs"] = None
    if not needs.teacher_entropy:
        drop["teacher_entropy"] = None
    if not needs.teacher_logits:
        drop["teacher_logits"] = None
    return fresh(x, progress=extra.get("progress"), **drop)


def with_value(x, field: str, pos: tuple[int, int], value):
    """A copy of ``x`` with ``field[pos]`` (one entry of it for [B,T,K] / [B,T,V] fields) set to ``value``."""
    t = getattr(x, field).detach().clone()
    index = pos + (ENTRY[field],) if t.dim() == 3 else pos
    t[index] = value
    return fresh(x, **{field: t})


CASES = [(cfg, field) for cfg in DEFAULT_CONFIGS for field in needed_inputs(cfg[0], cfg[1])]
CASE_IDS = [f"{config_id(cfg)}-{field}" for cfg, field in CASES]
TOPK_CONFIGS = [cfg for cfg in DEFAULT_CONFIGS if build(cfg[0], cfg[1], K).needs.teacher_topk]


def test_every_registered_objective_is_swept():
    assert sorted(c[0] for c in DEFAULT_CONFIGS) == list_objectives()
    assert {f for _, f in CASES} == {"student_logits", "behavior_logprobs", "teacher_logprobs",
                                     "teacher_topk_logprobs", "teacher_entropy", "teacher_logits"}


def _rejected(field: str, value: float) -> bool:
    return not (field == "teacher_topk_logprobs" and value == -INF)


@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("cfg, field", CASES, ids=CASE_IDS)
def test_nonfinite_at_a_loss_position_is_rejected_naming_the_input(cfg, field, value):
    name, kw, _ = cfg
    x = with_value(pipeline_inputs(cfg), field, STUDENT_POS, value)
    if not _rejected(field, value):  # a teacher top-k probability of exactly 0: allowed, contributes 0
        out, grad = run_impl(name, kw, x)
        assert all_finite(out.loss.detach()) and all_finite(out.token_losses.detach()) and all_finite(grad)
        return
    with pytest.raises(NonFiniteInputError, match=rf"TokenInputs\.{field} has 1 .* at loss positions") as err:
        run_impl(name, kw, x)
    assert "first at batch 1, position 0" in str(err.value)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("cfg, field", CASES, ids=CASE_IDS)
def test_nonfinite_at_padding_changes_nothing(cfg, field, value):
    name, kw, _ = cfg
    x = pipeline_inputs(cfg)
    clean, g_clean = run_impl(name, kw, x)
    out, grad = run_impl(name, kw, with_value(x, field, PAD_POS, value))
    assert all_finite(out.loss.detach()) and all_finite(out.token_losses.detach()) and all_finite(grad)
    assert torch.equal(out.token_losses.detach(), clean.token_losses.detach())
    assert torch.equal(grad, g_clean)
    assert out.metrics == clean.metrics


@pytest.mark.parametrize("chunk_size", [None, 2], ids=["unchunked", "chunked"])
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "+inf", "-inf"])
def test_nonfinite_student_padding_rows_get_zero_gradient(value, chunk_size):
    """The unchunked log-softmax visits padding rows: their NaN/inf must not become a NaN gradient."""
    x = pipeline_inputs(("tropd", {}, {}))
    logits = x.student_logits.detach().clone()
    logits[PAD_POS] = value  # a whole row
    logits[0, 3, :2] = value
    clean, g_clean = run_impl("tropd", {"chunk_size": chunk_size}, x)
    out, grad = run_impl("tropd", {"chunk_size": chunk_size}, fresh(x, student_logits=logits))
    assert torch.equal(grad, g_clean) and float(grad[~LOSS_MASK].abs().sum()) == 0.0
    assert torch.equal(out.loss, clean.loss) and out.metrics == clean.metrics


def test_teacher_prefix_positions_are_loss_positions():
    x = with_value(pipeline_inputs(("tropd", {}, {})), "teacher_topk_logprobs", TEACHER_POS, NAN)
    with pytest.raises(NonFiniteInputError, match=r"teacher_topk_logprobs .* \(first at batch 0, position 1"):
        run_impl("tropd", {}, x)


def test_inputs_the_loss_does_not_read_are_checked_too():
    """Every given input is checked (the common metrics read rewards and the top-k mass of any objective)."""
    x = make_inputs(4, B, T, V, K, loss_mask=LOSS_MASK, teacher_mask=TEACHER_MASK)
    with pytest.raises(NonFiniteInputError, match="teacher_entropy"):
        run_impl("opd", {}, with_value(x, "teacher_entropy", STUDENT_POS, NAN))
    with pytest.raises(NonFiniteInputError, match="teacher_logprobs"):
        run_impl("sft", {}, with_value(x, "teacher_logprobs", STUDENT_POS, -INF))


def test_a_nan_teacher_names_every_input_it_spoiled():
    x = make_inputs(5, B, T, V, K, loss_mask=LOSS_MASK, teacher_mask=TEACHER_MASK)
    nan = {f: torch.full_like(getattr(x, f), NAN)
           for f in ("teacher_logprobs", "teacher_topk_logprobs", "teacher_entropy", "teacher_logits")}
    with pytest.raises(NonFiniteInputError) as err:
        run_impl("eopd", {}, fresh(x, **nan))
    msg = str(err.value)
    assert msg.startswith("TokenInputs.teacher_logprobs has 5 NaN/inf values at loss positions")
    assert "also rejected: teacher_topk_logprobs, teacher_entropy, teacher_logits" in msg


@pytest.mark.parametrize("bad_id", [-1, V, V + 100])
@pytest.mark.parametrize("cfg", TOPK_CONFIGS, ids=config_id)
def test_topk_ids_out_of_range(cfg, bad_id):
    name, kw, _ = cfg
    x = with_value(pipeline_inputs(cfg), "teacher_topk_ids", STUDENT_POS, bad_id)
    with pytest.raises(NonFiniteInputError,
                       match=rf"teacher_topk_ids has 1 id outside \[0, V={V}\) .*top-k entry 1: id {bad_id}\)"):
        run_impl(name, kw, x)


@pytest.mark.parametrize("cfg", TOPK_CONFIGS, ids=config_id)
def test_topk_ids_repeated(cfg):
    name, kw, _ = cfg
    x = pipeline_inputs(cfg)
    ids = x.teacher_topk_ids.clone()
    ids[STUDENT_POS + (2,)] = ids[STUDENT_POS + (0,)]
    with pytest.raises(NonFiniteInputError, match=r"teacher_topk_ids repeats an id at 1 loss position .* 2 times"):
        run_impl(name, kw, fresh(x, teacher_topk_ids=ids))


@pytest.mark.parametrize("cfg", TOPK_CONFIGS, ids=config_id)
def test_bad_topk_ids_at_padding_change_nothing(cfg):
    name, kw, _ = cfg
    x = pipeline_inputs(cfg)
    ids = x.teacher_topk_ids.clone()
    ids[PAD_POS] = torch.tensor([-5, V + 3, V + 3])
    clean, g_clean = run_impl(name, kw, x)
    out, grad = run_impl(name, kw, fresh(x, teacher_topk_ids=ids))
    assert torch.equal(out.token_losses.detach(), clean.token_losses.detach()) and torch.equal(grad, g_clean)


@pytest.mark.parametrize("bad_id", [-1, V])
@pytest.mark.parametrize("name", ["opd", "sft", "gkd"])
def test_tokens_out_of_range(name, bad_id):
    cfg = dict((c[0], c) for c in DEFAULT_CONFIGS)[name]
    x = pipeline_inputs(cfg)
    tokens = x.tokens.clone()
    tokens[STUDENT_POS] = bad_id
    with pytest.raises(NonFiniteInputError, match=rf"TokenInputs\.tokens has 1 id outside \[0, V={V}\)"):
        run_impl(name, cfg[1], fresh(x, tokens=tokens))
    tokens[STUDENT_POS] = x.tokens[STUDENT_POS]
    tokens[PAD_POS] = bad_id  # padding tokens are never read
    out, _ = run_impl(name, cfg[1], fresh(x, tokens=tokens))
    assert all_finite(out.loss.detach())


# -- shapes ----------------------------------------------------------------------------------------------------
def _topk_shape_cases():
    x = make_inputs(6, B, T, V, K)
    ids, lps = x.teacher_topk_ids, x.teacher_topk_logprobs
    return [
        ("ids K != log-probs K", {"teacher_topk_ids": ids[..., :2]}, r"teacher_topk_ids \(2, 4, 2\) and "
                                                                     r"teacher_topk_logprobs \(2, 4, 3\)"),
        ("log-probs K != ids K", {"teacher_topk_logprobs": lps[..., :1]}, r"must have the same shape \[B,T,K\]"),
        ("ids not [B,T]", {"teacher_topk_ids": ids[:, :3]}, r"teacher_topk_ids must start with \[B,T\]=\(2, 4\)"),
        ("log-probs not [B,T]", {"teacher_topk_logprobs": lps[:1]}, r"teacher_topk_logprobs must start with \[B,T\]"),
        ("ids [B,T]", {"teacher_topk_ids": ids[..., 0]}, r"teacher_topk_ids must be \[B,T,K\]"),
        ("log-probs [B,T,K,1]", {"teacher_topk_logprobs": lps[..., None]}, r"teacher_topk_logprobs must be \[B,T,K\]"),
        ("float ids", {"teacher_topk_ids": ids.double()}, r"teacher_topk_ids must hold integer token ids"),
        ("only ids", {"teacher_topk_logprobs": None}, "must be given together"),
        ("[B,T,1] behaviour", {"behavior_logprobs": x.behavior_logprobs[..., None]},
         r"behavior_logprobs must be \[B,T\]=\(2, 4\), got \(2, 4, 1\)"),
    ]


@pytest.mark.parametrize("case", _topk_shape_cases(), ids=lambda c: c[0])
def test_mismatched_shapes_are_named_at_construction(case):
    _, change, message = case
    with pytest.raises(ValueError, match=message):
        fresh(make_inputs(6, B, T, V, K), **change)


@pytest.mark.parametrize("case", _topk_shape_cases(), ids=lambda c: c[0])
def test_mismatched_shapes_are_named_at_call_after_reassignment(case):
    _, change, message = case
    x = make_inputs(6, B, T, V, K)
    for field, value in change.items():
        setattr(x, field, value)
    with pytest.raises(ValueError, match=message):
        get_objective("tropd", top_k=K)(x)


# -- num_tokens and progress ---------------------------------------------------------------------------------
BAD_NUM_TOKENS = [0, -1, -0.5, NAN, INF, -INF, torch.tensor(NAN), torch.tensor(0), torch.tensor(-3.0)]


@pytest.mark.parametrize("num_tokens", BAD_NUM_TOKENS, ids=repr)
@pytest.mark.parametrize("cfg", DEFAULT_CONFIGS, ids=config_id)
def test_bad_num_tokens(cfg, num_tokens):
    name, kw, _ = cfg
    with pytest.raises(NonFiniteInputError, match="num_tokens must be a positive finite number"):
        run_impl(name, kw, pipeline_inputs(cfg), num_tokens=num_tokens)


def test_num_tokens_wrong_kind():
    x = pipeline_inputs(("opd", {}, {}))
    with pytest.raises(ValueError, match=r"num_tokens must be a single number, got a tensor of shape \(2,\)"):
        run_impl("opd", {}, x, num_tokens=torch.tensor([3.0, 4.0]))
    with pytest.raises(TypeError, match="num_tokens must be a number"):
        run_impl("opd", {}, x, num_tokens="7")


@pytest.mark.parametrize("num_tokens", [5, 5.0, 100, torch.tensor(5), torch.tensor(12.0)], ids=repr)
def test_good_num_tokens(num_tokens):
    out, grad = run_impl("tropd", {}, pipeline_inputs(("tropd", {}, {})), num_tokens=num_tokens)
    assert out.num_tokens == float(num_tokens) and all_finite(out.loss.detach()) and all_finite(grad)


def test_zero_num_tokens_is_accepted_for_a_batch_without_loss_positions():
    """A step whose rollouts are all empty has a global count of 0: the loss is the empty sum, 0."""
    x = fresh(pipeline_inputs(("opd", {}, {})), loss_mask=torch.zeros(B, T, dtype=torch.bool))
    out, grad = run_impl("opd", {}, x, num_tokens=0)
    assert float(out.loss.detach()) == 0.0 and float(grad.abs().sum()) == 0.0


@pytest.mark.parametrize("progress", [NAN, INF])
def test_nonfinite_progress(progress):
    x = fresh(pipeline_inputs(("reopold_2stage", {}, {"progress": 0.3})), progress=progress)
    with pytest.raises(NonFiniteInputError, match="TokenInputs.progress must be a finite"):
        run_impl("reopold_2stage", {}, x)


# -- the fast path -------------------------------------------------------------------------------------------
def test_huge_finite_logits_pass_the_exact_scan():
    """A row sum can overflow for finite logits; the exact scan then finds nothing and the check passes."""
    x = make_inputs(7, B, T, V, K, dtype=torch.float32)
    logits = x.student_logits.detach().clone()
    logits[0, 0] = 3e38
    assert math.isinf(float(logits[0, 0].sum()))
    y = fresh(x, student_logits=logits)
    assert check_inputs(y) is y.student_logits


def test_clean_inputs_pass_unchanged():
    x = make_inputs(8, B, T, V, K, loss_mask=LOSS_MASK)
    assert check_inputs(x, num_tokens=3) is x.student_logits
