"""Fixtures for the rollout tests: tiny random causal LMs, sampling settings, and exact reference computations."""

from __future__ import annotations

from typing import Sequence

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from tropd.rollout import SamplingConfig

PAD, EOS = 0, 1
PROMPTS: list[list[int]] = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15, 16], [20]]

try:  # the shared builder, once it exists
    from tests.helpers import tiny_llama as _shared_tiny_llama
except ImportError:  # pragma: no cover - only before tests/helpers.py lands
    _shared_tiny_llama = None


def tiny_llama(seed: int) -> nn.Module:
    """Random float32 Llama, vocab 64, hidden 32, 2 layers, eval mode."""
    if _shared_tiny_llama is not None:
        return _shared_tiny_llama(seed=seed)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=PAD, eos_token_id=EOS, tie_word_embeddings=False, initializer_range=0.2)
    return LlamaForCausalLM(cfg).float().eval()


@pytest.fixture(scope="package", autouse=True)
def _one_thread():
    """Tiny models: intra-op threads only add overhead (about 10x slower on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def student() -> nn.Module:
    return tiny_llama(seed=0)


@pytest.fixture(scope="session")
def teacher() -> nn.Module:
    return tiny_llama(seed=1)


@pytest.fixture
def prompts() -> list[list[int]]:
    return [list(p) for p in PROMPTS]


def make_cfg(max_new_tokens: int = 10, eos: Sequence[int] = (EOS,), **kw) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=max_new_tokens, eos_token_ids=tuple(eos), pad_token_id=PAD, **kw)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class RaisingTeacher:
    """A :class:`~tropd.teacher.Teacher` that fails the test if it is ever asked for anything."""

    def _refuse(self, *args, **kwargs):
        raise AssertionError("the teacher must not be run here")

    score = write_rows = model_for_blending = _refuse
    context_length = None

    def describe(self) -> str:
        return "a teacher that must not be run"


def fresh_logits(model: nn.Module, prompt: Sequence[int], response: Sequence[int]) -> torch.Tensor:
    """``[n, V]`` float32 logits predicting each response token, from one unpadded, uncached forward pass."""
    ids = torch.tensor([list(prompt) + list(response)], dtype=torch.long)
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    start = len(prompt) - 1
    return logits[start:start + len(response)]


def reference_transform(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Independent (row-by-row, float64) temperature + top-p: keep the most probable tokens until their mass
    reaches p (the token that crosses p is kept), renormalise; log-probs with −inf outside the nucleus."""
    out = torch.empty(logits.shape, dtype=torch.float64)
    for r in range(logits.shape[0]):
        logp = torch.log_softmax(logits[r].double() / temperature, dim=-1)
        if top_p >= 1.0:
            out[r] = logp
            continue
        probs = logp.exp().tolist()
        order = sorted(range(len(probs)), key=lambda v: -probs[v])
        kept, mass = [], 0.0
        for v in order:
            kept.append(v)
            mass += probs[v]
            if mass >= top_p:
                break
        row = torch.full_like(logp, float("-inf"))
        row[kept] = logp[kept] - torch.logsumexp(logp[kept], dim=0)
        out[r] = row
    return out


def row_response(batch, i: int) -> list[int]:
    return batch.tokens[i, : int(batch.response_lengths[i])].tolist()

