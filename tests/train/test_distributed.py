"""Data parallel on this CPU (gloo): `accelerate launch --num_processes 2 -m tropd train` ends with the same
student as one process, plain (DDP) or sharded (FSDP2, model.fsdp), resumes exactly, and mixed precision keeps
float32 master weights (tiny models)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train.runs import final_weights, write_config

ACCELERATE = Path(sys.executable).with_name("accelerate")
TIMEOUT = 300


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


#: the shipped 8-GPU accelerate config; with --num_processes 2 and model.device=cpu it runs 2 gloo processes here
EIGHT_GPUS = Path(__file__).resolve().parents[2] / "tropd" / "configs" / "accelerate" / "8gpu.yaml"


def tropd(args: list[str], processes: int = 1, mode: tuple[str, ...] = ("--multi_gpu",), rc: int = 0,
          program: tuple[str, ...] = ("-m", "tropd")) -> subprocess.CompletedProcess:
    """``python -m tropd ARGS`` (or ``python PROGRAM ARGS``), or the same under ``accelerate launch`` with
    ``processes`` CPU processes."""
    if processes == 1:
        cmd = [sys.executable, *program, *args]
    else:  # --multi_gpu selects accelerate's torchrun launcher; model.device=cpu makes it gloo DDP on the CPU
        cmd = [str(ACCELERATE), "launch", *mode, "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", *program, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    assert proc.returncode == rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def config(teacher_dir, tmp_path_factory) -> Path:
    """tropd with sampled trust masks and guidance: every random stream is exercised. 8 rollouts a step, micro-
    batches of 2, so each of 2 processes holds 2 whole micro-batches."""
    root = tmp_path_factory.mktemp("dp")
    return write_config(root, teacher_dir, data={"eval_prompts": 0},
                        rollout={"max_new_tokens": 6, "rollouts_per_prompt": 2, "batch_size": 3},
                        train={"steps": 4, "prompts_per_step": 4, "micro_batch_size": 2, "save_every": 2})


@pytest.fixture(scope="module")
def one_process(config, tmp_path_factory) -> Path:
    """The config's run in one plain process: what every multi-process layout must reproduce."""
    run = tmp_path_factory.mktemp("one") / "run"
    tropd(["train", "--config", str(config), "--run-dir", str(run)])
    return run


def trainer_state(run: Path) -> dict:
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    return torch.load(ckpt / "trainer_state.pt", weights_only=False)


def rewind_to_step_2(run: Path) -> None:
    """Make a finished 4-step run look as if it had stopped right after its step-2 checkpoint."""
    ckpts = run / "checkpoints"
    (ckpts / "latest").write_text("step-000002\n")
    shutil.rmtree(ckpts / "step-000004")
    (run / "summary.json").unlink()


def assert_same_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=k)


