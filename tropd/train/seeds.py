"""The range of ``train.seed``: every step's data order is drawn from a torch generator seeded with
:func:`step_seed` (``tropd.train.trainer.step_generator``), and torch takes seeds in ``[-2**63, 2**64 - 1]`` only
(beyond, it raises "Overflow when unpacking long long"). The other streams (:class:`~tropd.rollout.RowStreams`,
the prompt split's ``random.Random``) take any integer. This module imports nothing: the config checks it
without loading torch."""

from __future__ import annotations

#: the largest seed a torch generator takes (``torch.manual_seed`` and ``Generator.manual_seed``)
TORCH_SEED_MAX = 2**64 - 1
_ROW, _SPREAD = 1_000_003, 1_000_033


def step_seed(seed: int, step: int) -> int:
    """The seed of step ``step``'s data-order generator."""
    return (seed * _ROW + step) * _SPREAD


def max_seed(steps: int) -> int:
    """The largest ``train.seed`` a run of ``steps`` steps can use: 18,446,080 for up to 1,000,003 steps (each
    million steps more lowers it by one)."""
    return (TORCH_SEED_MAX // _SPREAD - (max(steps, 1) - 1)) // _ROW
