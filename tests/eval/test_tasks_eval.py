"""`tropd eval` end to end on a tiny random model: every suite scored, table printed, JSON written (after each
suite, so an interrupted evaluation keeps the suites that finished)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import tiny_llama, tiny_tokenizer
from tropd.eval import tasks_eval
from tropd.cli import main


def test_eval_cli_prints_table_and_writes_json(tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_llama(vocab_size=64, layers=2).save_pretrained(model_dir)
    tiny_tokenizer(64).save_pretrained(model_dir)
    out = tmp_path / "eval.json"
    rc = main(["eval", "--model", str(model_dir), "--tasks", "math,code,if,mcq", "--n", "2", "--limit", "2",
               "--max-new-tokens", "4", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    for i, task in enumerate(("math", "code", "if", "mcq"), 1):
        assert f"| {task} |" in printed and f"[{i}/4] {task}: avg@n=" in printed
    result = json.loads(out.read_text())
    assert set(result["tasks"]) == {"math", "code", "if", "mcq"}
    for row in result["tasks"].values():
        assert row["problems"] == 2 and row["samples"] == 4
        assert 0.0 <= row["avg@n"] <= 1.0 and 0.0 <= row["pass@1"] <= row["pass@2"] <= 1.0
        assert 1 <= row["mean_response_tokens"] <= 4 and 0.0 <= row["truncation_rate"] <= 1.0


def test_eval_rejects_unknown_suite(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path), "--tasks", "poetry"]) == 2
    assert "unknown suite" in capsys.readouterr().err


def _tiny_model_dir(tmp_path):
    model_dir = tmp_path / "model"
    tiny_llama(vocab_size=64, layers=2).save_pretrained(model_dir)
    tiny_tokenizer(64).save_pretrained(model_dir)
    return model_dir


@pytest.mark.parametrize("stop", [RuntimeError("sandbox died"), KeyboardInterrupt()], ids=["failure", "ctrl-c"])
def test_eval_keeps_the_suites_that_finished(tmp_path, monkeypatch, stop):
    """The JSON is rewritten after each suite: when the second suite fails or is interrupted, the first stays."""
    real = tasks_eval.evaluate_examples
    seen_before = {}

    def fake(model, tokenizer, examples, *, task, **kw):
        if out.exists():
            seen_before[task] = json.loads(out.read_text())
        if task == "if":
            raise stop
        return real(model, tokenizer, examples, task=task, **kw)

    monkeypatch.setattr(tasks_eval, "evaluate_examples", fake)
    out = tmp_path / "res" / "eval.json"
    printed = []
    with pytest.raises(type(stop)):
        tasks_eval.run_eval(str(_tiny_model_dir(tmp_path)), ["math", "if", "mcq"], n=1, limit=1, max_new_tokens=2,
                            json_path=str(out), console=printed.append)
    result = json.loads(out.read_text())
    assert list(result["tasks"]) == ["math"] and result["complete"] is False
    assert result["requested_tasks"] == ["math", "if", "mcq"]
    assert result["tasks"]["math"]["problems"] == 1 and result["tasks"]["math"]["wall_s"] >= 0
    assert list(seen_before["if"]["tasks"]) == ["math"]  # written before the next suite started
    assert printed[0].startswith("[1/3] math: avg@n=") and "1 problems" in printed[0]
    assert printed[-1] == f"stopped after 1 of 3 suites; {out} holds math"
    assert [p.name for p in out.parent.iterdir()] == ["eval.json"]  # no temporary file left behind


def test_eval_prints_a_line_per_suite_as_it_finishes(tmp_path, monkeypatch):
    out = tmp_path / "eval.json"
    snapshots = []
    real_write = tasks_eval.write_text_atomic

    def spy(path, text):
        real_write(path, text)
        snapshots.append(json.loads(out.read_text()))

    monkeypatch.setattr(tasks_eval, "write_text_atomic", spy)
    printed = []
    tasks_eval.run_eval(str(_tiny_model_dir(tmp_path)), ["mcq", "math"], n=1, limit=1, max_new_tokens=2,
                        json_path=str(out), console=printed.append)
    assert [list(s["tasks"]) for s in snapshots] == [["mcq"], ["mcq", "math"]]
    assert [s["complete"] for s in snapshots] == [False, True]
    assert printed[0].startswith("[1/2] mcq:") and printed[1].startswith("[2/2] math:")
    assert printed[-1] == f"wrote {out}"
