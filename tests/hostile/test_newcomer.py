"""What a newcomer met in a fresh clone (issue 22 §6): a smoke run of the default config with few steps, file
modes of a checkpoint, the paths a run prints and records, and ``--help`` texts. Each case is reproduced and
must now hold."""

from __future__ import annotations

import pytest

from tests.train.runs import write_config
from tropd.cli import main
from tropd.train.config import config_help, load_config


# -- a smoke run of the default config -------------------------------------------------------------------------
def test_a_short_run_of_the_default_config_loads_and_says_how_long_it_warms_up(capsys):
    # before: `tropd train train.steps=2` failed with "train.sft_warmup_steps must be in [0, 2)"
    cfg = load_config(None, ["train.steps=2"])
    assert cfg.train.sft_warmup_steps == 8 and cfg.train.sft_steps() == 1
    assert "  train.sft_warmup_steps = 8   (a run uses: 1, train.steps - 1)" in config_help(cfg)
    assert load_config(None, ["train.steps=1"]).train.sft_steps() == 0
    assert load_config(None, ["train.steps=100"]).train.sft_steps() == 8
    assert main(["train", "--help-config", "train.steps=2"]) == 0
    out = capsys.readouterr().out
    assert "train.sft_warmup_steps = 8   (a run uses: 1, train.steps - 1)" in out
    assert "A run of fewer steps than this + 1 warms up train.steps - 1 steps" in out


def test_a_run_shorter_than_its_warm_up_trains_the_objective_on_its_last_step(tmp_path, teacher_dir):
    import json

    from tropd.train.run import train_from_config

    notes = []
    cfg = load_config(write_config(tmp_path, teacher_dir, train={"steps": 2, "sft_warmup_steps": 8}),
                      ["data.eval_prompts=0"])
    train_from_config(cfg, console=notes.append)
    phases = [json.loads(line)["phase"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert phases == ["sft", "tropd"]
    assert ("train.sft_warmup_steps=8 with train.steps=2: the SFT warm-up takes 1 step(s), train.steps - 1, so that "
            "the last step trains tropd") in notes


# -- one file mode per checkpoint ------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_every_checkpoint_file_gets_the_mode_the_umask_gives(tmp_path, teacher_dir, umask):
    # before: model.safetensors -rw------- beside -rw-r--r-- files
    import os

    import torch

    from tropd.models import load_causal_lm
    from tropd.train.checkpoint import save_checkpoint

    model, tok = load_causal_lm(teacher_dir)
    optimizer = torch.optim.AdamW(model.parameters())
    previous = os.umask(umask)
    try:
        folder = save_checkpoint(tmp_path / "run", 1, model, tok, optimizer, "train: {}\n")
    finally:
        os.umask(previous)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {oct(0o666 & ~umask)}, modes


# -- one path convention: absolute -----------------------------------------------------------------------------
def test_a_run_prints_and_records_absolute_paths_whatever_the_run_dir_given(tmp_path, teacher_dir, capsys,
                                                                            monkeypatch):
    # before: "run directory: /abs/run" but "checkpoint: run/checkpoints/step-000001", and so in summary.json
    import json
    from pathlib import Path

    config = write_config(tmp_path, teacher_dir, train={"write_report": True})
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", str(config), "--run-dir", "rel-run", "data.eval_prompts=0",
                 "train.steps=1"]) == 0
    out = capsys.readouterr().out
    run = (tmp_path / "rel-run").resolve()
    printed = {line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in out.splitlines()
               if line.startswith(("run directory: ", "checkpoint: ", "report: "))}
    assert printed == {"run directory": str(run), "checkpoint": str(run / "checkpoints" / "step-000001"),
                       "report": str(run / "report" / "summary.md")}
    summary = json.loads((run / "summary.json").read_text())
    assert all(Path(summary[k]).is_absolute() for k in ("run_dir", "checkpoint", "report"))
    assert summary["checkpoint"] == printed["checkpoint"]


# -- help texts and messages that say a thing twice ------------------------------------------------------------
def test_no_help_text_states_a_default_twice_or_a_meaningless_one():
    # before: "(default: None, i.e. the gym's 300; 4 with --quick)" and "(default: the embedded ...) (default: None)"
    import argparse
    import re

    from tropd.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        text = " ".join(command.format_help().split())
        for option in re.split(r" (?=--?[a-z])", text):
            assert option.count("(default:") <= 1, (name, option)
        for meaningless in ("(default: None", "(default: False)", "(default: [])"):
            assert meaningless not in text, (name, meaningless)
    train = " ".join(commands["train"].format_help().split())
    assert "(default: the embedded tropd/configs/default.yaml; with --resume, the run's own config.yaml)" in train
    gym = " ".join(commands["gym"].format_help().split())
    assert "training steps per run (default: the gym's 200; 4 with --quick)" in gym
    assert "(default: 3)" in gym  # a plain default is still shown


def test_the_non_empty_folder_message_says_choose_another_once(tmp_path, teacher_dir, capsys):
    config = write_config(tmp_path, teacher_dir)
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine\n")
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err == (f"tropd train: error: {run} is not empty (notes.txt); a fresh run needs a new or empty folder: "
                   "empty it, or choose another --run-dir\n")
    (run / "config.yaml").write_text("train: {}\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "continue it with --resume, or choose another --run-dir\n" in capsys.readouterr().err
