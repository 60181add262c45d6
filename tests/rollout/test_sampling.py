"""Plain KV-cached sampling: layout, EOS handling, exact behaviour log-probs, padding, cache, determinism."""

from __future__ import annotations

import pytest
import torch

from tests.rollout.conftest import EOS, PAD, fresh_logits, make_cfg, reference_transform, row_response
from tropd.rollout import RolloutBatch, RowStreams, decode, left_pad, position_ids_from_mask, sample, sampling_logprobs
from tropd.rollout.sampling import draw, inference_mode

MANY_EOS = tuple(range(1, 13))  # a large EOS set so that rows stop at different lengths


def test_left_pad_and_positions():
    ids, mask = left_pad([[4, 5, 6], [7]], pad_token_id=PAD)
    assert ids.tolist() == [[4, 5, 6], [PAD, PAD, 7]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    with pytest.raises(ValueError):
        left_pad([[1], []], PAD)


def test_batch_layout(student, prompts):
    cfg = make_cfg(max_new_tokens=8, eos=MANY_EOS)
    b = sample(student, prompts, cfg, streams=3)
    p = b.response_start
    assert p == max(len(x) for x in prompts)
    assert b.input_ids.shape == (len(prompts), p + b.tokens.shape[1])
    assert torch.equal(b.input_ids[:, p:], b.tokens)
    for i, prompt in enumerate(prompts):
        assert b.input_ids[i, p - len(prompt):p].tolist() == prompt
        assert b.input_ids[i, :p - len(prompt)].eq(PAD).all()
        assert b.attention_mask[i, :p].tolist() == [0] * (p - len(prompt)) + [1] * len(prompt)
    assert torch.equal(b.attention_mask[:, p:].bool(), b.loss_mask)
    assert torch.equal(b.prompt_lengths, torch.tensor([len(x) for x in prompts]))
    assert torch.equal(b.response_lengths, b.loss_mask.sum(1))
    assert not b.teacher_token_mask.any() and b.guidance_lengths.eq(0).all() and not b.teacher_rows.any()
    assert b.behavior_logprobs.dtype == torch.float32 and b.tokens.dtype == torch.long


def test_eos_stops_row_and_pads_after(student, prompts):
    cfg = make_cfg(max_new_tokens=12, eos=MANY_EOS)
    b = sample(student, prompts * 2, cfg, streams=1)
    eos_set = torch.tensor(MANY_EOS)
    stopped = [i for i in range(b.batch_size) if b.eos[i]]
    assert stopped, "premise: some row must hit EOS"
    assert any(int(b.response_lengths[i]) < b.tokens.shape[1] for i in stopped), "premise: a row stops early"
    for i in range(b.batch_size):
        n = int(b.response_lengths[i])
        resp = b.tokens[i, :n]
        # EOS is the last response token, carries loss, and nothing before it is an EOS
        assert bool(b.eos[i]) == bool(torch.isin(resp[-1:], eos_set).any())
        assert not torch.isin(resp[:-1], eos_set).any()
        assert b.loss_mask[i, :n].all() and not b.loss_mask[i, n:].any()
        assert b.tokens[i, n:].eq(PAD).all()
        assert b.behavior_logprobs[i, n:].eq(0).all()
        assert b.attention_mask[i, b.response_start + n:].eq(0).all()
        assert bool(b.truncated[i]) == (not b.eos[i] and n == cfg.max_new_tokens)
        assert bool(b.eos[i]) or bool(b.truncated[i])


def test_single_eos_id_and_truncation(student, prompts):
    cfg = make_cfg(max_new_tokens=5, eos=(EOS,))
    b = sample(student, prompts, cfg, streams=0)
    done = b.eos | b.truncated
    assert done.all() and not (b.eos & b.truncated).any()
    assert b.response_lengths[b.truncated].eq(5).all()


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5)])
def test_behavior_logprobs_equal_fresh_forward(student, prompts, temperature, top_p, kv_cache):
    cfg = make_cfg(max_new_tokens=10, eos=(EOS,), temperature=temperature, top_p=top_p, kv_cache=kv_cache)
    b = sample(student, prompts, cfg, streams=7)
    for i, prompt in enumerate(prompts):
        resp = row_response(b, i)
        ref = reference_transform(fresh_logits(student, prompt, resp), temperature, top_p)
        expected = ref.gather(-1, torch.tensor(resp)[:, None])[:, 0]
        assert torch.isfinite(expected).all(), "a sampled token lies outside the nucleus"
        torch.testing.assert_close(b.behavior_logprobs[i, :len(resp)].double(), expected, atol=1e-5, rtol=0)


