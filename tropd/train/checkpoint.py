"""Atomic checkpoints: a crash mid-save never corrupts the last good checkpoint, and a run resumes exactly.

Layout of ``<run>/checkpoints/step-000040/``: the student as safetensors (``save_pretrained``, loadable by
``AutoModelForCausalLM.from_pretrained``), its tokenizer, ``trainer_state.pt`` (optimizer state, RNG states,
step) and ``config.yaml``. A checkpoint is written under a temporary name and renamed into place; the file
``<run>/checkpoints/latest`` (itself replaced atomically) names the newest complete one.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

STATE_FILE = "trainer_state.pt"


@dataclass
class ResumeState:
    step: int
    path: Path


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer, config_yaml: str, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, keep the newest ``keep`` checkpoints."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state()}, tmp / STATE_FILE)
    (tmp / "config.yaml").write_text(config_yaml)
    if final.exists():  # re-saving the same step (e.g. interrupted right after a periodic save)
        old = root / f".step-{step:06d}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _atomic_write_text(root / "latest", final.name + "\n")
    for stale in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> ResumeState | None:
    """The newest complete checkpoint of a run, or None."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is incomplete or missing; "
                                f"remove {pointer} to start over or point it at another step-* folder")
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    return ResumeState(step=int(state["step"]), path=path)


def load_trainer_state(path: Path, optimizer) -> int:
    """Restore optimizer and RNG states from a checkpoint folder; returns its step."""
    state = torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return int(state["step"])
