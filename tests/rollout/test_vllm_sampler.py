"""The vLLM engine's parts that need no vLLM: the weights it is given, and the launches it refuses
(tests/vllm/ runs the engine itself)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.helpers import tiny_llama
from tropd.rollout.vllm_sampler import checkpoint_weights
from tropd.train.build import vllm_sampler
from tropd.train.config import ConfigError, load_config


def vllm_model(seed: int = 0):
    return tiny_llama(vocab_size=64, hidden=128, layers=2, heads=2, seed=seed, init_std=0.1)


def test_lora_weights_are_merged_for_the_engine():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(vllm_model(seed=4), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    weights = dict(checkpoint_weights(model))
    merged = model.merge_and_unload().state_dict()
    assert set(weights) == set(merged)
    for name, value in merged.items():
        torch.testing.assert_close(weights[name], value, atol=1e-6, rtol=0)


def test_plain_weights_are_the_state_dict():
    model = vllm_model()
    assert {k: v for k, v in checkpoint_weights(model)}.keys() == model.state_dict().keys()


def test_more_than_one_process_is_refused_in_one_line():
    cfg = load_config()
    with pytest.raises(ConfigError, match="rollout.engine=vllm runs in one process; this launch has 2") as err:
        vllm_sampler(cfg, SimpleNamespace(num_processes=2), vllm_model(), None, None, 64)
    assert "\n" not in str(err.value)
