"""Runs never change or lose things silently: resume guards, finished runs, corrupt checkpoints, torn logs,
non-finite steps, config-time checks and the command line's behaviour on bad input (tiny models)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.train.runs import final_weights, write_config
from tropd.cli import main
from tropd.train.config import ConfigError, load_config
from tropd.train.run import train_from_config
from tropd.train.tracking import read_metrics
from tropd.train.trainer import Trainer

QUIET = {"console": lambda *_: None}


def run_once(tmp_path: Path, teacher_dir: Path, *overrides: str, **sections) -> Path:
    cfg = load_config(write_config(tmp_path, teacher_dir, **sections), ["data.eval_prompts=0", *overrides])
    train_from_config(cfg, **QUIET)
    return tmp_path / "run"


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# -- resume with other settings ------------------------------------------------------------------------------
def test_resume_with_changed_settings_is_refused_then_recorded(tmp_path, teacher_dir, capsys):
    run = run_once(tmp_path, teacher_dir, train={"steps": 2})
    before = snapshot(run)
    # no --config: --resume reads the run's own config.yaml, so only the overrides can differ
    assert main(["train", "--run-dir", str(run), "--resume", "train.steps=4", "train.lr=2e-3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.lr: 0.001 -> 0.002" in err and "train.steps: 2 -> 4" in err
    assert "--override-config" in err and snapshot(run) == before

    assert main(["train", "--run-dir", str(run), "--resume", "--override-config", "train.steps=4",
                 "train.lr=2e-3"]) == 0
    text = (run / "config.yaml").read_text()
    assert "resumed at step 2 with --override-config: train.lr: 0.001 -> 0.002, train.steps: 2 -> 4" in text
    assert load_config(run / "config.yaml").train.lr == 2e-3  # the history is comments: still a loadable config
    steps = [r for r in read_metrics(run) if "loss" in r]
    assert [(r["step"], r["lr"]) for r in steps] == [(1, 1e-3), (2, 1e-3), (3, 2e-3), (4, 2e-3)]  # the real lr


def test_override_config_needs_resume(tmp_path, teacher_dir, capsys):
    assert main(["train", "--config", str(write_config(tmp_path, teacher_dir)), "--override-config"]) == 2
    assert "--override-config only applies with --resume" in capsys.readouterr().err


def test_resume_of_a_finished_run_changes_nothing(tmp_path, teacher_dir, capsys):
    run = run_once(tmp_path, teacher_dir, train={"steps": 2})
    before = snapshot(run)
    assert main(["train", "--run-dir", str(run), "--resume"]) == 0
    assert "is complete (2 of 2 steps): nothing to do" in capsys.readouterr().out
    assert snapshot(run) == before  # no eval rerun, no rows appended, no checkpoint or summary rewritten


def test_a_report_that_fails_is_an_error_and_resume_writes_it(tmp_path, teacher_dir, capsys, monkeypatch):
    """Training finished but writing the report failed: exit 1 with one line naming the cause; --resume of the
    finished run then writes the missing report instead of only saying the run is complete."""
    import tropd.report

    def broken(run_dir):
        raise OSError("No space left on device")

    monkeypatch.setattr(tropd.report, "write_report", broken)
    path = write_config(tmp_path, teacher_dir, train={"steps": 2, "write_report": True})
    assert main(["train", "--config", str(path), "data.eval_prompts=0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the run is saved, but writing its report failed: OSError: No space left" in err
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text())["report"] is None
    assert not (run / "report" / "summary.md").exists()

    monkeypatch.undo()
    assert main(["train", "--run-dir", str(run), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "is complete (2 of 2 steps)" in out and "its report was never written" in out
    report = run / "report" / "summary.md"
    assert f"report: {report.resolve()}" in out and report.is_file()
    assert json.loads((run / "summary.json").read_text())["report"] == str(report.resolve())
    before = snapshot(run)
    assert main(["train", "--run-dir", str(run), "--resume"]) == 0  # now complete with its report: nothing to do
    assert "report" not in capsys.readouterr().out.split("nothing to do")[1] and snapshot(run) == before


def test_fresh_run_refuses_a_folder_holding_any_file(tmp_path, teacher_dir, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    path = write_config(tmp_path, teacher_dir)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'run'} is not empty (notes.txt)" in err
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine" and len(list((tmp_path / "run").iterdir())) == 1


def test_resume_without_a_run_is_refused(tmp_path, capsys):
    assert main(["train", "--run-dir", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "holds no run" in capsys.readouterr().err


# -- damaged checkpoints and logs ----------------------------------------------------------------------------
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [
    lambda c: _truncate(c / "trainer_state.pt"),
    lambda c: _truncate(c / "model.safetensors"),
    lambda c: (c / "config.json").write_text("{not json"),
], ids=["trainer_state", "safetensors", "config_json"])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, teacher_dir, damage, capsys):
    run = run_once(tmp_path, teacher_dir)  # checkpoints at steps 2 and 4
    expected = {k: v.clone() for k, v in final_weights(run).items()}  # copies: the file is damaged below
    (run / "summary.json").unlink()  # as if the run had died right after its step-4 save
    latest = run / "checkpoints" / "step-000004"
    damage(latest)
    leftover = run / "checkpoints" / ".step-000006.tmp-999"  # an interrupted save of another process
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")

    assert main(["train", "--run-dir", str(run), "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"warning: skipping corrupt checkpoint {latest}" in out
    assert "removed 1 leftover(s) of an interrupted save: .step-000006.tmp-999" in out and not leftover.exists()
    got = final_weights(run)  # steps 3 and 4 trained again from step 2: the same weights as before
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0, msg=k)
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]


def test_no_readable_checkpoint_is_one_clear_error(tmp_path, teacher_dir, capsys):
    run = run_once(tmp_path, teacher_dir)
    for ckpt in (run / "checkpoints").glob("step-*"):
        _truncate(ckpt / "trainer_state.pt")
    (run / "summary.json").unlink()
    assert main(["train", "--run-dir", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no readable checkpoint" in err and "step-000002" in err and "step-000004" in err


def test_torn_last_metrics_line_blocks_neither_report_nor_resume(tmp_path, teacher_dir, capsys):
    run = run_once(tmp_path, teacher_dir, train={"steps": 4, "save_every": 2})
    (run / "summary.json").unlink()
    for name in ("latest",):
        (run / "checkpoints" / name).write_text("step-000002\n")
    log = run / "metrics.jsonl"
    log.write_text(log.read_text() + '{"step": 5, "loss": 0.1')  # a crash mid-write
    with pytest.warns(UserWarning, match=r"metrics.jsonl:\d+: ignoring a torn last line"):
        assert main(["report", str(run)]) == 0
    with pytest.warns(UserWarning, match="torn last line"):
        assert main(["train", "--run-dir", str(run), "--resume"]) == 0
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]

    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    assert main(["report", str(run)]) == 2
    assert f"{log}:2: not a JSON object" in capsys.readouterr().err


# -- non-finite steps ----------------------------------------------------------------------------------------
def _poison_gradients(monkeypatch, steps: set[int]) -> None:
    """Make the gradient of the given (0-based) steps NaN, as an overflow in backward would."""
    original_run, original_acc = Trainer.run_step, Trainer.accumulate

    def run_step(self, step):
        self._poison = step in steps
        return original_run(self, step)

    def accumulate(self, *args):
        parts = original_acc(self, *args)
        if self._poison:
            next(self.student.parameters()).grad.fill_(float("nan"))
        return parts

    monkeypatch.setattr(Trainer, "run_step", run_step)
    monkeypatch.setattr(Trainer, "accumulate", accumulate)


def test_a_nonfinite_step_is_skipped_and_counted(tmp_path, teacher_dir, monkeypatch):
    clean = run_once(tmp_path / "a", teacher_dir, "train.steps=2", train={"save_every": 0})
    _poison_gradients(monkeypatch, {1})
    poisoned = run_once(tmp_path / "b", teacher_dir, "train.steps=2", train={"save_every": 0})
    steps = [r for r in read_metrics(poisoned) if "loss" in r]
    assert [r["nonfinite"] for r in steps] == [0, 1] and "gradient norm was nan" in steps[1]["nonfinite_reason"]
    assert json.loads((poisoned / "summary.json").read_text())["nonfinite_steps"] == 1
    # step 2 was skipped: the weights are those after step 1, which a 1-step clean run also reaches
    one_step = run_once(tmp_path / "c", teacher_dir, "train.steps=1", train={"save_every": 0})
    got, want, moved = final_weights(poisoned), final_weights(one_step), final_weights(clean)
    assert all(torch.equal(got[k], want[k]) for k in want) and not all(torch.equal(got[k], moved[k]) for k in want)
    assert all(torch.isfinite(v).all() for v in got.values())


def test_consecutive_nonfinite_steps_stop_the_run_with_the_step_and_cause(tmp_path, teacher_dir, monkeypatch, capsys):
    _poison_gradients(monkeypatch, {1, 2})
    path = write_config(tmp_path, teacher_dir, train={"max_nonfinite_steps": 2, "steps": 6})
    assert main(["train", "--config", str(path), "data.eval_prompts=0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "step 3: 2 steps in a row had a non-finite loss or gradient" in err
    assert "train.max_nonfinite_steps=2" in err and "gradient norm was nan" in err
    assert "the weights are those of step 1" in err.lower()
    ckpt = tmp_path / "run" / "checkpoints" / "step-000003"
    assert all(torch.isfinite(v).all() for v in load_file(ckpt / "model.safetensors").values())


def test_a_teacher_emitting_nan_stops_the_run_naming_the_input(tmp_path, teacher_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bad = tmp_path / "nan-teacher"
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    with torch.no_grad():
        model.get_output_embeddings().weight[5].fill_(float("nan"))
    model.save_pretrained(bad)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(bad)
    path = write_config(tmp_path, bad, model={"student": str(teacher_dir)},  # a clean student, a NaN teacher
                        objective={"name": "opd", "kwargs": {}}, train={"max_nonfinite_steps": 2})
    assert main(["train", "--config", str(path), "data.eval_prompts=0"]) == 1
    err = capsys.readouterr().err
    assert "step 2: 2 steps in a row" in err and "teacher_logprobs" in err, err


# -- config-time checks and the command line -----------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("model.dtype=bfloat16", "model.dtype=bfloat16 would train the student's weights in bfloat16"),
    ("model.teacher_dtype=float16", "model.teacher_dtype=float16 is not supported on CPU"),
    ("model.mixed_precision=fp16", "model.mixed_precision=fp16 is not supported: fp16 needs loss scaling"),
    ("model.device=cuda", "model.device=cuda is not on this machine"),
    ("model.device=tpu9", "model.device=tpu9 is not"),
    ("rollout.temperature=inf", "rollout.temperature=inf has the wrong type; expected a finite number"),
    ("train.lr=nan", "train.lr=nan has the wrong type"),
    ("train.betas=[a,b]", "train.betas=['a', 'b'] has the wrong type; expected a list of finite numbers"),
    ("train.betas=[0.9]", "train.betas must be two numbers"),
    ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps must be >= 1"),
    ("data.max_prompt_tokens=0", "data.max_prompt_tokens must be >= 1"),
    ("guidance.guided_fraction=2", "guidance.guided_fraction must be in [0, 1], got 2.0"),  # a section's own check
    ("trb.iters=0", "trb.iters must be >= 1, got 0"),
])
def test_bad_settings_are_refused_at_config_time(tmp_path, teacher_dir, override, message, capsys):
    if override.startswith("model.device=cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    path = write_config(tmp_path, teacher_dir)
    with pytest.raises(ConfigError) as err:
        load_config(path, [override])
    assert f"command-line override {override!r}: {message}" in str(err.value)
    assert main(["train", "--config", str(path), override]) == 2
    assert message in capsys.readouterr().err


def test_unknown_keys_name_their_source(tmp_path, teacher_dir):
    path = write_config(tmp_path, teacher_dir)
    with pytest.raises(ConfigError, match=r"^command-line override 'train\.stepz=3': unknown config key train\.stepz"):
        load_config(path, ["train.stepz=3"])
    data = yaml.safe_load(path.read_text())
    data["train"]["stepz"] = 3
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=rf"^{path}: unknown config key train\.stepz"):
        load_config(path, ["train.steps=3"])


def test_help_config_shows_what_a_plain_run_uses(capsys):
    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    default = load_config()
    assert f"train.steps = {default.train.steps!r}   (built-in default: 200)" in out
    assert f"model.student_layers = {default.model.student_layers!r}" in out
    assert main(["train", "--help-config", "train.steps=30"]) == 0
    assert "train.steps = 30   (built-in default: 200)" in capsys.readouterr().out
    assert main(["train", "--help-config", "objective.name=opd"]) == 2  # a cross-field error names both sources
    assert "default.yaml with command-line overrides objective.name=opd: objective.kwargs.top_k is not a setting " \
           "of 'opd'" in capsys.readouterr().err


def test_main_puts_the_process_wide_settings_back(capsys):
    """`tropd.cli.main` inside a larger program leaves its SIGTERM handler and warnings format as it found them."""
    before_format, before_sigterm = warnings.formatwarning, signal.getsignal(signal.SIGTERM)
    assert main(["train", "--help-config"]) == 0
    assert main(["train", "--help-config", "train.lr=-1"]) == 2  # the error path too
    assert warnings.formatwarning is before_format and signal.getsignal(signal.SIGTERM) == before_sigterm


def test_help_config_into_a_closed_pipe_exits_quietly():
    proc = subprocess.Popen([sys.executable, "-m", "tropd", "train", "--help-config"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # what `| head -1` does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"Traceback" not in err and b"Error" not in err, err


def test_ctrl_c_while_models_load_exits_cleanly(tmp_path, teacher_dir, monkeypatch, capsys):
    import tropd.train.build as build_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "load_models", interrupted)
    assert main(["train", "--config", str(write_config(tmp_path, teacher_dir))]) == 130
    assert capsys.readouterr().err.strip() == "tropd train: interrupted"


# -- oversized prompts ---------------------------------------------------------------------------------------
def test_prompts_over_the_token_limit_are_refused_or_skipped(tmp_path, teacher_dir, capsys):
    data = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"What is {i} + {i}?"} for i in range(20)] + [{"prompt": " ".join(["wa"] * 400)}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    # every row is checked: training rows, and the held-out ones (2 of 21) that eval_prompts=2 all uses
    path = write_config(tmp_path, teacher_dir, data={"prompts": str(data), "eval_prompts": 2})
    # the tiny models' context is 256 tokens and 6 are kept for the answer: the limit is 250
    assert main(["train", "--config", str(path), "train.steps=1"]) == 2
    err = capsys.readouterr().err
    assert f"{data}:21" in err and "exceeds data.max_prompt_tokens=250" in err and "data.skip_bad_rows" in err
    assert main(["train", "--config", str(path), "train.steps=1", "data.skip_bad_rows=true"]) == 0
    assert re.search(r"skipped 1 (training|held-out) prompt\(s\) longer than 250 tokens", capsys.readouterr().out)
