"""Test-session settings and the tiny models shared by the whole session.

Tiny models run fastest single-threaded (no thread oversubscription on 2 cores). ``pytest -m "not slow"`` skips
the slow tier (multi-process launches, served teachers, benchmark runs: the ``slow`` marker, pyproject.toml).
``make test`` runs the suite on two pytest-xdist workers, a module at a time (``--dist loadscope``: a module's
shared launches run once), modules with slow tests first (:func:`pytest_collection_modifyitems`)."""

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    """A tiny 4-layer teacher and its tokenizer saved as an HF folder (tests.train.runs.save_teacher), built once
    per session; tests read it, never change it."""
    from tests.train.runs import save_teacher

    return save_teacher(tmp_path_factory.mktemp("teacher"))


def pytest_collection_modifyitems(config, items) -> None:
    """Modules holding ``slow`` tests first, each module's tests in their own order: under ``--dist loadscope`` each
    worker starts on a long module and the short ones fill in behind, so neither waits on the other at the end."""
    slow = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in slow)  # stable: otherwise collection order
