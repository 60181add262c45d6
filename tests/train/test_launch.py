"""Start-up checks of a launch (no processes started): precision and FSDP settings that accelerate would silently
override are refused with the setting to change; the shipped accelerate configs are plain data parallel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from tests.helpers import tiny_llama
from tropd.train.config import ConfigError, RunConfig, load_config
from tropd.train.build import check_launch
from tropd.train.sharding import full_weights, is_sharded, shard_student

ACCELERATE_CONFIGS = Path(__file__).resolve().parents[2] / "tropd" / "configs" / "accelerate"
PAPER = Path(__file__).resolve().parents[2] / "tropd" / "configs" / "paper.yaml"


def cpu_config(**model) -> RunConfig:
    cfg = RunConfig()
    cfg.model.device = "cpu"
    for key, value in model.items():
        setattr(cfg.model, key, value)
    return cfg.validate()


def test_a_launch_asking_for_another_precision_is_refused():
    with pytest.raises(ValueError, match=r"asks for mixed precision bf16, but model.mixed_precision=no.*"
                                         r"set model.mixed_precision=bf16"):
        check_launch(cpu_config(), {"ACCELERATE_MIXED_PRECISION": "bf16"})
    check_launch(cpu_config(mixed_precision="bf16"), {"ACCELERATE_MIXED_PRECISION": "bf16"})  # they agree
    check_launch(cpu_config(mixed_precision="bf16"), {"ACCELERATE_MIXED_PRECISION": "no"})  # the launcher's default


@pytest.mark.parametrize("name", ["FSDP", "DEEPSPEED"])
def test_an_accelerate_sharding_config_is_refused_with_the_tropd_setting(name):
    with pytest.raises(ValueError, match=f"configured for {name}, which tropd does not run.*model.fsdp=true"):
        check_launch(cpu_config(), {f"ACCELERATE_USE_{name}": "true"})


@pytest.mark.parametrize("name, processes", [("1gpu", 1), ("8gpu", 8)])
def test_shipped_accelerate_configs_are_plain_data_parallel(name, processes):
    cfg = load_config_from_file(str(ACCELERATE_CONFIGS / f"{name}.yaml"))
    assert cfg.num_processes == processes and cfg.mixed_precision == "no"
    assert cfg.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU)


def test_fsdp_cannot_take_lora():
    with pytest.raises(ConfigError, match="model.fsdp cannot be combined with model.lora"):
        cpu_config(fsdp=True, lora=type(RunConfig().model.lora)(r=4))


def test_shard_student_needs_a_decoder_layer_class():
    model = tiny_llama(vocab_size=16, hidden=8, layers=1)
    model._no_split_modules = None
    with pytest.raises(ValueError, match="model.fsdp: LlamaForCausalLM names no decoder-layer class"):
        shard_student(model, torch.device("cpu"))


def test_full_weights_leaves_an_unsharded_model_alone():
    model = tiny_llama(vocab_size=16, hidden=8, layers=1)
    before = [p.data_ptr() for p in model.parameters()]
    assert not is_sharded(model)
    with full_weights(model):
        assert [p.data_ptr() for p in model.parameters()] == before


def test_paper_recipe_needs_the_teacher_named():
    with pytest.raises(ConfigError, match="model.teacher is not set: name the teacher on the command line"):
        load_config(PAPER)
    cfg = load_config(PAPER, ["model.teacher=/models/teacher", "model.student=/models/student"])
    assert (cfg.model.dtype, cfg.model.mixed_precision, cfg.model.teacher_dtype) == ("float32", "bf16", "bfloat16")
    assert cfg.rollout.max_new_tokens == 8192 and cfg.train.prompts_per_step == 128


@pytest.mark.slow
def test_paper_recipe_runs_as_written_on_tiny_models(teacher_dir, tmp_path):
    """tropd/configs/paper.yaml with only the models named and the scale cut (steps, prompts, tokens): its bf16
    autocast, bf16 teacher, chunked fused loss and objective settings run together and keep float32 weights."""
    from tests.train.test_distributed import final_weights, tropd

    run = tmp_path / "paper"
    tropd(["train", "--config", str(PAPER), "--run-dir", str(run), f"model.teacher={teacher_dir}",
           "model.student_layers=2", "model.device=cpu", "train.steps=1", "train.prompts_per_step=2",
           "rollout.rollouts_per_prompt=2", "rollout.batch_size=4", "rollout.max_new_tokens=8",
           "train.micro_batch_size=2", "data.eval_prompts=0", "train.progress=false"])
    assert all(v.dtype == torch.float32 for v in final_weights(run).values())
    saved = load_config(run / "config.yaml")
    assert (saved.model.mixed_precision, saved.model.teacher_dtype, saved.objective.chunk_size) == (
        "bf16", "bfloat16", 4096)
