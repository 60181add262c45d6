"""``tropd merge-lora``: a LoRA run's adapters folded into its base student, saved as a plain model."""

from __future__ import annotations

from pathlib import Path

import torch

from tropd.files import match_umask
from tropd.lora import ADAPTER_CONFIG, check_adapter_folder, is_adapter_folder, load_adapters
from tropd.models import base_student
from tropd.train.checkpoint import latest_checkpoint
from tropd.train.config import load_config


def merge_checkpoint(checkpoint: str | Path, out: str | Path, console=print) -> Path:
    """Fold the LoRA adapters of a run's checkpoint into its base student and save a plain model (weights and
    tokenizer) to ``out``, loadable with ``AutoModelForCausalLM.from_pretrained``.

    ``checkpoint`` is a checkpoint folder or a run folder (its latest checkpoint). The base student is rebuilt
    from the checkpoint's ``config.yaml`` exactly as the run built it (teacher path, pruned layers)."""
    path = Path(checkpoint)
    if (path / "checkpoints").is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise ValueError(f"{path} has no checkpoint to merge")
        path = found.path
    if not is_adapter_folder(path):
        raise ValueError(f"{path} holds no LoRA adapters ({ADAPTER_CONFIG} missing): it is already a plain model")
    check_adapter_folder(path)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new folder for the merged model")
    cfg = load_config(path / "config.yaml")
    base, tokenizer = base_student(cfg.model, torch.device("cpu"))
    merged = load_adapters(base, path).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    match_umask(out)
    console(f"merged {path} into {out}")
    return out
