"""The learning-rate schedule: its values, its refusals, and the rates a run really trains with."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.train.runs import write_config
from tropd.train.config import ConfigError, load_config
from tropd.train.run import train_from_config
from tropd.train.schedule import lr_at


@pytest.mark.parametrize("schedule, expected", [
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]),
    ("cosine", [0.5, 1.0, 1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2]),
])
def test_warm_up_then_each_schedule(schedule, expected):
    # 6 steps, 2 of warm-up; the decay runs over p = (s - 2) / 4 for steps s = 2..5
    assert [lr_at(s, 1.0, 6, schedule, warmup_steps=2) for s in range(6)] == pytest.approx(expected, abs=1e-12)


def test_every_step_of_a_decay_trains_and_an_unknown_schedule_is_refused():
    assert min(lr_at(s, 3e-4, 10, "linear") for s in range(10)) > 0
    assert min(lr_at(s, 3e-4, 10, "cosine") for s in range(10)) > 0
    with pytest.raises(ValueError, match="one of"):
        lr_at(0, 1.0, 10, "step")


@pytest.mark.parametrize("override, message", [
    ("train.lr_schedule=step", "train.lr_schedule must be one of constant, linear, cosine"),
    ("train.lr_warmup_steps=4", "train.lr_warmup_steps must be in [0, train.steps=4)"),
    ("train.lr_warmup_steps=-1", "train.lr_warmup_steps must be in [0, train.steps=4)"),
])
def test_bad_schedule_settings_are_refused_by_name(tmp_path, teacher_dir, override, message):
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, teacher_dir), [override])
    assert message in str(err.value)


def test_a_run_logs_and_trains_with_the_scheduled_rate(tmp_path, teacher_dir):
    cfg = load_config(write_config(tmp_path, teacher_dir, train={"lr_schedule": "linear", "lr_warmup_steps": 1,
                                                                 "save_every": 0}, data={"eval_prompts": 0}))
    run = Path(train_from_config(cfg, console=lambda *_: None)["run_dir"])
    rates = [json.loads(x)["lr"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"lr"' in x]
    assert rates == pytest.approx([1e-3, 1e-3, 1e-3 * 2 / 3, 1e-3 / 3])
