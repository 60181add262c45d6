"""Test-session settings and the tiny models shared by the whole session.

Tiny models run fastest single-threaded (no thread oversubscription on 2 cores). ``pytest -m "not slow"`` skips
the slow tier (multi-process launches, served teachers, benchmark runs: the ``slow`` marker, pyproject.toml)."""

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
