"""The benchmark's bookkeeping: confidence intervals and the refusal to mix runs of different plans."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "paper_mini", Path(__file__).resolve().parent.parent / "benchmarks" / "paper_mini.py")
paper_mini = importlib.util.module_from_spec(spec)
sys.modules["paper_mini"] = paper_mini  # dataclasses look it up
spec.loader.exec_module(paper_mini)


def test_mean_ci_is_the_student_t_interval():
    mean, half = paper_mini.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert paper_mini.mean_ci([5.0]) == (5.0, 0.0)


def test_summary_groups_by_setting_and_method_and_counts_collapses():
    run = {"setting": "strong", "method": "opd", "objective": "opd", "task_score": 0.5, "teacher_text_nll": 2.0,
           "k1_rkl": 1.0, "grad_norm_p99": 3.0, "entropy": 2.0, "distinct_ratio": 0.5}
    rows = paper_mini.summarise([{**run, "collapsed": True}, {**run, "collapsed": False, "teacher_text_nll": 4.0}])
    assert len(rows) == 1
    assert rows[0]["seeds"] == 2 and rows[0]["collapsed"] == 1
    assert rows[0]["teacher_text_nll_mean"] == 3.0 and rows[0]["teacher_text_nll_ci95"] > 0


def test_a_workdir_of_another_plan_is_refused(tmp_path, capsys):
    (tmp_path / "plan.json").write_text(json.dumps({"steps": 999}))
    with pytest.raises(SystemExit) as exit_info:
        paper_mini.main(["--quick", "--collect", "--workdir", str(tmp_path), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "different plan" in capsys.readouterr().err


def test_the_mismatch_knob_parses_and_rejects_bad_specs(capsys):
    import argparse

    parser = argparse.ArgumentParser()
    assert paper_mini.parse_setting("severe:12:5", parser) == paper_mini.Setting("severe", 12, 5)
    for bad in ("severe:12", "severe:x:5", ":12:5", "severe:0:5"):
        with pytest.raises(SystemExit):
            paper_mini.parse_setting(bad, parser)
        assert "NAME:KEPT_LAYERS:HEAL_STEPS" in capsys.readouterr().err
