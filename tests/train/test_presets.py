"""Every preset shipped under tropd/configs loads and passes the cross-field checks."""

from pathlib import Path

import pytest
import yaml

from tropd.train.build import build_objective
from tropd.train.config import default_config_path, load_config

PRESETS = sorted(default_config_path().parent.glob("*.yaml"))


def test_presets_exist():
    assert default_config_path() in PRESETS and len(PRESETS) >= 3


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: Path(p).stem)
def test_preset_is_valid(path):
    # a recipe for the user's own models leaves the teacher to the command line (model.teacher=...)
    needs_teacher = yaml.safe_load(Path(path).read_text())["model"].get("teacher", "") is None
    cfg = load_config(path, ["model.teacher=smollm2"] if needs_teacher else [])
    assert build_objective(cfg.objective).name == cfg.objective.name
