"""The gym end to end on tiny models: models are trained once and cached by content, runs write records the
statistics read, an interrupted experiment continues from its finished runs, outputs are written, bad method
names or knob values fail before any training, and `tropd gym --quick` works from the command line."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from tropd.cli import main
from tropd.gym import models as gym_models
from tropd.gym import run as gym_run
from tropd.gym.models import DecoderSpec, SFTPlan, encode_example, trained_model
from tropd.gym.tokenizer import build_tokenizer

SPEC = replace(gym_run.QUICK, steps=2, eval_every=1, heldout=12, teacher_steps=12, student_steps=4)


def test_encode_example_puts_loss_on_completion_and_eos_only():
    tok = build_tokenizer()
    ids, n_prompt, labels = encode_example(tok, "12+34=", "2+4=6 #### 46")
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[1:n_prompt]) == "12+34=" and tok.decode(ids[n_prompt:-1]) == "2+4=6 #### 46"
    assert labels == ids[n_prompt:]


def test_recovery_examples_read_a_corrupted_trace_and_learn_the_clean_one():
    """With ``recovery``, the input holds corrupted steps while every label is the clean trace's token: the model
    learns the right next step after a wrong one; each revisit draws other corruptions."""
    from tropd.gym.models import target
    from tropd.gym.tasks import completion, make_dataset

    plan = SFTPlan(("add", "modchain", "sort"), recovery=0.5, seed=3)
    tok = build_tokenizer()
    problems = make_dataset(list(plan.families), "train", 30, seed=0)
    corrupted = 0
    for p in problems:
        seen, clean = target(p, plan, 0)
        assert clean == completion(p) and len(seen) == len(clean)
        ids, n_prompt, labels = encode_example(tok, p.prompt, seen, clean)
        assert tok.decode(labels[:-1]) == clean and tok.decode(ids[n_prompt:-1]) == seen
        corrupted += seen != clean
        assert {target(p, plan, d)[0] for d in range(6)} != {seen} or seen == clean
    assert corrupted > 10
    plain = SFTPlan(("add",), seed=3)
    assert all(target(p, plain, 0) == (completion(p),) * 2 for p in problems if p.family == "add")


def test_alt_share_is_per_problem_and_nested():
    from tropd.gym.models import target
    from tropd.gym.tasks import completion, make_dataset

    problems = make_dataset(["add", "modchain", "sort"], "train", 300, seed=0)

    def alt(share):
        return {p.key for p in problems if target(p, SFTPlan(("add",), alt_share=share, seed=1), 0)[1]
                == completion(p, "alt")}

    quarter, half, everything = alt(0.25), alt(0.5), alt(1.0)
    assert alt(0.0) == set() and len(everything) == 300
    assert quarter <= half <= everything and 50 < len(quarter) < 100 and 120 < len(half) < 180


@pytest.mark.parametrize("field", ["alt_share", "recovery", "noise"])
def test_plan_shares_outside_0_1_are_refused(field):
    with pytest.raises(ValueError, match=f"SFTPlan.{field} must be a number in"):
        SFTPlan(("add",), **{field: 1.5})


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


def test_models_trained_side_by_side_equal_those_trained_in_turn(tmp_path):
    spec = replace(SPEC, teacher_steps=2, student_steps=2, heldout=4)
    a = gym_run.trained_models(spec, (0.0, 1.0), tmp_path / "a", log=lambda *_: None, workers=1)
    b = gym_run.trained_models(spec, (0.0, 1.0), tmp_path / "b", log=lambda *_: None, workers=2)
    pairs = [(a["teacher"], b["teacher"])] + [(a["students"][m], b["students"][m]) for m in (0.0, 1.0)]
    for x, y in pairs:
        assert Path(x).name == Path(y).name
        assert (Path(x) / "model.safetensors").read_bytes() == (Path(y) / "model.safetensors").read_bytes()
    assert a["start_eval"] == b["start_eval"]


def test_models_train_on_one_thread_whatever_the_callers_count(tmp_path, monkeypatch):
    """A matmul's summation order depends on the thread count: models trained on 1 and 2 threads differed."""
    seen = []
    monkeypatch.setattr(gym_models, "sft", lambda *a, **k: seen.append(torch.get_num_threads()) or [0.0])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        trained_model(DecoderSpec(hidden=16, layers=1, heads=2, intermediate=32), SFTPlan(("add",), steps=1), tmp_path)
        assert seen == [1] and torch.get_num_threads() == 2, "trained on one thread, the caller's count restored"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("seeds, mismatch, error", [
    ({"nope": 1}, (0.0,), "unknown gym method 'nope'"),
    ({"opd": 1}, ("far",), r"mismatch 'far' is not a share in \[0, 1\]"),
    ({"opd": 1}, (1.5,), r"mismatch 1.5 is not a share in \[0, 1\]"),
    ({"opd": 1}, (float("nan"),), r"mismatch nan is not a share"),
])
def test_bad_names_and_knob_values_fail_before_training(tmp_path, seeds, mismatch, error):
    with pytest.raises(ValueError, match=error):
        gym_run.run_gym(SPEC, seeds, mismatch, tmp_path, workers=1, cache=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_spec_key_ignores_learning_rates_and_runs_name_their_own(monkeypatch):
    tuned = replace(SPEC, lrs=(("opd", 3e-5),))
    assert tuned.key() == SPEC.key() and tuned.lr_of("opd") == 3e-5 and tuned.lr_of("tropd") == SPEC.lr
    key = SPEC.key()
    monkeypatch.setattr(gym_run, "RECIPE_VERSION", gym_run.RECIPE_VERSION + 1)
    assert SPEC.key() != key, "retrained models (a new recipe version) never reuse the old runs"
    assert tuned.with_budget(lr=2e-4).lr_of("opd") == 2e-4, "one --lr replaces every method's rate"
    job = gym_run.RunJob(tuned, 0.25, "opd", 1, "t", "s", "/w", "p")
    assert gym_run.run_folder(job).parts[-2:] == ("mismatch-0.25", "opd-lr3e-05-seed1")
    assert gym_run.run_folder(replace(job, split="valid")).name == "opd-lr3e-05-seed1-valid"


def test_run_records_outputs_and_resume(tmp_path, monkeypatch):
    cache, work = tmp_path / "cache", tmp_path / "work"
    result = gym_run.run_gym(SPEC, {"opd": 1, "tropd": 1}, (0.0, 1.0), work, workers=1, cache=cache,
                             log=lambda *_: None)
    runs = result["runs"]
    assert sorted((r["mismatch"], r["method"]) for r in runs) == [
        (0.0, "opd"), (0.0, "tropd"), (1.0, "opd"), (1.0, "tropd")]
    for r in runs:
        assert r["eval_steps"] == [0, 1, 2] and len(r["accuracy"]) == 3 and r["steps"] == 2
        assert all(0.0 <= a <= 1.0 for a in r["accuracy"]) and len(r["grad_norm"]) == 2
        assert set(r["family_accuracy"]) == set(SPEC.families) and r["lr"] == SPEC.lr and r["split"] == "heldout"
        folder = work / SPEC.key() / f"mismatch-{r['mismatch']:g}" / f"{r['method']}-lr{SPEC.lr:g}-seed0"
        assert (folder / "record.json").is_file() and not (folder / "checkpoints").exists()
    ctx = result["context"]
    assert set(ctx["mismatch_start"]) == {"0", "1"} and 0.0 <= ctx["teacher_accuracy"] <= 1.0
    # every run starts from its knob value's student: the step-0 evaluation equals the cached start's
    for r in runs:
        assert r["accuracy"][0] == pytest.approx(ctx["mismatch_start"][f"{r['mismatch']:g}"]["accuracy"])

    paths = gym_run.write_outputs(result, tmp_path / "out", "gym", {"command": "test", "duration": 1.0})
    data = json.loads(paths["json"].read_text())
    assert {row["mismatch"] for row in data["comparisons"]} == {0.0, 1.0}
    text = paths["md"].read_text()
    assert "tropd" in text and "## Final accuracy along the mismatch knob" in text and "## Mismatch 1" in text
    assert paths["png"].stat().st_size > 1000

    # an interrupted experiment: one record lost -> only that run trains again
    (work / SPEC.key() / "mismatch-1" / f"tropd-lr{SPEC.lr:g}-seed0" / "record.json").unlink()
    trained = []
    from tropd.train import run as train_run

    original = train_run.train_from_config
    monkeypatch.setattr(train_run, "train_from_config", lambda cfg, **k: trained.append(cfg) or original(cfg, **k))
    again = gym_run.run_gym(SPEC, {"opd": 1, "tropd": 1}, (0.0, 1.0), work, workers=1, cache=cache,
                            log=lambda *_: None)
    assert len(trained) == 1 and trained[0].objective.name == "tropd"
    redone = next(r for r in again["runs"] if (r["mismatch"], r["method"]) == (1.0, "tropd"))
    before = next(r for r in runs if (r["mismatch"], r["method"]) == (1.0, "tropd"))
    assert redone["accuracy"] == before["accuracy"] and redone["grad_norm"] == before["grad_norm"]


def test_a_runs_step0_evaluation_is_its_starts_which_is_why_it_is_reused(tmp_path):
    """Measured afresh (no ``start_eval``), a run's step-0 evaluation equals its start's held-out evaluation, in
    every metric; given one, the run records it at step 0 and still evaluates its later steps itself."""
    models = gym_run.trained_models(SPEC, (0.5,), tmp_path / "cache", log=lambda *_: None)
    prompts = gym_run.write_prompts(SPEC, tmp_path / "p.jsonl", n=200)
    start = models["start_eval"]["0.5"]

    def job(name: str, start_eval) -> gym_run.RunJob:
        return gym_run.RunJob(SPEC, 0.5, "opd", 0, models["teacher"], models["students"][0.5],
                              str(tmp_path / name), str(prompts), start_eval=start_eval)

    fresh = gym_run.run_one(job("fresh", None))
    assert fresh["accuracy"][0] == pytest.approx(start["accuracy"])
    assert fresh["teacher_nll"][0] == pytest.approx(start["teacher_nll"], rel=1e-5)
    assert fresh["distinct"][0] == pytest.approx(start["distinct"])
    marked = {**start, "accuracy": 0.123456}  # a value no evaluation of 12 problems can give
    reused = gym_run.run_one(job("reused", marked))
    assert reused["accuracy"][0] == 0.123456 and reused["accuracy"][1:] == fresh["accuracy"][1:]
    assert reused["grad_norm"] == fresh["grad_norm"]


def test_validation_runs_evaluate_on_the_validation_split(tmp_path):
    result = gym_run.run_gym(SPEC, {"opd": 1}, (0.0,), tmp_path / "w", workers=1, cache=tmp_path / "cache",
                             log=lambda *_: None, split="valid")
    (run,) = result["runs"]
    assert run["split"] == "valid" and result["context"]["eval_problems"] == SPEC.valid
    held = {p.key for p in gym_run.eval_problems(SPEC, "heldout")}
    assert not held & {p.key for p in gym_run.eval_problems(SPEC, "valid")}


def test_cli_quick(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TROPD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gym_run, "QUICK", replace(SPEC, steps=1, eval_every=1))
    code = main(["gym", "--quick", "--mismatch", "0.25", "--seeds", "1", "--workers", "1", "--objective", "fkl",
                 "--lr", "5e-4", "--workdir", str(tmp_path / "w")])
    out = capsys.readouterr().out
    assert code == 0
    assert "fkl" in out and "opd" in out and "tropd" in out
    assert (Path(tmp_path / "w") / "gym.md").is_file() and (tmp_path / "w" / "gym.png").is_file()
    assert "**budget**: 1 steps; learning rates: opd 0.0005, tropd 0.0005, fkl 0.0005" in (
        tmp_path / "w" / "gym.md").read_text()
    configs = list((tmp_path / "w").glob("*/mismatch-0.25/opd-lr0.0005-seed0/config.yaml"))
    assert len(configs) == 1 and yaml.safe_load(configs[0].read_text())["train"]["lr"] == 5e-4


def test_benchmark_script_quick(tmp_path, monkeypatch):
    """`python benchmarks/gym.py --quick` (run in CI) writes gym_quick.{json,md,png} with every method and level."""
    bench = _benchmark()
    monkeypatch.setenv("TROPD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gym_run, "QUICK", replace(SPEC, steps=1, eval_every=1))
    assert bench.main(["--quick", "--workers", "1", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gym_quick.json").read_text())
    assert {(r["mismatch"], r["method"]) for r in data["runs"]} == {
        (m, method) for m in (0.0, 1.0) for method in ("opd", "tropd", "gkd")}
    assert {c["a"] for c in data["comparisons"]} == {"tropd", "gkd"}
    assert (tmp_path / "gym_quick.md").is_file() and (tmp_path / "gym_quick.png").is_file()


def test_benchmark_sweep_picks_each_methods_best_rate_on_validation(tmp_path, monkeypatch):
    bench = _benchmark()
    monkeypatch.setenv("TROPD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gym_run, "QUICK", replace(SPEC, steps=1, eval_every=1))
    assert bench.main(["--quick", "--sweep", "--sweep-lrs", "1e-4,1e-3", "--sweep-mismatch", "0", "--workers", "1",
                       "--workdir", str(tmp_path / "w"), "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gym_sweep.json").read_text())
    assert {(r["method"], r["lr"], r["split"]) for r in data["runs"]} == {
        (m, lr, "valid") for m in ("opd", "tropd", "gkd") for lr in (1e-4, 1e-3)}
    assert set(data["chosen"]) == {"opd", "tropd", "gkd"}
    assert "GymSpec.lrs = (" in (tmp_path / "gym_sweep.md").read_text()
    runs = [{"method": "a", "lr": lr, "mismatch": m, "accuracy": [0.1, acc]}
            for lr, m, acc in ((1e-4, 0, 0.5), (1e-4, 1, 0.1), (3e-4, 0, 0.4), (3e-4, 1, 0.3))]
    assert bench.best_rates(runs) == {"a": (3e-4, pytest.approx(0.35))}
    assert bench.best_rates(runs, (0.0,)) == {"a": (1e-4, pytest.approx(0.5))}, "only the chosen knob values count"


def test_benchmark_mechanism_quick_runs_every_contrast(tmp_path, monkeypatch):
    bench = _benchmark()
    monkeypatch.setenv("TROPD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gym_run, "QUICK", replace(SPEC, steps=1, eval_every=1))
    assert bench.main(["--quick", "--mechanism", "--workers", "1", "--workdir", str(tmp_path / "w"),
                       "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gym_mechanism_quick.json").read_text())
    assert set(data["results"]) == set(bench.MECHANISM)
    for condition, (_, lr, methods) in bench.MECHANISM.items():
        runs = data["results"][condition]["runs"]
        assert {r["method"] for r in runs} == set(methods) and {r["lr"] for r in runs} == {lr}
    annealed = data["results"]["annealed start"]["context"]["spec"]
    assert annealed["student_schedule"] == "cosine" and annealed["teacher_recovery"] == 0.0
    assert data["results"]["constant-lr start (600 steps)"]["context"]["spec"]["student_schedule"] == "constant"
    text = (tmp_path / "gym_mechanism_quick.md").read_text()
    assert "| annealed start | " in text and "self_sft" in text


def test_every_probe_is_one_valid_change_to_the_gym():
    bench = _benchmark()
    assert list(bench.PROBES)[0] == "the first gym (600-step student)"
    assert bench.PROBES["the first gym (600-step student)"][0] == {**gym_run.SECOND_BUDGET, **gym_run.FIRST_START}
    second = replace(gym_run.GymSpec(), **gym_run.SECOND_BUDGET)
    gym = [label for label, (changes, _, _) in bench.PROBES.items() if replace(gym_run.GymSpec(), **changes) == second]
    assert gym == ["student of 700 SFT steps (the gym)"]  # the second design is one of the rows, named as such
    # the budget probes are the third design at a constant rate or with its linear decay from two peak rates
    assert [replace(gym_run.GymSpec(), **changes) == gym_run.GymSpec() for changes, _, _ in
            bench.BUDGET_PROBES.values()] == [False, True, True]
    for label, (changes, lr, seeds) in {**bench.PROBES, **bench.BUDGET_PROBES}.items():
        spec = replace(gym_run.GymSpec(), **changes, lr=lr, lrs=())  # an unknown field would raise here
        assert spec.lr_of("opd") == lr and seeds >= 1, label
    # the collapse probes: the gym itself (each method's own rate), then warm-up or a lower peak, one at a time
    collapse = [replace(gym_run.GymSpec(), **changes) for changes, _, _ in bench.COLLAPSE_PROBES.values()]
    assert collapse[0] == gym_run.GymSpec() and [c.lr_warmup_steps for c in collapse] == [0, 20, 50, 0]
    assert [lr for _, lr, _ in bench.COLLAPSE_PROBES.values()] == [None, None, None, 1e-4]
    assert gym_run.GymSpec().lr_of("opd") == gym_run.GymSpec().lr_of("tropd") == 2e-4  # 1e-4 is half their peak
    assert bench.PROBE_SETS["collapse"][1:3] == (("opd", "tropd"), 1.0)


@pytest.mark.parametrize("stem", ["gym_probes", "gym_probes_budget", "gym_probes_collapse", "gym_mechanism"])
def test_committed_probes_and_contrasts_ran_the_specs_their_entries_give(stem):
    """The design probes and the mechanism contrasts pin the run budget they ran with, so their commands still
    reproduce benchmarks/results/gym_probes.json and gym_mechanism.json now that the gym's own budget is another."""
    from dataclasses import asdict

    bench = _benchmark()
    data = json.loads((Path(__file__).resolve().parents[2] / "benchmarks" / "results" / f"{stem}.json").read_text())
    entries = {"gym_probes": bench.PROBES, "gym_probes_budget": bench.BUDGET_PROBES,
               "gym_probes_collapse": bench.COLLAPSE_PROBES, "gym_mechanism": bench.MECHANISM}[stem]
    spec = gym_run.GymSpec()
    if stem == "gym_mechanism":
        assert data["meta"]["command"].endswith("--mechanism --steps 150")
        spec = spec.with_budget(steps=150)
    assert list(data["results"]) == list(entries)
    defaults = gym_run._jsonable(asdict(gym_run.GymSpec()))
    for label, (changes, lr, _) in entries.items():
        expected = gym_run._jsonable(asdict(replace(spec, **changes) if lr is None else
                                            replace(spec, **changes, lr=lr, lrs=())))
        recorded = data["results"][label]["context"]["spec"]
        assert recorded == {k: v for k, v in expected.items() if k in recorded}, label
        # a field GymSpec gained after the run (student_seed) is at its default, the value the run had
        assert all(expected[k] == defaults[k] for k in expected.keys() - recorded.keys()), label


def test_benchmark_probes_quick_runs_each_probe_on_validation(tmp_path, monkeypatch):
    bench = _benchmark()
    probes = {k: bench.PROBES[k] for k in ("lr 1e-4", "linear decay from 2e-4", "64 prompts x 1 response",
                                           "student of 500 SFT steps")}
    monkeypatch.setitem(bench.PROBE_SETS, "design", (probes, ("opd",), 0.0, "title"))
    monkeypatch.setenv("TROPD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gym_run, "QUICK", replace(SPEC, steps=1, eval_every=1))
    assert bench.main(["--quick", "--probes", "--workers", "1", "--workdir", str(tmp_path / "w"),
                       "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gym_probes_quick.json").read_text())
    assert list(data["results"]) == list(probes)
    for label, (changes, lr, _) in probes.items():
        result = data["results"][label]
        assert [(r["method"], r["lr"], r["split"]) for r in result["runs"]] == [("opd", lr, "valid")], label
        for key in ("lr_schedule", "rollouts_per_prompt", "prompts_per_step"):
            if key in changes:
                assert result["context"]["spec"][key] == changes[key], (label, key)
    text = (tmp_path / "gym_probes_quick.md").read_text()
    assert all(f"| {label} | " in text for label in probes)


def test_benchmark_probes_collapse_runs_opd_and_tropd_at_knob_1_with_warm_up(tmp_path, monkeypatch):
    bench = _benchmark()
    monkeypatch.setenv("TROPD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gym_run, "QUICK", replace(SPEC, steps=2, eval_every=1, lrs=(("opd", 3e-4), ("tropd", 2e-4))))
    assert bench.main(["--quick", "--probes", "collapse", "--workers", "1", "--workdir", str(tmp_path / "w"),
                       "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gym_probes_collapse_quick.json").read_text())
    assert list(data["results"]) == list(bench.COLLAPSE_PROBES)
    rates = {label: sorted((r["method"], r["mismatch"], r["lr"]) for r in result["runs"])
             for label, result in data["results"].items()}
    assert rates["the gym (linear decay from the peak)"] == [("opd", 1.0, 3e-4), ("tropd", 1.0, 2e-4)]  # their own
    assert rates["half the peak (linear decay from 1e-4)"] == [("opd", 1.0, 1e-4), ("tropd", 1.0, 1e-4)]
    warm = data["results"]["20 warm-up steps to the peak"]
    assert warm["context"]["spec"]["lr_warmup_steps"] == 1  # at most steps - 1 under --quick
    assert data["results"]["the gym (linear decay from the peak)"]["context"]["spec"]["lr_warmup_steps"] == 0
    runs = tmp_path / "w" / "quick" / replace(gym_run.QUICK, lr_warmup_steps=1).key() / "mismatch-1"
    assert len(list(runs.glob("*-valid"))) == 2  # the warm-up runs have folders of their own ...
    config = yaml.safe_load(next(runs.glob("opd-*-valid")).joinpath("config.yaml").read_text())
    assert config["train"]["lr_warmup_steps"] == 1  # ... and train with it
    text = (tmp_path / "gym_probes_collapse_quick.md").read_text()
    assert "| 20 warm-up steps to the peak | tropd | 1 | " in text and "after 1 warm-up steps" in text
    assert "| the gym (linear decay from the peak) | " in text.split("`tropd` − `opd`")[1]  # the paired table


def _benchmark():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gym.py"
    module_spec = importlib.util.spec_from_file_location("gym_benchmark", path)
    bench = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(bench)
    return bench


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


@pytest.mark.parametrize("value", ["1.5", "x", "-0.1"])
def test_cli_refuses_a_knob_value_outside_0_1_before_any_work(tmp_path, capsys, value):
    assert main(["gym", "--quick", f"--mismatch={value}", "--workdir", str(tmp_path / "w")]) == 2
    assert "is not a share in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_cli_refuses_a_missing_plugin_in_one_line(tmp_path, capsys):
    assert main(["gym", "--quick", "--plugin", "no_such_module_xyz", "--workdir", str(tmp_path / "w")]) == 2
    assert "--plugin no_such_module_xyz: cannot import it" in capsys.readouterr().err


def test_cli_help_states_the_gyms_real_step_budget(capsys):
    with pytest.raises(SystemExit):
        main(["gym", "--help"])
    assert f"the gym's {gym_run.GymSpec.steps};" in " ".join(capsys.readouterr().out.split())


def test_inner_seeds_apply_strictly_inside_the_knob_range_only():
    models = {"teacher": "T", "students": {0.0: "S0", 0.5: "S5", 1.0: "S1"},
              "start_eval": {"0": {"accuracy": 0.7}, "0.5": {"accuracy": 0.5}, "1": {"accuracy": 0.3}}}
    jobs = gym_run.plan_jobs(SPEC, models, (0.0, 0.5, 1.0), {"opd": 3, "sft": 3}, Path("w"), Path("p.jsonl"),
                             inner_seeds={"sft": 1})
    # each held-out job carries its own start's evaluation (its step 0); validation jobs measure theirs
    assert all(j.start_eval == models["start_eval"][f"{j.mismatch:g}"] for j in jobs)
    assert all(j.start_eval is None for j in gym_run.plan_jobs(SPEC, models, (0.5,), {"opd": 1}, Path("w"),
                                                               Path("p.jsonl"), split="valid"))
    count = {}
    for job in jobs:
        count[(job.method, job.mismatch)] = count.get((job.method, job.mismatch), 0) + 1
    assert count == {("opd", 0.0): 3, ("opd", 0.5): 3, ("opd", 1.0): 3, ("sft", 0.0): 3, ("sft", 0.5): 1,
                     ("sft", 1.0): 3}
    assert [j.seed for j in jobs if (j.method, j.mismatch) == ("sft", 0.5)] == [0]


def test_a_run_stopped_early_writes_no_record_and_runs_again(tmp_path, monkeypatch):
    """A stop request (SIGTERM) ends training cleanly before the last step: that is not a finished run."""
    from tropd.train import run as train_run

    original = train_run.train_from_config
    monkeypatch.setattr(train_run, "train_from_config",
                        lambda cfg, **k: original(cfg.with_overrides(**{"train.steps": 1}), **k))
    with pytest.raises(RuntimeError, match="stopped at step 1 of 2"):
        gym_run.run_gym(SPEC, {"opd": 1}, (0.0,), tmp_path / "w", workers=1, cache=tmp_path / "cache",
                        log=lambda *_: None)
    assert not list((tmp_path / "w").rglob("record.json"))


@pytest.mark.parametrize("stem,student_seed", [("gym", 1), ("gym_student_seed2", 2)])
def test_committed_gym_results_come_from_the_committed_spec(stem, student_seed):
    """benchmarks/results/gym.json ran GymSpec() as committed, whose learning rates are gym_sweep.json's choices, and
    every run records its method, seed, knob value and accuracy curve (what docs/results.md §3 reads);
    gym_student_seed2.json ran the same spec from another set of starting students."""
    from dataclasses import asdict

    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    gym = json.loads((results / f"{stem}.json").read_text())
    spec = gym_run._jsonable(asdict(replace(gym_run.GymSpec(), student_seed=student_seed)))
    recorded = gym["context"]["spec"]
    assert recorded == {k: v for k, v in spec.items() if k in recorded}
    assert {k: spec[k] for k in spec.keys() - recorded.keys()} == gym_run._LATER_FIELDS  # gained since, at default
    if student_seed == 1:  # so the spec's key, and the folders of the runs behind these results, are unchanged
        assert gym_run.spec_key(recorded) == gym_run.GymSpec().key()
    chosen = json.loads((results / "gym_sweep.json").read_text())["chosen"]
    assert {m: lr for m, (lr, _) in chosen.items()} == dict(gym_run.GymSpec().lrs)
    for run in gym["runs"]:
        assert {"method", "seed", "mismatch"} <= set(run) and len(run["accuracy"]) == len(run["eval_steps"]) >= 2


def test_benchmark_student_seed_trains_and_reports_another_set_of_students(tmp_path, monkeypatch):
    bench = _benchmark()
    monkeypatch.setenv("TROPD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gym_run, "QUICK", replace(SPEC, steps=1, eval_every=1))
    assert bench.main(["--quick", "--student-seed", "2", "--workers", "1", "--workdir", str(tmp_path / "w"),
                       "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gym_quick_student_seed2.json").read_text())
    assert data["context"]["spec"]["student_seed"] == 2
    other = replace(SPEC, student_seed=2)
    for m in (0.0, 1.0):  # its students are another seed's, not the default set's
        assert gym_models.cache_key(other.student, other.student_plan(m)) != gym_models.cache_key(
            SPEC.student, SPEC.student_plan(m))
        assert (tmp_path / "cache" / "gym" / gym_models.cache_key(other.student, other.student_plan(m))).is_dir()
    # every output of another set of students has its own name: it never overwrites the default set's results
    monkeypatch.setitem(bench.PROBE_SETS, "design", ({"lr 1e-4": bench.PROBES["lr 1e-4"]}, ("opd",), 0.0, "title"))
    assert bench.main(["--quick", "--probes", "--student-seed", "2", "--workers", "1", "--workdir",
                       str(tmp_path / "w"), "--out", str(tmp_path)]) == 0
    probes = json.loads((tmp_path / "gym_probes_quick_student_seed2.json").read_text())
    assert probes["results"]["lr 1e-4"]["context"]["spec"]["student_seed"] == 2
    assert not (tmp_path / "gym_probes_quick.json").exists()
