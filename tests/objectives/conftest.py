"""Objective tests run on tiny tensors: one intra-op thread is faster and keeps the folder well under a minute
on a 2-core machine (multi-threaded kernels only add spin-wait overhead at these sizes)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
