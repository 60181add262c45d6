"""The gym end to end on tiny models: models are trained once and cached by content, runs write records the
statistics read, an interrupted experiment continues from its finished runs, outputs are written, bad method
or level names fail before any training, and `tropd gym --quick` works from the command line."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from tropd.cli import main
from tropd.gym import models as gym_models
from tropd.gym import run as gym_run
from tropd.gym.models import DecoderSpec, SFTPlan, encode_example, trained_model
from tropd.gym.tokenizer import build_tokenizer

SPEC = replace(gym_run.QUICK, steps=2, eval_every=1, heldout=12, teacher_steps=12, student_steps=4)


def test_encode_example_puts_loss_on_completion_and_eos_only():
    tok = build_tokenizer()
    ids, n_prompt = encode_example(tok, "12+34=", "2+4=6 #### 46")
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[1:n_prompt]) == "12+34=" and tok.decode(ids[n_prompt:-1]) == "2+4=6 #### 46"


def test_trained_model_is_cached_by_content_and_deterministic(tmp_path, monkeypatch):
    spec = DecoderSpec(hidden=16, layers=1, heads=2, intermediate=32)
    plan = SFTPlan(("add",), steps=3, batch=4, examples=50)
    first = trained_model(spec, plan, tmp_path)
    info = json.loads((first / "gym.json").read_text())
    assert info["plan"]["steps"] == 3 and info["params"] > 0
    calls = []
    monkeypatch.setattr(gym_models, "sft", lambda *a, **k: calls.append(1) or [0.0])
    assert trained_model(spec, plan, tmp_path) == first and not calls, "a cached model must not be retrained"
    other = trained_model(spec, replace(plan, style="alt"), tmp_path)
    assert other != first and calls == [1], "another plan is another model"
    monkeypatch.undo()
    again = trained_model(spec, plan, tmp_path / "elsewhere")
    a = (first / "model.safetensors").read_bytes()
    assert a == (again / "model.safetensors").read_bytes(), "training must be deterministic for a plan"
    assert not list(tmp_path.glob(".*tmp*")), "no temporary folder may be left behind"


def test_bad_names_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="unknown gym method 'nope'"):
        gym_run.run_gym(SPEC, {"nope": 1}, ("matched",), tmp_path, workers=1, cache=tmp_path / "cache")
    with pytest.raises(ValueError, match="unknown mismatch level 'far'"):
        gym_run.run_gym(SPEC, {"opd": 1}, ("far",), tmp_path, workers=1, cache=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_run_records_outputs_and_resume(tmp_path, monkeypatch):
    cache, work = tmp_path / "cache", tmp_path / "work"
    result = gym_run.run_gym(SPEC, {"opd": 1, "tropd": 1}, ("matched", "alt"), work, workers=1, cache=cache,
                             log=lambda *_: None)
    runs = result["runs"]
    assert sorted((r["mismatch"], r["method"]) for r in runs) == [
        ("alt", "opd"), ("alt", "tropd"), ("matched", "opd"), ("matched", "tropd")]
    for r in runs:
        assert r["eval_steps"] == [0, 1, 2] and len(r["accuracy"]) == 3 and r["steps"] == 2
        assert all(0.0 <= a <= 1.0 for a in r["accuracy"]) and len(r["grad_norm"]) == 2
        assert set(r["family_accuracy"]) == set(SPEC.families)
        assert not (work / SPEC.key() / r["mismatch"] / f"{r['method']}-seed0" / "checkpoints").exists()
    ctx = result["context"]
    assert set(ctx["mismatch_start"]) == {"matched", "alt"} and 0.0 <= ctx["teacher_accuracy"] <= 1.0
    # every run starts from its level's student: the step-0 evaluation equals the cached start's
    for r in runs:
        assert r["accuracy"][0] == pytest.approx(ctx["mismatch_start"][r["mismatch"]]["accuracy"])

    paths = gym_run.write_outputs(result, tmp_path / "out", "gym", {"command": "test", "duration": 1.0})
    data = json.loads(paths["json"].read_text())
    assert {row["mismatch"] for row in data["comparisons"]} == {"matched", "alt"}
    assert "tropd" in paths["md"].read_text() and paths["png"].stat().st_size > 1000

    # an interrupted experiment: one record lost -> only that run trains again
    (work / SPEC.key() / "alt" / "tropd-seed0" / "record.json").unlink()
    trained = []
    from tropd.train import run as train_run

    original = train_run.train_from_config
    monkeypatch.setattr(train_run, "train_from_config", lambda cfg, **k: trained.append(cfg) or original(cfg, **k))
    again = gym_run.run_gym(SPEC, {"opd": 1, "tropd": 1}, ("matched", "alt"), work, workers=1, cache=cache,
                            log=lambda *_: None)
    assert len(trained) == 1 and trained[0].objective.name == "tropd"
    redone = next(r for r in again["runs"] if (r["mismatch"], r["method"]) == ("alt", "tropd"))
    before = next(r for r in runs if (r["mismatch"], r["method"]) == ("alt", "tropd"))
    assert redone["accuracy"] == before["accuracy"] and redone["grad_norm"] == before["grad_norm"]


def test_cli_quick(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TROPD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gym_run, "QUICK", replace(SPEC, steps=1, eval_every=1))
    code = main(["gym", "--quick", "--mismatch", "noisy", "--seeds", "1", "--workers", "1", "--objective", "fkl",
                 "--lr", "5e-4", "--workdir", str(tmp_path / "w")])
    out = capsys.readouterr().out
    assert code == 0
    assert "fkl" in out and "opd" in out and "tropd" in out
    assert (Path(tmp_path / "w") / "gym.md").is_file() and (tmp_path / "w" / "gym.png").is_file()
    assert "**budget**: 1 steps, lr 0.0005" in (tmp_path / "w" / "gym.md").read_text()
    configs = list((tmp_path / "w").glob("*/noisy/opd-seed0/config.yaml"))
    assert len(configs) == 1 and yaml.safe_load(configs[0].read_text())["train"]["lr"] == 5e-4


def test_benchmark_script_quick(tmp_path, monkeypatch):
    """`python benchmarks/gym.py --quick` (run in CI) writes gym_quick.{json,md,png} with every method and level."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gym.py"
    module_spec = importlib.util.spec_from_file_location("gym_benchmark", path)
    bench = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(bench)
    monkeypatch.setenv("TROPD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gym_run, "QUICK", replace(SPEC, steps=1, eval_every=1))
    assert bench.main(["--quick", "--workers", "1", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gym_quick.json").read_text())
    assert {(r["mismatch"], r["method"]) for r in data["runs"]} == {
        (lv, m) for lv in ("matched", "alt") for m in ("opd", "tropd", "gkd")}
    assert {c["a"] for c in data["comparisons"]} == {"tropd", "gkd"}
    assert (tmp_path / "gym_quick.md").is_file() and (tmp_path / "gym_quick.png").is_file()


@pytest.mark.parametrize("flag", ["--seeds", "--steps", "--workers"])
def test_cli_refuses_non_positive_counts_before_any_work(tmp_path, capsys, flag):
    assert main(["gym", "--quick", flag, "0", "--workdir", str(tmp_path / "w")]) == 2
    assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("lr", ["0", "-1e-4"])
def test_cli_refuses_a_non_positive_lr_before_any_work(tmp_path, capsys, lr):
    assert main(["gym", "--quick", f"--lr={lr}", "--workdir", str(tmp_path / "w")]) == 2
    assert f"--lr must be a positive learning rate, got {float(lr)}" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
