"""The machine a benchmark ran on, in one line for its results: numbers differ between CPUs, so every result says
which one gave it (``from benchmarks.machine import describe``, with the repository root on ``sys.path``)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux; ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe(load: bool = True) -> str:
    """``x86_64 (CPU model), N CPU cores, torch X[, GPU name][, load L at the end]``: the GPU when this process has
    used CUDA (asking never initialises it, so a process that forks workers afterwards still can); the one-minute
    load average when ``load`` (call it at the end of the measurement)."""
    import torch

    parts = [f"{platform.machine()} ({cpu_model()})", f"{os.cpu_count()} CPU cores", f"torch {torch.__version__}"]
    if torch.cuda.is_initialized():
        parts.append(f"GPU {torch.cuda.get_device_name()}")
    if load:
        parts.append(f"load {os.getloadavg()[0]:.2f} at the end")
    return ", ".join(parts)
