"""terms.log_softmax_gather (the fused log-softmax + gather + entropy every objective's row terms start from)
equals log_softmax(z).gather(ids) and −Σ π log π in float64, with gradients, across row blocks, with −inf logits,
repeated ids and low-precision inputs."""

from __future__ import annotations

import pytest
import torch

from tropd.objectives import terms


def _reference(z: torch.Tensor, ids: torch.Tensor):
    lp = torch.log_softmax(z.double(), -1)
    p = lp.exp()
    ent = -torch.where(p > 0, p * lp, torch.zeros_like(p)).sum(-1)
    return lp.gather(-1, ids), ent


@pytest.mark.parametrize("n", [1, 7, 3 * terms.row_block(50_000) + 2])
def test_values_and_gradient_match_float64_reference(n):
    g = torch.Generator().manual_seed(n)
    v = 50_000 if n > 7 else 50
    z = (torch.randn(n, v, generator=g, dtype=torch.float64) * 4).requires_grad_(True)
    ids = torch.randint(0, v, (n, 5), generator=g)
    ids[:, 1] = ids[:, 0]  # a repeated id: both gradients must land on it
    upstream = torch.randn(n, 5, generator=g, dtype=torch.float64)

    picked, ent = terms.log_softmax_gather(z, ids)
    (picked * upstream).sum().backward()
    grad = z.grad.clone()

    z_ref = z.detach().clone().requires_grad_(True)
    ref_picked, ref_ent = _reference(z_ref, ids)
    (ref_picked * upstream).sum().backward()
    torch.testing.assert_close(picked, ref_picked, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, z_ref.grad, rtol=1e-12, atol=1e-12)
    assert not ent.requires_grad


def test_gradcheck():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 9, (4, 3), generator=g)
    assert torch.autograd.gradcheck(lambda x: terms.log_softmax_gather(x, ids)[0], (z,))


def test_minus_inf_logits_are_zero_mass():
    z = torch.tensor([[0.0, float("-inf"), 1.0, float("-inf")]], dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[2, 1]])
    picked, ent = terms.log_softmax_gather(z, ids)
    ref_picked, ref_ent = _reference(z.detach(), ids)
    assert picked[0, 0].item() == pytest.approx(ref_picked[0, 0].item(), abs=1e-15)
    assert picked[0, 1].item() == float("-inf")
    assert ent.item() == pytest.approx(ref_ent.item(), abs=1e-15)
    picked[:, :1].sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad[0, 1] == 0 and z.grad[0, 3] == 0


def test_peaked_distribution_entropy_is_accurate_in_float32():
    """H = log S − Σ e (z − m) / S avoids the cancellation of lse − E[z] when logits are large."""
    z = torch.full((1, 1000), -30.0)
    z[0, 0] = 60.0
    _, ent = terms.log_softmax_gather(z, torch.zeros(1, 1, dtype=torch.long))
    _, ref = _reference(z, torch.zeros(1, 1, dtype=torch.long))
    assert ent.dtype == torch.float32
    assert ent.item() == pytest.approx(ref.item(), rel=1e-3, abs=1e-30)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_computed_in_float32(dtype):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 40, generator=g).to(dtype).requires_grad_(True)
    ids = torch.randint(0, 40, (6, 2), generator=g)
    picked, ent = terms.log_softmax_gather(z, ids)
    assert picked.dtype == ent.dtype == torch.float32
    ref_picked, ref_ent = _reference(z.detach(), ids)
    torch.testing.assert_close(picked.double(), ref_picked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)
    picked.sum().backward()
    assert z.grad.dtype == dtype
