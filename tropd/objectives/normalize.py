"""Global token counts for exact token-mean normalisation (docs/method.md §3, §6.5).

The loss of one optimiser step is ``Σ_t ℓ_t / N`` with ``N`` the number of loss-bearing positions over all
micro-batches and all processes. Each micro-batch calls its objective with ``num_tokens=N`` and the gradients
are summed (accumulation). Under data parallelism, frameworks average gradients over ``W`` processes, so each
process must scale its loss by ``W`` (:func:`data_parallel_scale`) to recover the global sum.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist


def count_loss_tokens(loss_masks: Iterable[torch.Tensor]) -> int:
    """``N``: loss-bearing positions in these micro-batches, summed over processes when distributed."""
    total = None
    for m in loss_masks:
        n = m.sum().to(torch.int64)
        total = n if total is None else total + n
    if total is None:
        total = torch.zeros((), dtype=torch.int64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return int(total)


def data_parallel_scale() -> float:
    """Factor to multiply each process's loss by when the framework averages gradients across processes."""
    return float(dist.get_world_size()) if dist.is_available() and dist.is_initialized() else 1.0