def test_two_processes_end_with_the_weights_of_one(config, one_process, tmp_path):
    tropd(["train", "--config", str(config), "--run-dir", str(tmp_path / "two")], processes=2)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["num_processes"] == 2
    assert_same_weights(one_process, tmp_path / "two")
    start = load_file(next((tmp_path / "two" / "checkpoints").glob("step-000002")) / "model.safetensors")
    assert any(not torch.equal(start[k], final_weights(tmp_path / "two")[k]) for k in start)  # it trained
    steps = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(x) for x in (one_process / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(one, steps):  # the logged step metrics are global, not one process's
        assert a["rollout/generated_tokens"] == b["rollout/generated_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert not list((tmp_path / "two").glob("**/*.tmp-*"))  # one writer, nothing half-written


def test_resume_under_two_processes_is_exact(config, tmp_path):
    run = tmp_path / "run"
    tropd(["train", "--config", str(config), "--run-dir", str(run)], processes=2)
    expected = {k: v.clone() for k, v in final_weights(run).items()}
    rewind_to_step_2(run)
    tropd(["train", "--run-dir", str(run), "--resume"], processes=2)
    got = final_weights(run)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0, msg=k)


def test_bf16_autocast_keeps_float32_master_weights(teacher_dir, tmp_path):
    """At lr 5e-6 bf16 weights would not move; float32 master weights under bf16 autocast move like fp32."""
    deltas = {}
    for mode in ("no", "bf16"):
        path = write_config(tmp_path / mode, teacher_dir, data={"eval_prompts": 0},
                            objective={"name": "sft", "kwargs": {}},  # near-greedy: both runs see about the same text
                            model={"mixed_precision": mode}, rollout={"temperature": 0.05},
                            train={"steps": 2, "lr": 5e-6, "save_every": 1, "keep_checkpoints": 3})
        tropd(["train", "--config", str(path)])
        first = load_file(tmp_path / mode / "run" / "checkpoints" / "step-000001" / "model.safetensors")
        last = final_weights(tmp_path / mode / "run")
        assert all(v.dtype == torch.float32 for v in last.values())
        deltas[mode] = torch.cat([(last[k] - first[k]).flatten() for k in sorted(last)])
    fp32, bf16 = deltas["no"], deltas["bf16"]
    moved = fp32 != 0
    assert moved.float().mean() > 0.9 and (bf16[moved] != 0).float().mean() > 0.9  # the same weights move
    cosine = torch.nn.functional.cosine_similarity(fp32, bf16, dim=0)
    assert cosine > 0.9, cosine  # in the same direction, by about the same amount
    assert 0.5 < bf16.norm() / fp32.norm() < 2.0


@pytest.fixture(scope="module")
def fsdp_run(config, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The config's run sharded over 2 processes (with gradient checkpointing), launched through the shipped
    8-GPU accelerate config; tests that change it work on a copy."""
    run = tmp_path_factory.mktemp("fsdp") / "run"
    proc = tropd(["train", "--config", str(config), "--run-dir", str(run), "model.fsdp=true",
                  "model.gradient_checkpointing=true"], processes=2, mode=("--config_file", str(EIGHT_GPUS)))
    return run, proc


def test_fsdp_two_processes_end_with_the_weights_and_optimizer_state_of_one(fsdp_run, one_process):
    """model.fsdp shards the student over the processes (weights, gradients, AdamW moments): the run still ends
    where one plain process does, and its checkpoint has the single-process layout."""
    run, proc = fsdp_run
    assert "sharded over 2 processes (FSDP2)" in proc.stdout
    assert "view tensor" not in proc.stderr  # torch's warning about outputs tropd never writes into
    assert_same_weights(one_process, run)
    mine, ref = trainer_state(run)["optimizer"], trainer_state(one_process)["optimizer"]
    assert mine["param_groups"] == ref["param_groups"] and mine["state"].keys() == ref["state"].keys()
    for index, moments in ref["state"].items():
        for name, value in moments.items():
            assert type(mine["state"][index][name]) is torch.Tensor  # gathered, not a DTensor shard
            torch.testing.assert_close(mine["state"][index][name], value, rtol=0, atol=1e-6)


def test_fsdp_resume_is_exact_and_its_checkpoints_resume_unsharded(fsdp_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(fsdp_run[0], run)
    expected = {k: v.clone() for k, v in final_weights(run).items()}
    rewind_to_step_2(run)
    tropd(["train", "--run-dir", str(run), "--resume"], processes=2)  # sharded again, from the gathered checkpoint
    for k, v in final_weights(run).items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0, msg=k)
    rewind_to_step_2(run)
    tropd(["train", "--run-dir", str(run), "--resume", "model.fsdp=false"])  # one process, no sharding
    for k, v in final_weights(run).items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=1e-5, msg=k)


def test_fsdp_with_lora_is_refused(config, tmp_path):
    proc = tropd(["train", "--config", str(config), "--run-dir", str(tmp_path / "r"), "model.fsdp=true",
                  "model.lora.r=4"], rc=2)
    assert "model.fsdp cannot be combined with model.lora" in proc.stderr


def test_accelerate_fsdp_launch_is_refused_not_silently_replaced(config, tmp_path):
    """accelerate on CPU would quietly run DDP for an FSDP launch; tropd points at model.fsdp instead."""
    proc = tropd(["train", "--config", str(config), "--run-dir", str(tmp_path / "fsdp")], processes=2,
                 mode=("--use_fsdp",), rc=1)
    assert "accelerate is configured for FSDP, which tropd does not run" in proc.stderr
    assert "model.fsdp=true" in proc.stderr
    assert not (tmp_path / "fsdp" / "checkpoints").exists()


def first_step(run: Path) -> dict:
    return next(json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x)


def test_fsdp_runs_the_loss_forward_in_the_mixed_precision_of_ddp(config, tmp_path):
    """Sharded, the student is not wrapped by DDP, yet its forwards still run under the bf16 autocast a DDP student
    gets: the first step (same weights, same rows per process) scores identically."""
    args = ["train", "--config", str(config), "model.mixed_precision=bf16", "train.steps=1"]
    tropd([*args[:3], "--run-dir", str(tmp_path / "ddp"), *args[3:]], processes=2)
    tropd([*args[:3], "--run-dir", str(tmp_path / "fsdp"), *args[3:], "model.fsdp=true"], processes=2)
    ddp, fsdp = first_step(tmp_path / "ddp"), first_step(tmp_path / "fsdp")
    for key in ("loss", "student_entropy", "k1_rkl"):  # a float32 loss forward would differ by ~1e-3
        assert fsdp[key] == pytest.approx(ddp[key], rel=1e-6, abs=1e-7), key


@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_a_micro_batch_refused_on_one_process_skips_the_step_on_all(config, tmp_path, layout):
    """Only process 1's objective refuses its inputs (NaN): every process still backs as many gradients (the LM
    head's too, under the fused loss), so gradient synchronisation neither hangs nor mismatches."""
    run = tmp_path / "run"
    tropd([str(config), f"train.output_dir={run}", "train.steps=3", "train.save_every=0",
           f"model.fsdp={str(layout == 'fsdp').lower()}"], processes=2,
          program=(str(Path(__file__).with_name("refuse_on_one_process.py")),))
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"nonfinite"' in x]
    assert [s["nonfinite"] for s in steps] == [0, 1, 0]
    assert "behavior_logprobs" in steps[1]["nonfinite_reason"]


def test_fsdp_checkpoint_keeps_tied_embeddings_tied(tmp_path):
    """A tied LM head is one tensor saved under one name, as a single process saves it."""
    from tests.helpers import tiny_llama, tiny_tokenizer
    from transformers import AutoModelForCausalLM

    teacher = tiny_llama(vocab_size=64, hidden=32, layers=4, seed=1)
    teacher.config.tie_word_embeddings = True
    teacher.tie_weights()
    teacher.save_pretrained(tmp_path / "teacher")
    tiny_tokenizer(64).save_pretrained(tmp_path / "teacher")
    config = write_config(tmp_path, tmp_path / "teacher", data={"eval_prompts": 0}, train={"steps": 1})
    tropd(["train", "--config", str(config), "--run-dir", str(tmp_path / "run"), "model.fsdp=true"], processes=2)
    saved = final_weights(tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "step-000001"
    AutoModelForCausalLM.from_pretrained(ckpt).save_pretrained(tmp_path / "resaved")
    assert saved.keys() == load_file(tmp_path / "resaved" / "model.safetensors").keys()
    assert "lm_head.weight" not in saved
