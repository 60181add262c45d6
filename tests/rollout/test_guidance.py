"""Teacher-prefix guidance (docs/method.md §4.2): cap schedule, tagging, sources of tokens and log-probs, teacher gating."""

from __future__ import annotations

import math

import pytest
import torch

from tests.rollout.conftest import EOS, RaisingTeacher, fresh_logits, gen, make_cfg, row_response
from tropd.rollout import RowStreams, choose_guided_rows, guidance_cap, sample, sample_with_guidance
from tropd.rollout.sampling import sample_rows
from tropd.teacher import InProcessTeacher


def test_cap_schedule_values():
    assert guidance_cap(0, 100, 64) == 64
    assert guidance_cap(50, 100, 64) == 32
    assert guidance_cap(100, 100, 64) == 0
    assert guidance_cap(150, 100, 64) == 0
    assert guidance_cap(25, 100, 64) == math.floor(64 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert guidance_cap(10, 100, 64, anneal_steps=20) == 32  # T_anneal overrides the horizon
    assert guidance_cap(30, 100, 64, anneal_steps=20) == 0
    assert guidance_cap(0, 100, 64, anneal_steps=0) == 0
    caps = [guidance_cap(k, 40, 101) for k in range(45)]
    assert all(a >= b for a, b in zip(caps, caps[1:]))


def test_guided_row_count_is_stochastically_rounded():
    assert choose_guided_rows(8, 0.5, gen(0)).sum() == 4
    assert choose_guided_rows(8, 1.0, gen(0)).all()
    counts = [int(choose_guided_rows(3, 0.5, gen(s)).sum()) for s in range(400)]
    assert set(counts) == {1, 2}
    assert abs(sum(counts) / len(counts) - 1.5) < 0.1


def _replay_teacher(teacher, prompts, cfg, step, total, fraction, seed):
    """Re-draw the documented random streams (U per row, the shared rounding and permutation, the teacher's
    tokens per row) for the prefixes."""
    streams = RowStreams.of(seed, len(prompts))
    l_max = guidance_cap(step, total, cfg.max_new_tokens)
    caps = torch.floor(streams.uniform("guidance_cap")[:, 0] * l_max).long()
    guided = choose_guided_rows(len(prompts), fraction, streams.shared("guided_rows"))
    caps = torch.where(guided, caps, torch.zeros_like(caps))
    idx = torch.nonzero(caps > 0).flatten().tolist()
    rows = sample_rows(teacher, [prompts[i] for i in idx], cfg, caps[idx], streams.select(idx), "teacher") if idx else []
    return caps, dict(zip(idx, rows))


@pytest.mark.parametrize("eos", [(EOS,), tuple(range(1, 11))])
def test_guidance_tagging_and_sources(student, teacher, prompts, eos):
    prompts = prompts * 3
    cfg = make_cfg(max_new_tokens=10, eos=eos, temperature=0.8)
    b = sample_with_guidance(student, InProcessTeacher(teacher), prompts, cfg, step=0, total_steps=10,
                             guided_fraction=0.75, streams=21)
    caps, prefixes = _replay_teacher(teacher, prompts, cfg, 0, 10, 0.75, 21)
    assert b.info["guidance_cap"] == 10
    assert prefixes, "premise: some rows are guided"
    assert any(int(b.guidance_lengths[i]) < int(b.response_lengths[i]) for i in prefixes), "premise: continuation"
    for i, prompt in enumerate(prompts):
        resp = row_response(b, i)
        l_i = int(b.guidance_lengths[i])
        pre = prefixes.get(i)
        expected_len = 0 if pre is None else int(pre.tokens.numel())
        assert l_i == expected_len <= int(caps[i])
        if pre is not None:
            assert resp[:l_i] == pre.tokens.tolist()  # tokens are the teacher's
            if pre.eos:  # a finished teacher prefix is the whole response
                assert len(resp) == l_i and b.eos[i]
        assert b.teacher_token_mask[i].tolist() == [t < l_i for t in range(b.tokens.shape[1])]
        assert b.loss_mask[i, :len(resp)].all() and len(resp) <= cfg.max_new_tokens
        # behaviour log-probs: the teacher's on the prefix, the student's on the continuation
        t_lp = torch.log_softmax(fresh_logits(teacher, prompt, resp) / 0.8, -1)
        s_lp = torch.log_softmax(fresh_logits(student, prompt, resp) / 0.8, -1)
        tok = torch.tensor(resp)[:, None]
        expected = torch.cat([t_lp.gather(-1, tok)[:l_i, 0], s_lp.gather(-1, tok)[l_i:, 0]])
        torch.testing.assert_close(b.behavior_logprobs[i, :len(resp)], expected, atol=1e-5, rtol=0)
        assert bool(b.truncated[i]) == (not b.eos[i] and len(resp) == cfg.max_new_tokens)


def test_prefix_with_eos_completes_the_response(student, teacher, prompts):
    cfg = make_cfg(max_new_tokens=12, eos=tuple(range(1, 16)))
    b = sample_with_guidance(student, InProcessTeacher(teacher), prompts * 4, cfg, step=0, total_steps=4, streams=8)
    lengths = b.guidance_lengths.tolist()
    complete = [i for i, n in enumerate(lengths) if n > 0 and int(b.tokens[i, n - 1]) in cfg.eos_token_ids]
    assert complete, "premise: some teacher prefix ends with EOS"
    for i in complete:
        assert int(b.response_lengths[i]) == int(b.guidance_lengths[i])
        assert b.eos[i] and not b.truncated[i]
        assert b.teacher_token_mask[i].sum() == b.loss_mask[i].sum()


@pytest.mark.parametrize("kwargs", [dict(guided_fraction=0.0, step=0), dict(guided_fraction=1.0, step=10)])
def test_no_guidance_never_runs_teacher(student, prompts, kwargs):
    cfg = make_cfg(max_new_tokens=8)
    b = sample_with_guidance(student, RaisingTeacher(), prompts, cfg, total_steps=10,
                             streams=2, **kwargs)
    plain = sample(student, prompts, cfg, streams=2)
    assert torch.equal(b.tokens, plain.tokens) and torch.equal(b.behavior_logprobs, plain.behavior_logprobs)
    assert not b.teacher_token_mask.any()


def test_all_caps_zero_never_runs_teacher(student, prompts):
    # L_max = 1 gives cap_i = floor(U * 1) = 0 for every row: guided rows exist but get no prefix
    step = next(k for k in range(1000) if guidance_cap(k, 1000, 100) == 1)
    cfg = make_cfg(max_new_tokens=100, eos=range(1, 30))
    b = sample_with_guidance(student, RaisingTeacher(), prompts, cfg, step=step, total_steps=1000,
                             streams=0)
    assert b.info["guidance_cap"] == 1 and b.guidance_lengths.eq(0).all()
    assert b.info["teacher_generated_tokens"] == 0


def test_guided_rows_are_chosen_over_the_global_batch(student, teacher, prompts):
    """Split over two shares (processes or generation chunks), the same rows are guided with the same prefixes
    and the exact count holds over the whole batch."""
    prompts = prompts * 2
    cfg = make_cfg(max_new_tokens=8, eos=(EOS,))
    kw = dict(step=0, total_steps=10, guided_fraction=0.5)
    writer = InProcessTeacher(teacher)
    whole = sample_with_guidance(student, writer, prompts, cfg, streams=RowStreams.of(9, 8, step=2), **kw)
    halves = [sample_with_guidance(student, writer, prompts[k:k + 4], cfg,
                                   streams=RowStreams.of(9, 4, step=2, first_row=k, total_rows=8), **kw)
              for k in (0, 4)]
    split = torch.cat([h.guidance_lengths for h in halves])
    assert torch.equal(whole.guidance_lengths, split)
    assert 0 < int((whole.guidance_lengths > 0).sum()) <= 4  # at most ⌊0.5·8⌋ rows get a prefix
    for i in range(8):
        assert row_response(whole, i) == row_response(halves[i // 4], i % 4)
