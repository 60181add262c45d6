"""Hostile cases of silent success: a run that trained on no step, objective settings that cannot be meant (NaN,
inf, ``true`` for a count), a config key given twice, a data row whose answer is NaN. Each must end in one line
naming the setting, key or file and line, or (for skipped steps) be said in the printed summary and summary.md."""

from __future__ import annotations

import json
import math
import typing
from pathlib import Path

import pytest
import torch
import yaml

from tests.train.runs import write_config
from tropd.cli import main
from tropd.objectives import get_objective, list_objectives, objective_keywords
from tropd.objectives.keywords import ObjectiveKeywordError
from tropd.objectives.registry import objective_class
from tropd.tasks import DataFormatError, load_prompts
from tropd.train.config import ConfigError, load_config
from tropd.train.errors import NoStepTrainedError
from tropd.train.run import train_from_config
from tropd.train.trainer import Trainer


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tropd train: error: "), err
    return err


# -- a run that trained on no step -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nan_student(teacher_dir, tmp_path_factory) -> Path:
    """The teacher's weights with one NaN in the LM head: every loss is NaN, every step is skipped."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("nan-student")
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    with torch.no_grad():
        model.get_output_embeddings().weight[7, 3] = float("nan")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(path)
    return path


@pytest.mark.filterwarnings("ignore:objective.fused")  # the NaN head fails the fused loss's own probe
def test_a_run_whose_every_step_was_skipped_fails_with_the_cause(tmp_path, teacher_dir, nan_student, capsys):
    # 2 steps and max_nonfinite_steps=3: the in-a-row guard never fires; before, this exited 0 with a normal summary
    config = write_config(tmp_path, teacher_dir, model={"student": str(nan_student)},
                          train={"steps": 2, "save_every": 0, "max_nonfinite_steps": 3, "write_report": True})
    assert main(["train", "--config", str(config), "data.eval_prompts=0"]) == 1
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and err.startswith("tropd train: error: no step trained: all 2 step(s) run "
                                                   "(steps 1–2) were skipped"), err
    assert "last cause:" in err and "NaN/inf in the student's" in err
    assert "skipped: 2 of the 2 step(s) run had a non-finite loss or gradient" in captured.out
    assert "(none trained)" in captured.out
    run = tmp_path / "run"
    report = (run / "report" / "summary.md").read_text()
    assert "**No step trained**: every one of the 2 logged steps was skipped" in report
    summary = json.loads((run / "summary.json").read_text())
    assert summary["nonfinite_steps"] == summary["steps_run"] == 2 and summary["failed"].startswith("no step trained")


@pytest.mark.filterwarnings("ignore:objective.fused")
def test_the_api_raises_too(tmp_path, teacher_dir, nan_student):
    cfg = load_config(write_config(tmp_path, teacher_dir, model={"student": str(nan_student)}),
                      ["data.eval_prompts=0", "train.steps=1", "train.save_every=0"])
    with pytest.raises(NoStepTrainedError, match=r"no step trained: the 1 step\(s\) run \(steps 1–1\)") as err:
        train_from_config(cfg, console=lambda *_: None)
    assert err.value.summary["nonfinite_steps"] == 1


def test_skipped_steps_are_in_the_summary_of_a_run_that_trained(tmp_path, teacher_dir, monkeypatch, capsys):
    original_run, original_acc = Trainer.run_step, Trainer.accumulate

    def run_step(self, step):
        self._poison = step == 1
        return original_run(self, step)

    def accumulate(self, *args):
        parts = original_acc(self, *args)
        if self._poison:  # the second step's gradient overflows
            next(self.student.parameters()).grad.fill_(float("nan"))
        return parts

    monkeypatch.setattr(Trainer, "run_step", run_step)
    monkeypatch.setattr(Trainer, "accumulate", accumulate)
    config = write_config(tmp_path, teacher_dir, train={"steps": 3, "save_every": 0, "write_report": True})
    assert main(["train", "--config", str(config), "data.eval_prompts=0"]) == 0
    assert "skipped: 1 of the 3 step(s) run had a non-finite loss or gradient" in capsys.readouterr().out
    report = (tmp_path / "run" / "report" / "summary.md").read_text()
    assert "**1 of 3 logged steps were skipped** for a non-finite loss or gradient" in report
    assert "steps 2. Last cause: the gradient norm was nan" in report


# -- objective keywords: type and range at construction ------------------------------------------------------
def _float_keywords():
    """(objective, keyword) for every keyword annotated float."""
    for name in list_objectives():
        hints = typing.get_type_hints(objective_class(name).__init__)
        for key in objective_keywords(name):
            if hints.get(key) is float:
                yield name, key


@pytest.mark.parametrize("name, key", list(_float_keywords()))
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_float_keyword_is_refused_by_every_objective(name, key, value):
    with pytest.raises(ObjectiveKeywordError, match=rf"^{name}: {key} must be a finite number") as err:
        get_objective(name, **{key: value})
    assert err.value.key == key and isinstance(err.value, ValueError) and isinstance(err.value, TypeError)


@pytest.mark.parametrize("name, kwargs, message", [
    ("tropd", {"beta": math.nan}, r"tropd: beta must be a finite number in \[0, inf\), got nan"),
    ("tropd", {"beta": -1e-3}, r"tropd: beta must be a finite number in \[0, inf\), got -0.001"),
    ("tropd", {"top_k": True}, r"tropd: top_k must be an integer in \[1, inf\), got True \(bool\)"),
    ("tropd", {"top_k": 8.0}, r"tropd: top_k must be an integer in \[1, inf\), got 8.0"),
    ("tropd", {"top_k": 0, "outlier": "mask"}, r"tropd: top_k must be an integer in \[1, inf\), got 0"),
    ("tropd", {"chunk_size": True}, r"tropd: chunk_size must be None or an integer in \[1, inf\), got True"),
    ("fkl", {"top_k": False}, r"fkl: top_k must be an integer in \[1, inf\), got False \(bool\)"),
    ("jsd", {"jsd_beta": 1.0}, r"jsd: jsd_beta must be a finite number in \(0, 1\), got 1.0"),
    ("gkd", {"lmbda": math.inf}, r"gkd: lmbda must be a finite number in \[0, 1\], got inf"),
    ("entropy_opd", {"entropy_top_frac": 0}, r"entropy_opd: entropy_top_frac must be a finite number in \(0, 1\]"),
    ("reopold_2stage", {"stage": 3}, r"reopold_2stage: stage must be None or an integer in \[1, 2\], got 3"),
    ("trb", {"trb_support": True}, r"trb: trb_support must be an integer in \[1, inf\), got True"),
])
def test_objective_keywords_are_type_and_range_checked(name, kwargs, message):
    with pytest.raises(ObjectiveKeywordError, match=message):
        get_objective(name, **kwargs)
    with pytest.raises(ValueError, match=message):  # the classes themselves check, not only the registry
        objective_class(name)(**kwargs)


def test_good_keywords_still_build():
    import numpy as np

    assert get_objective("tropd", top_k=np.int64(4), beta=0, tau=-1).needs.top_k == 4  # an int for a float is fine
    assert get_objective("reopold_2stage", stage=None).stage is None
    assert get_objective("gkd", beta=1, lmbda=0.0).beta == 1.0


@pytest.mark.parametrize("override, message", [
    ("objective.kwargs.beta=nan", "objective.kwargs.beta: tropd: beta must be a finite number in [0, inf), got nan"),
    ("objective.kwargs.beta=.inf", "objective.kwargs.beta: tropd: beta must be a finite number in [0, inf), got inf"),
    ("objective.kwargs.top_k=true",
     "objective.kwargs.top_k: tropd: top_k must be an integer in [1, inf), got True (bool)"),
])
def test_the_config_refuses_them_naming_the_key(tmp_path, teacher_dir, override, message, capsys):
    config = write_config(tmp_path, teacher_dir)
    with pytest.raises(ConfigError) as err:
        load_config(config, [override])
    assert str(err.value) == f"command-line override {override!r}: {message}"
    assert main(["train", "--config", str(config), override]) == 2
    assert message in one_error_line(capsys)
    data = yaml.safe_load(config.read_text())
    data["objective"]["kwargs"]["beta"] = float("nan")  # written in the file: .nan
    config.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=rf"^{config}: objective.kwargs.beta: tropd: beta must be a finite"):
        load_config(config)


# -- duplicate keys in a config file -------------------------------------------------------------------------
@pytest.mark.parametrize("text, key, lines", [
    ("train:\n  lr: 1.0e-3\n  steps: 4\n  lr: 1.0e-2\n", "train.lr", (2, 4)),
    ("train:\n  steps: 4\nmodel:\n  device: cpu\ntrain:\n  lr: 1.0e-2\n", "train", (1, 5)),
    ("objective:\n  kwargs: {top_k: 8, top_k: 16}\n", "objective.kwargs.top_k", (2, 2)),
])
def test_a_key_given_twice_in_a_config_file_is_refused(tmp_path, text, key, lines, capsys):
    config = tmp_path / "dup.yaml"
    config.write_text(text)
    message = (f"config file {config}: key {key} is given twice (lines {lines[0]} and {lines[1]}); YAML would "
               "silently keep the last one: delete one of them")
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert str(err.value) == message
    assert main(["train", "--config", str(config)]) == 2
    assert message in one_error_line(capsys)


def test_the_same_key_in_two_sections_is_no_duplicate(tmp_path, teacher_dir):
    data = yaml.safe_load(write_config(tmp_path, teacher_dir).read_text())
    data["objective"]["kwargs"]["beta"] = 1e-3  # beta in objective.kwargs, and trb/gkd-like names elsewhere
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(data) + "guidance:\n  enabled: true\n")
    assert load_config(tmp_path / "ok.yaml").guidance.enabled is True


# -- a data row whose answer is NaN ------------------------------------------------------------------------
@pytest.mark.parametrize("answer", ["NaN", "Infinity", "-Infinity"])
def test_a_nan_answer_in_a_jsonl_row_is_refused_naming_file_and_line(tmp_path, teacher_dir, answer, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "1 + 1?", "answer": "2"}\n{"prompt": "2 + 2?", "answer": ' + answer + '}\n')
    with pytest.raises(DataFormatError) as err:
        load_prompts(data)
    assert str(err.value).startswith(f"{data}:line 2: field 'answer': expected a finite number or a string, got ")
    config = write_config(tmp_path, teacher_dir, data={"prompts": str(data)})
    assert main(["train", "--config", str(config)]) == 2
    assert f"{data}:line 2: field 'answer'" in one_error_line(capsys)
    assert len(load_prompts(data, on_error="skip")) == 1  # data.skip_bad_rows skips (and counts) it instead


def test_a_nan_answer_in_a_json_array_is_refused(tmp_path):
    data = tmp_path / "rows.json"
    data.write_text('[\n  {"prompt": "1 + 1?", "answer": 2},\n  {"prompt": "2 + 2?", "answer": NaN}\n]\n')
    with pytest.raises(DataFormatError, match=rf"^{data}:line 3: field 'answer': expected a finite number"):
        load_prompts(data)
