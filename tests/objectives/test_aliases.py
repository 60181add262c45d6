"""Objectives that docs/method.md §3 defines as the same computation give identical losses and gradients (the benchmark
runs each pair once): reopold ≡ clip_outlier, and tropd on rollouts without teacher prefixes ≡ fkl_outlier."""

import pytest
import torch

from tests.objectives.helpers import make_inputs, run_impl


@pytest.mark.parametrize("seed", range(4))
def test_reopold_is_clip_outlier(seed):
    x = make_inputs(seed)
    (a, ga), (b, gb) = run_impl("reopold", {}, x), run_impl("clip_outlier", {}, x)
    assert torch.equal(a.token_losses, b.token_losses) and torch.equal(ga, gb)


@pytest.mark.parametrize("seed", range(4))
def test_tropd_without_prefixes_is_fkl_outlier(seed):
    x = make_inputs(seed, teacher_mask=torch.zeros(3, 5, dtype=torch.bool))
    (a, ga), (b, gb) = run_impl("tropd", {}, x), run_impl("fkl_outlier", {}, x)
    assert torch.equal(a.token_losses, b.token_losses) and torch.equal(ga, gb)
