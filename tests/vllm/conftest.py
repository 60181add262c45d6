"""Shared by the vLLM teacher tests: one tiny teacher folder vLLM's CPU attention can run (head_dim 64), free
ports, and a server subprocess started with a readiness wait. Each test module skips itself without vLLM."""

from __future__ import annotations

import contextlib
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

ROOT = Path(__file__).resolve().parents[2]
V = 64
#: where vLLM's answers are compared with the in-process teacher's (both float32 on the CPU: measured ~1e-5)
ATOL = 1e-4


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
