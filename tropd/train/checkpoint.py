"""Atomic checkpoints: a crash mid-save never corrupts the last good checkpoint, and a run resumes exactly.

Layout of ``<run>/checkpoints/step-000040/``: the student as safetensors (``save_pretrained``, loadable by
``AutoModelForCausalLM.from_pretrained``; with LoRA its adapters, ``adapter_model.safetensors`` and
``adapter_config.json``, which ``tropd merge-lora`` folds into a plain model), its tokenizer, ``trainer_state.pt`` (optimizer state, RNG states,
step) and ``config.yaml``. A checkpoint is written under a temporary name and renamed into place; the file
``<run>/checkpoints/latest`` (itself replaced atomically) names the newest complete one.

On the next start, a complete checkpoint that a save interrupted between its two renames left aside
(``.step-N.old-PID``, with no ``step-N``) is put back (:func:`restore_interrupted_saves`); then the temporary
folders of an interrupted save are removed (:func:`clean_partial_saves`), and a latest checkpoint that is corrupt
(truncated ``trainer_state.pt`` or ``model.safetensors``, bad ``config.json``) is skipped for the newest complete
one before it (:func:`latest_checkpoint` reports what it skipped). A ``latest`` that names anything but a
``step-*`` folder of the run itself (``../other-run/...``, an absolute path) is refused, never followed.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tropd.files import match_umask, write_text_atomic

STATE_FILE = "trainer_state.pt"


@dataclass
class ResumeState:
    """The checkpoint a run resumes from; ``skipped``: newer checkpoints found corrupt, with the reason."""

    step: int
    path: Path
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def _fsync_tree(folder: Path) -> None:
    """Flush a folder's files to disk before it is renamed into place (a power cut keeps whole files)."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


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


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer, config_yaml: str, keep: int = 2,
                    states: tuple[dict, dict] | None = None) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, keep the newest ``keep`` checkpoints.
    ``states``: the model's and the optimizer's state dicts when they are not those of ``model`` and ``optimizer``
    themselves (a sharded student's, gathered: :func:`tropd.train.sharding.gathered_state`)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    weights, optimizer_state = states if states is not None else ({}, optimizer.state_dict())
    model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": weights} if weights else {}))
    tokenizer.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": optimizer_state, "rng": rng_state()}, tmp / STATE_FILE)
    (tmp / "config.yaml").write_text(config_yaml)
    match_umask(tmp)  # one mode for every file, as the umask says (safetensors writes 0600)
    _fsync_tree(tmp)
    if final.exists():  # re-saving the same step (e.g. interrupted right after a periodic save)
        old = root / f".step-{step:06d}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    write_text_atomic(root / "latest", final.name + "\n")
    for stale in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def restore_interrupted_saves(run_dir: Path) -> list[Path]:
    """Put back each complete checkpoint that a re-save left aside (``.step-N.old-PID``) and that no complete
    ``step-N`` replaced (a kill between :func:`save_checkpoint`'s two renames); returns the restored folders. Run
    it before :func:`clean_partial_saves`, which would delete such a folder as a leftover."""
    root = Path(run_dir) / "checkpoints"
    restored = []
    for old in sorted(root.glob(".step-*.old-*")) if root.is_dir() else []:
        final = root / old.name[1:].split(".old-")[0]
        if not old.is_dir() or final.exists():
            continue
        try:
            read_checkpoint_step(old)
        except (ValueError, OSError):
            continue  # not complete: a leftover like any other
        os.replace(old, final)
        restored.append(final)
    return restored


def clean_partial_saves(run_dir: Path) -> list[Path]:
    """Remove what an interrupted save left under ``<run>/checkpoints`` (``.step-*.tmp-*``, ``.step-*.old-*``,
    ``.latest.tmp-*``); returns the removed paths."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    stale = [p for pattern in (".step-*.tmp-*", ".step-*.old-*", ".latest.tmp-*") for p in root.glob(pattern)]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def read_checkpoint_step(path: Path) -> int:
    """The step of a checkpoint folder, after checking that every file of it can be read; raises ValueError
    naming the file that cannot."""
    from tropd.lora import check_adapter_folder, is_adapter_folder
    from tropd.models import check_model_folder

    state_file = Path(path) / STATE_FILE
    if not state_file.is_file():
        raise ValueError(f"{state_file} is missing (the save did not finish)")
    try:  # mmap: a truncated zip archive fails here without reading the optimizer state into memory
        state = torch.load(state_file, map_location="cpu", weights_only=False, mmap=True)
        step = int(state["step"])
    except Exception as err:  # noqa: BLE001 - torch raises assorted errors for a damaged archive
        raise ValueError(f"{state_file} cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None
    (check_adapter_folder if is_adapter_folder(path) else check_model_folder)(path)
    return step


def latest_checkpoint(run_dir: Path) -> ResumeState | None:
    """The newest complete, readable checkpoint of a run (the one ``latest`` names, else the newest before it
    that reads), or None when the run has no checkpoint. Raises ValueError when checkpoints exist but none reads."""
    root = Path(run_dir) / "checkpoints"
    folders = sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True) if root.is_dir() else []
    pointer = root / "latest"
    text = pointer.read_text().strip() if pointer.is_file() else ""
    if text:
        if not re.fullmatch(r"step-\d+", text):
            raise ValueError(f"{pointer} names {text!r}, which is not a step-* folder of this run (a checkpoint "
                             "elsewhere would be continued as this run's); write the name of this run's newest "
                             "step-* folder into it, or delete it to resume from the newest readable checkpoint")
        named = root / text
        folders = [named] + [p for p in folders if p.name < named.name]
    skipped: list[tuple[Path, str]] = []
    for path in folders:
        try:
            return ResumeState(step=read_checkpoint_step(path), path=path, skipped=skipped)
        except (ValueError, OSError) as err:
            skipped.append((path, str(err)))
    if skipped:
        raise ValueError(f"no readable checkpoint under {root}: " + "; ".join(f"{p.name}: {why}" for p, why in skipped)
                         + "; start a fresh run in another --run-dir")
    return None


def load_trainer_state(path: Path, optimizer, shard=None) -> int:
    """Restore optimizer and RNG states from a checkpoint folder; returns its step. The optimizer keeps the
    hyper-parameters it was built with (lr, betas, weight decay): a resume with changed settings uses them.
    ``shard(state, optimizer)`` cuts the saved (full) optimizer state to a sharded optimizer's
    (:func:`tropd.train.sharding.shard_optimizer_state`)."""
    # sharded: every process reads the file; memory-mapped, each keeps only its shards
    state = torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=False, mmap=shard is not None)
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(shard(state["optimizer"], optimizer) if shard else state["optimizer"])
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)
    set_rng_state(state["rng"])
    return int(state["step"])
