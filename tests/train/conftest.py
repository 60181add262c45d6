"""Fixtures of the trainer tests: one tiny teacher folder per test module."""

from pathlib import Path

import pytest

from tests.train.runs import save_teacher


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return save_teacher(tmp_path_factory.mktemp("teacher"))
