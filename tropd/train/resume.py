"""Opening a run directory: a fresh run only in an empty folder; ``--resume`` only with the run's own settings.

- A fresh run refuses a folder that holds anything (it would mix two runs' files).
- ``--resume`` compares the settings it was given with the run's ``config.yaml``, and the data file
  ``data.prompts`` (its sha256 and row count) with the run's ``data_fingerprint.json``, and refuses any
  difference, listed key by key, unless ``override_config``; an accepted change is recorded as a comment at the
  top of ``config.yaml`` (the file stays loadable with ``--config``).
- Before resuming, a complete checkpoint that an interrupted save set aside is put back, the leftovers of an
  interrupted save are removed and a corrupt latest checkpoint is skipped for the newest readable one
  (:mod:`tropd.train.checkpoint`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from tropd.files import write_text_atomic
from tropd.train.checkpoint import (ResumeState, clean_partial_saves, latest_checkpoint,
                                    restore_interrupted_saves)
from tropd.train.config import ConfigError, RunConfig, load_yaml
from tropd.train.lock import LOCK_FILE
from tropd.train.prompts import data_fingerprint

CONFIG_FILE = "config.yaml"
#: the fingerprint of the run's data file (``data.prompts``), compared on ``--resume``
DATA_FILE = "data_fingerprint.json"
#: Keys that may differ on resume: where the run lives, whether a progress bar is drawn, and how the student's
#: memory is laid out (sharded over the processes or not, activations recomputed or not: like the number of
#: processes, neither changes a result, and checkpoints have one layout).
UNCHECKED_KEYS = ("train.output_dir", "train.progress", "model.fsdp", "model.gradient_checkpointing")


@dataclass
class OpenedRun:
    """What :func:`open_run` found: the checkpoint to resume from (None: start at step 0), the settings that
    change (``(key, old, new)``), and notes for the console (skipped checkpoints, removed leftovers)."""

    checkpoint: ResumeState | None = None
    changes: list[tuple[str, object, object]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict | None = None  #: the fingerprint of the data the run reads now (:func:`data_fingerprint`)


def flatten(data: dict, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (objective kwargs included)."""
    out: dict[str, object] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: dict, new: dict) -> list[tuple[str, object, object]]:
    """``(key, saved value, new value)`` for every setting that differs, except :data:`UNCHECKED_KEYS` and keys
    a run saved by an older tropd lacks while the new value is their built-in default."""
    old, now, builtin = flatten(saved), flatten(new), flatten(RunConfig().to_dict())
    keys = sorted(k for k in old.keys() | now.keys() if k not in UNCHECKED_KEYS and old.get(k) != now.get(k)
                  and not (k not in old and k in builtin and now.get(k) == builtin[k]))
    return [(k, old.get(k), now.get(k)) for k in keys]


def format_changes(changes: list[tuple[str, object, object]]) -> str:
    return ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes)


def open_run(cfg: RunConfig, resume: bool, override_config: bool = False, clean: bool = True) -> OpenedRun:
    """Check that ``cfg``'s run directory can be started (fresh) or resumed, and find what to resume from.
    Reads only, except that ``clean`` tidies the checkpoints after an interrupted save (:func:`tidy_checkpoints`;
    one process does it, before the others look)."""
    run_dir = cfg.run_dir()
    if not resume:
        held = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE) if run_dir.exists() else []
        if held:
            hint = "continue it with --resume" if (run_dir / CONFIG_FILE).is_file() else "empty it"
            raise FileExistsError(f"{run_dir} is not empty ({', '.join(held[:4])}"
                                  f"); a fresh run needs a new or empty folder: {hint}, or choose another --run-dir")
        return OpenedRun(data=data_fingerprint(cfg.data.prompts))
    saved_path = run_dir / CONFIG_FILE
    if not saved_path.is_file():
        raise FileNotFoundError(f"--resume: {run_dir} holds no run ({saved_path} is missing); run without --resume")
    opened = OpenedRun(notes=tidy_checkpoints(run_dir) if clean else [])
    try:
        saved = load_yaml(saved_path.read_text(encoding="utf-8"), str(saved_path)) or {}
    except (ConfigError, UnicodeDecodeError) as err:
        raise ValueError(f"{err if isinstance(err, ConfigError) else f'{saved_path} is not UTF-8'}; restore it or "
                         "start a fresh run") from None
    opened.changes = config_changes(saved, cfg.to_dict())
    opened.data = data_fingerprint(cfg.data.prompts)
    data_path = run_dir / DATA_FILE
    if data_path.is_file():  # a run of an older tropd has none: nothing to compare
        try:
            before = json.loads(data_path.read_text(encoding="utf-8"))["fingerprint"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise ValueError(f"{data_path} is damaged; delete it to resume without checking that the data is "
                             "unchanged") from None
        if before != opened.data:
            opened.changes.append((f"data.prompts content ({DATA_FILE})", describe_data(before),
                                   describe_data(opened.data)))
    if opened.changes and not override_config:
        data_changed = any(k.startswith("data.prompts content") for k, _, _ in opened.changes)
        raise ConfigError(f"--resume with settings that differ from {saved_path}: {format_changes(opened.changes)}; "
                          "drop them to resume as the run was" + (f" (and put back the {cfg.data.prompts} the run "
                                                                  "read)" if data_changed else "")
                          + ", or add --override-config to change them")
    opened.checkpoint = latest_checkpoint(run_dir)
    if opened.checkpoint is not None:
        for path, why in opened.checkpoint.skipped:
            opened.notes.append(f"warning: skipping corrupt checkpoint {path}: {why}")
    else:
        opened.notes.append(f"{run_dir} has no checkpoint yet (it stopped before its first save): starting at step 0")
    return opened


def tidy_checkpoints(run_dir: Path) -> list[str]:
    """After an interrupted save: put back a complete checkpoint left aside, then remove the leftovers
    (:mod:`tropd.train.checkpoint`); returns notes for the console. One process does it, holding the run's lock."""
    notes = []
    restored = restore_interrupted_saves(run_dir)
    if restored:
        notes.append(f"restored {len(restored)} complete checkpoint(s) that an interrupted save had set aside: "
                     + ", ".join(p.name for p in restored))
    removed = clean_partial_saves(run_dir)
    if removed:
        notes.append(f"removed {len(removed)} leftover(s) of an interrupted save: "
                     + ", ".join(p.name for p in removed))
    return notes


def describe_data(fingerprint: dict | None) -> str:
    if fingerprint is None:
        return "none (built-in prompts or a task suite)"
    rows = f"{fingerprint['rows']} rows" if fingerprint.get("rows") is not None else f"{fingerprint['bytes']} bytes"
    return f"sha256 {fingerprint['sha256'][:16]}, {rows}"


def write_data_fingerprint(run_dir: Path, source: str, fingerprint: dict | None) -> None:
    """Record what ``data.prompts`` held when the run (re)started: ``<run>/data_fingerprint.json``."""
    write_text_atomic(Path(run_dir) / DATA_FILE, json.dumps({"data.prompts": source, "fingerprint": fingerprint},
                                                            indent=2) + "\n")


def write_run_config(run_dir: Path, config_yaml: str, changes: list[tuple[str, object, object]], step: int) -> None:
    """Write ``<run>/config.yaml`` atomically, keeping its comment history and adding ``changes`` to it."""
    path = Path(run_dir) / CONFIG_FILE
    history = []
    if path.is_file():
        history = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.startswith("# ")]
    if changes:
        history.append(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} resumed at step {step} with --override-config: "
                       f"{format_changes(changes)}")
    write_text_atomic(path, "".join(h + "\n" for h in history) + config_yaml)
