"""`tropd eval` end to end on a tiny random model: every suite scored, table printed, JSON written."""

from __future__ import annotations

import json

from tests.helpers import tiny_llama, tiny_tokenizer
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
    for task in ("math", "code", "if", "mcq"):
        assert f"| {task} |" in printed
    result = json.loads(out.read_text())
    assert set(result["tasks"]) == {"math", "code", "if", "mcq"}
    for row in result["tasks"].values():
        assert row["problems"] == 2 and row["samples"] == 4
        assert 0.0 <= row["avg@n"] <= 1.0 and 0.0 <= row["pass@1"] <= row["pass@2"] <= 1.0
        assert 1 <= row["mean_response_tokens"] <= 4 and 0.0 <= row["truncation_rate"] <= 1.0


def test_eval_rejects_unknown_suite(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path), "--tasks", "poetry"]) == 2
    assert "unknown suite" in capsys.readouterr().err
