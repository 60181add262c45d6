"""Helpers for tests that run the trainer on tiny models: a config writer and a checkpoint reader."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from tests.helpers import tiny_llama, tiny_tokenizer

V = 64


def save_teacher(path: Path) -> Path:
    """A tiny 4-layer teacher (and its tokenizer) saved as an HF folder."""
    tiny_llama(vocab_size=V, hidden=32, layers=4, seed=1).save_pretrained(path)
    tiny_tokenizer(V).save_pretrained(path)
    return path


def write_config(tmp_path: Path, teacher_dir: Path, **sections) -> Path:
    """A 4-step tropd run of a 2-layer student on builtin prompts, into ``tmp_path/run``; ``sections`` update it.
    Without the report ``tropd train`` writes at the end (``train.write_report``: about a second of plotting per
    run, most of a tiny run's time); the tests that read a report ask for it."""
    cfg = {
        "model": {"teacher": str(teacher_dir), "student_layers": 2, "device": "cpu"},
        "objective": {"name": "tropd", "kwargs": {"top_k": 8}},
        "rollout": {"max_new_tokens": 6, "rollouts_per_prompt": 2},
        "data": {"prompts": "builtin", "eval_prompts": 2},
        "train": {"steps": 4, "prompts_per_step": 2, "micro_batch_size": 4, "lr": 1e-3, "save_every": 2,
                  "output_dir": str(tmp_path / "run"), "progress": False, "write_report": False},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(ckpt / "model.safetensors")
