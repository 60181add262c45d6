"""The benchmark scripts run end to end in their --quick mode (tiny sizes, tiny random models), so that a change in
tropd, TRL or transformers that breaks one shows in CI instead of at the next measurement."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: The vLLM variants run beside tropd's own in the same benchmark call where vLLM is installed (CI: its CPU build).
HAS_VLLM = importlib.util.find_spec("vllm") is not None


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_speed_quick_runs_every_kernel(tmp_path):
    # every kernel in one process (the timings and memory are not what this checks): one start-up, not seven
    assert _script("speed").main(["--quick", "--repeats", "1", "--one-process", "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "speed_quick.json").read_text())["results"]
    speed = _script("speed")
    for kernel in speed.FROM_LOGITS + speed.FROM_HIDDEN:
        assert "seconds" in row[kernel], (kernel, row[kernel])


@pytest.mark.slow
def test_step_quick_times_tropd_and_trl(tmp_path):
    kinds = ["trl_distill", "trl_gkd", "opd"] + (["opd_vllm"] if HAS_VLLM else [])
    assert _script("step").main(["--quick", "--steps", "2", "--tokens", "8", "--kinds", ",".join(kinds),
                                 "--jobs", "2", "--out", str(tmp_path)]) == 0  # two runs at a time
    results = json.loads((tmp_path / "step_quick.json").read_text())["results"]
    for kind in kinds:
        assert results[kind].get("total", 0) > 0, (kind, results[kind])
    assert results["opd"]["sampling"] > 0 and results["opd"]["backward"] > 0
    # each side's effective settings are recorded; TRL's gradient checkpointing (its default) is off, so that
    # GKDTrainer's generate keeps its KV cache
    for kind in ("trl_distill", "trl_gkd"):
        config = results[kind]["settings"]["config"]
        assert config["gradient_checkpointing"] is False and config["beta"] == 1.0, (kind, config)
    assert results["trl_gkd"]["settings"]["config"]["lmbda"] == 1.0
    assert results["opd"]["settings"]["config"]["objective"]["name"] == "opd"
    if HAS_VLLM:  # opd with vLLM rollouts: the same tokens, and vLLM samples the trained student (weights pushed)
        assert "error" not in results["opd_vllm"], results["opd_vllm"]
        assert results["opd_vllm"]["tokens"] == results["opd"]["tokens"] == 4 * 8
        assert results["opd_vllm"]["settings"]["config"]["rollout"]["engine"] == "vllm"
        assert results["opd_vllm"]["behavior_gap_max"] < 1e-3


@pytest.mark.slow
def test_decode_quick_static_cache_samples_what_the_dynamic_one_does(tmp_path):
    variants = ["dynamic", "static"] + (["vllm"] if HAS_VLLM else [])
    assert _script("decode").main(["--quick", "--variants", ",".join(variants), "--repeats", "1",
                                   "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "decode_quick.json").read_text())["results"]
    assert results["dynamic@4"]["tokens"] == 4 * 64
    assert results["static@4"]["max_logprob_diff"] < 1e-4 and results["static@4"]["rows_identical"] >= 1
    if HAS_VLLM:  # vLLM's engine timed beside tropd's sampler, call for call in its process
        vllm = results["vllm@4"]
        assert vllm["tokens"] == 4 * 64 and vllm["tokens_per_s"] > 0 and "rows_identical" not in vllm
        assert vllm["vs_dynamic"] == vllm["paired_dynamic_seconds"] / vllm["seconds"]  # timed in the same process
        assert "| 4 | vllm |" in (tmp_path / "decode_quick.md").read_text()


def test_activations_quick_shows_checkpointing_keeps_one_hidden_state_per_layer(tmp_path):
    assert _script("activations").main(["--quick", "--repeats", "1", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "activations_quick.json").read_text())["results"]
    hidden_fp32 = 32 * 4  # the tiny model's float32 hidden state, bytes per token
    for precision in ("float32", "bf16 autocast"):
        plain = results[f"{precision}, plain"]["bytes_per_token_per_layer"]
        kept = results[f"{precision}, gradient checkpointing"]["bytes_per_token_per_layer"]
        assert kept == hidden_fp32 and plain > 5 * kept, (precision, plain, kept)


@pytest.mark.parametrize("start", ["constant", "annealed"])
def test_gym_gradient_noise_quick_measures_every_method(tmp_path, monkeypatch, start):
    monkeypatch.setenv("TROPD_CACHE", str(tmp_path / "cache"))
    noise = _script("gym_gradient_noise")
    flags = ["--annealed"] if start == "annealed" else []
    assert noise.main(["--quick", "--draws", "5", "--out", str(tmp_path), *flags]) == 0
    stem = "gym_gradient_noise" + ("_annealed" if start == "annealed" else "") + "_quick"
    data = json.loads((tmp_path / f"{stem}.json").read_text())
    assert data["meta"]["start"].startswith(start)
    for method in noise.METHODS:
        for size in ("8", "16"):
            stats = data["methods"][method][size]
            assert -1.0 <= stats["cos"] <= 1.0 and stats["snr"] > 0, (method, size, stats)
    assert 0.0 <= data["rewards"]["share_below_tau"] <= 1.0 and set(data["pool_cos_to_exact"]) == {
        "opd", "fkl_outlier", "sft"}
