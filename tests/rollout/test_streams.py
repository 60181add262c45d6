"""Row streams: a row's random numbers depend on (seed, step, global row, purpose), nothing else."""

from __future__ import annotations

import pytest
import torch

from tropd.rollout import RowStreams


def test_values_depend_on_the_row_not_the_batch():
    whole = RowStreams.of(3, 6, step=2).uniform("student", 5)
    tail = RowStreams.of(3, 2, step=2, first_row=4).uniform("student", 5)
    picked = RowStreams.of(3, 6, step=2).select([5, 1]).uniform("student", 5)
    assert torch.equal(whole[4:], tail)
    assert torch.equal(picked, whole[[5, 1]])
    assert whole.dtype == torch.float64 and ((whole >= 0) & (whole < 1)).all()


def test_a_longer_draw_extends_the_same_values():
    streams = RowStreams.of(0, 3)
    assert torch.equal(streams.uniform("trust", 40)[:, :7], streams.uniform("trust", 7))


@pytest.mark.parametrize("other", [dict(seed=4), dict(step=1), dict(purpose="teacher"), dict(first_row=1)])
def test_seed_step_row_and_purpose_each_change_the_values(other):
    base = dict(seed=3, step=0, first_row=0, purpose="student")
    a, b = base, {**base, **other}
    ua = RowStreams.of(a["seed"], 1, step=a["step"], first_row=a["first_row"]).uniform(a["purpose"], 4)
    ub = RowStreams.of(b["seed"], 1, step=b["step"], first_row=b["first_row"]).uniform(b["purpose"], 4)
    assert not torch.equal(ua, ub)


def test_shared_streams_are_the_same_for_every_share_of_the_batch():
    left = RowStreams.of(1, 4, step=5, total_rows=8)
    right = RowStreams.of(1, 4, step=5, first_row=4, total_rows=8)
    assert torch.equal(torch.randperm(8, generator=left.shared("guided_rows")),
                       torch.randperm(8, generator=right.shared("guided_rows")))


def test_resolve_checks_the_row_count_and_accepts_a_seed():
    assert RowStreams.resolve(5, 3) == RowStreams.of(5, 3)
    with pytest.raises(ValueError, match="holds 2 rows but the batch has 3"):
        RowStreams.resolve(RowStreams.of(0, 2), 3)
    torch.manual_seed(0)
    a = RowStreams.resolve(None, 2)
    torch.manual_seed(0)
    assert RowStreams.resolve(None, 2) == a