def test_top_p_keeps_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    lp = sampling_logprobs(logits, 1.0, 0.8)
    assert torch.isinf(lp[0, 2:]).all()
    torch.testing.assert_close(lp[0, :2].exp(), torch.tensor([0.625, 0.375]))
    lp = sampling_logprobs(logits, 1.0, 0.81)  # 0.8 < p: the third token is needed
    assert torch.isfinite(lp[0, :3]).all() and torch.isinf(lp[0, 3])
    torch.testing.assert_close(sampling_logprobs(logits, 1.0, 1.0), torch.log_softmax(logits, -1))


def test_greedy_temperature_zero(student, prompts):
    cfg = make_cfg(max_new_tokens=6, eos=(EOS,), temperature=0.0)
    b = sample(student, prompts, cfg, streams=0)
    assert b.behavior_logprobs.eq(0).all()
    for i, prompt in enumerate(prompts):
        resp = row_response(b, i)
        assert fresh_logits(student, prompt, resp).argmax(-1).tolist() == resp


def test_left_padding_step_logits_equal_unpadded(student, prompts):
    """Every step's full next-token logits in the padded, cached batch equal an unpadded full forward."""
    cfg = make_cfg(max_new_tokens=8, eos=(EOS,))
    seen: list[torch.Tensor] = []

    def recording(logits):
        seen.append(logits[0].clone())
        return sampling_logprobs(logits[0]), None

    ids, mask = left_pad(prompts, PAD)
    with inference_mode(student):
        out = decode([student], ids, mask, cfg.max_new_tokens, cfg, recording,
                     RowStreams.of(5, len(prompts)).uniform("student", cfg.max_new_tokens))
    for i, prompt in enumerate(prompts):
        n = int(out.lengths[i])
        resp = out.tokens[i, :n].tolist()
        ref = fresh_logits(student, prompt, resp)
        got = torch.stack([seen[t][i] for t in range(n)])
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Reference draw, one row at a time in plain Python: the first token whose cumulative mass exceeds U·total."""
    out = []
    for p, ui in zip(probs.double().tolist(), u.tolist()):
        target, acc = ui * sum(p), 0.0
        out.append(next((v for v, pv in enumerate(p) if (acc := acc + pv) > target and pv > 0),
                        max(v for v, pv in enumerate(p) if pv > 0)))
    return torch.tensor(out)[:, None]


def _sample_without_cache(model, prompts, cfg, seed):
    """Reference sampler: full forward over the whole padded sequence at every step (no KV cache, no EOS)."""
    ids, mask = left_pad(prompts, PAD)
    uniforms = RowStreams.of(seed, len(prompts)).uniform("student", cfg.max_new_tokens)
    toks, lps = [], []
    with torch.no_grad():
        for t in range(cfg.max_new_tokens):
            logits = model(ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[:, -1]
            logp = sampling_logprobs(logits, cfg.temperature, cfg.top_p)
            tok = _inverse_cdf(logp.exp(), uniforms[:, t])
            toks.append(tok[:, 0])
            lps.append(logp.gather(-1, tok)[:, 0])
            ids = torch.cat([ids, tok], 1)
            mask = torch.cat([mask, torch.ones_like(tok)], 1)
    return torch.stack(toks, 1), torch.stack(lps, 1)


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
def test_kv_cache_decode_equals_no_cache(student, prompts, kv_cache):
    cfg = make_cfg(max_new_tokens=9, eos=(), temperature=0.9, top_p=0.95, kv_cache=kv_cache)
    b = sample(student, prompts, cfg, streams=11)
    tokens, lps = _sample_without_cache(student, prompts, cfg, 11)
    assert torch.equal(b.tokens, tokens)
    torch.testing.assert_close(b.behavior_logprobs, lps, atol=1e-5, rtol=0)
    assert b.truncated.all() and not b.eos.any()


def test_deterministic_given_streams(student, prompts):
    cfg = make_cfg(max_new_tokens=10, eos=MANY_EOS, top_p=0.9)
    a = sample(student, prompts, cfg, streams=42)
    b = sample(student, prompts, cfg, streams=42)
    c = sample(student, prompts, cfg, streams=43)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.behavior_logprobs, b.behavior_logprobs)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.eos, b.eos)
    assert a.tokens.shape != c.tokens.shape or not torch.equal(a.tokens, c.tokens)


def test_model_mode_restored(student, prompts):
    student.train()
    try:
        sample(student, prompts, make_cfg(max_new_tokens=2), streams=0)
        assert student.training
    finally:
        student.eval()


def test_zero_budget_gives_empty_responses(student, prompts):
    b = sample(student, prompts, make_cfg(max_new_tokens=0), streams=0)
    assert b.tokens.shape == (len(prompts), 0)
    assert b.response_lengths.eq(0).all() and b.truncated.all()


def test_per_row_budgets(student, prompts):
    cfg = make_cfg(max_new_tokens=10, eos=())
    ids, mask = left_pad(prompts, PAD)
    budgets = torch.tensor([0, 3, 7, 1])
    with inference_mode(student):
        out = decode([student], ids, mask, budgets, cfg, lambda lg: (sampling_logprobs(lg[0]), None),
                     torch.rand(len(prompts), 7, dtype=torch.float64))
    assert out.lengths.tolist() == budgets.tolist()
    assert out.tokens.shape[1] == 7 and out.truncated[1:].all()
    assert out.tokens[0].eq(PAD).all()


@pytest.mark.parametrize("every", [3, 5, 64])
def test_reading_the_stop_flag_less_often_changes_nothing(student, prompts, every):
    """On an accelerator decode reads "all rows stopped?" every few tokens; the output must not depend on it."""
    cfg = make_cfg(max_new_tokens=12, eos=MANY_EOS)
    ids, mask = left_pad(prompts * 2, PAD)
    u = torch.rand(len(prompts) * 2, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    budgets = torch.tensor([12, 3, 9, 12, 1, 12, 7, 12])

    def run(stop_check_every):
        with inference_mode(student):
            return decode([student], ids, mask, budgets, cfg, lambda lg: (sampling_logprobs(lg[0]), None), u,
                          stop_check_every=stop_check_every)

    ref, out = run(1), run(every)
    assert bool(ref.eos.any()) and int(ref.lengths.max()) < 12, "premise: every row stops before the budget"
    for name in ("tokens", "logprobs", "lengths", "eos", "truncated"):
        assert torch.equal(getattr(ref, name), getattr(out, name)), name


def test_from_rows_and_stats():
    from tropd.rollout import RolloutRow

    rows = [
        RolloutRow(torch.tensor([4, 5, EOS]), torch.tensor([-1.0, -2.0, -3.0]), guidance_length=2, eos=True),
        RolloutRow(torch.tensor([6, 7, 8, 9]), torch.tensor([-1.0] * 4), truncated=True),
        RolloutRow(torch.tensor([9, EOS]), torch.tensor([-0.5, -0.5]), eos=True, teacher_row=True),
    ]
    b = RolloutBatch.from_rows([[3], [3, 3], [2]], rows, PAD, info={"guidance_cap": 4})
    assert b.tokens.tolist() == [[4, 5, EOS, PAD], [6, 7, 8, 9], [9, EOS, PAD, PAD]]
    assert b.teacher_token_mask.tolist() == [[True, True, False, False], [False] * 4, [False] * 4]
    s = b.stats()
    assert s["response_len_mean"] == pytest.approx(3.0)
    assert s["eos_rate"] == pytest.approx(2 / 3) and s["truncation_rate"] == pytest.approx(1 / 3)
    assert s["guided_share"] == pytest.approx(1 / 3) and s["guidance_len_mean"] == pytest.approx(2.0)
    assert s["generated_tokens"] == 9 and s["teacher_tokens"] == 4
    assert s["teacher_row_share"] == pytest.approx(1 / 3) and s["guidance_cap"] == 4
    assert b.position_ids()[1].tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_sliding_window_models_match_fresh_forward(arch, kv_cache):
    """Left padding + KV cache on models with sliding-window layers (window 4 < context length)."""
    helpers = pytest.importorskip("tests.helpers")
    model = helpers.TINY_MODELS[arch](seed=2)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16, 17, 18, 19, 20, 21]]
    cfg = make_cfg(max_new_tokens=8, eos=(), kv_cache=kv_cache)
    b = sample(model, prompts, cfg, streams=4)
    for i, prompt in enumerate(prompts):
        resp = row_response(b, i)
        expected = torch.log_softmax(fresh_logits(model, prompt, resp), -1).gather(-1, torch.tensor(resp)[:, None])
        torch.testing.assert_close(b.behavior_logprobs[i, :len(resp)], expected[:, 0], atol=1e-5, rtol=0)


def test_stats_aggregate_micro_batches():
    from tropd.rollout import RolloutRow, rollout_stats

    def one(n_tok, eos, guided, teacher_gen):
        row = RolloutRow(torch.arange(4, 4 + n_tok), torch.zeros(n_tok), guidance_length=guided, eos=eos,
                         truncated=not eos)
        return RolloutBatch.from_rows([[3]], [row], PAD, info={"teacher_generated_tokens": teacher_gen,
                                                               "guidance_cap": 6})

    a, b = one(2, True, 1, 5), one(6, False, 0, 2)
    s = rollout_stats([a, b])
    assert s["response_len_mean"] == 4.0 and s["eos_rate"] == 0.5 and s["truncation_rate"] == 0.5
    assert s["guided_share"] == 0.5 and s["guidance_len_mean"] == 1.0 and s["generated_tokens"] == 8
    assert s["teacher_generated_tokens"] == 7 and s["guidance_cap"] == 6
    assert rollout_stats(a)["generated_tokens"] == 2


def test_unknown_kv_cache_is_refused():
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        make_cfg(kv_cache="paged")


def test_inverse_cdf_draw_follows_the_distribution_and_never_draws_a_zero():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3, 0.0])
    u = torch.rand(40_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tok = draw(probs.log().expand(len(u), -1), u)
    freq = torch.bincount(tok, minlength=5).double() / len(u)
    torch.testing.assert_close(freq, probs.double(), atol=0.01, rtol=0)
    assert freq[1] == 0 and freq[4] == 0
    edge = torch.tensor([0.0, 1.0 - 2.0**-53])  # the ends of [0, 1): first and last tokens of positive mass
    assert draw(probs.log().expand(2, -1), edge).tolist() == [0, 3]
    point = torch.full((1, 5), float("-inf")).index_fill(1, torch.tensor([2]), 0.0)  # greedy: a point mass
    assert draw(point, torch.tensor([0.999])).tolist() == [2]


def test_a_rows_response_does_not_depend_on_its_batch(student, prompts):
    """Row streams: the same global rows drawn in one batch or split over two (as two processes, or two
    generation chunks, would) give the same tokens."""
    cfg = make_cfg(max_new_tokens=8, eos=MANY_EOS, temperature=1.0)
    whole = sample(student, prompts, cfg, streams=RowStreams.of(7, 4, step=3))
    first = sample(student, prompts[:1], cfg, streams=RowStreams.of(7, 1, step=3))
    rest = sample(student, prompts[1:], cfg, streams=RowStreams.of(7, 3, step=3, first_row=1))
    for i, part, j in [(0, first, 0), (1, rest, 0), (2, rest, 1), (3, rest, 2)]:
        assert row_response(whole, i) == row_response(part, j)
        n = len(row_response(whole, i))
        torch.testing.assert_close(whole.behavior_logprobs[i, :n], part.behavior_logprobs[j, :n], atol=1e-5, rtol=0)
    other = sample(student, prompts, cfg, streams=RowStreams.of(7, 4, step=4))  # another step, other draws
    assert any(row_response(whole, i) != row_response(other, i) for i in range(4))


def test_rollouts_leave_inference_mode_as_ordinary_tensors_training_can_save(student, prompts):
    """The decode loop runs under ``torch.inference_mode``; what it returns must not be inference tensors, or the
    loss could not save them for backward."""
    b = sample(student, prompts, make_cfg(), streams=0)
    assert not b.tokens.is_inference() and not b.behavior_logprobs.is_inference()
    weight = torch.ones((), requires_grad=True)
    (weight * b.behavior_logprobs).sum().backward()  # saves the log-probs for backward: refused for inference ones
    assert weight.grad is not None and torch.isfinite(weight.grad)
