"""Training and held-out prompts from ``data.prompts``: the built-in set, a task suite, or the user's file; and
the fingerprint of a user's file, which ``--resume`` compares with the run's (:mod:`tropd.train.resume`)."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from tropd.tasks import Example, PromptRow, get_suite, list_suites, load_prompts
from tropd.tasks.data import check_data_path
from tropd.tasks.builtin import builtin_prompts

SUITE_SIZES = {"train": 512, "test": 64}


def prompts_for(source: str, split: str, seed: int = 0, skip_bad_rows: bool = False) -> list[PromptRow | Example]:
    """'builtin', a task suite name (its own disjoint splits), or a data file (a seeded 90/10 split)."""
    if source == "builtin":
        return builtin_prompts(split)
    if source in list_suites():
        return get_suite(source).examples(split, SUITE_SIZES[split], seed)
    loaded = load_prompts(source, on_error="skip" if skip_bad_rows else "raise")
    if not loaded.rows:  # refused here, before any model loads
        why = (f"all {loaded.skipped} of its rows are malformed (data.skip_bad_rows skipped them; the first: "
               f"{loaded.errors[0]})" if loaded.skipped else "it holds no rows")
        raise ValueError(f"data.prompts={source}: no prompt to train on: {why}")
    rows = loaded.rows
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_test = len(rows) // 10
    chosen = order[:n_test] if split == "test" else order[n_test:]
    return [rows[i] for i in chosen]


def data_fingerprint(source: str) -> dict | None:
    """``{"sha256", "bytes", "rows"}`` of a data file or ``datasets`` folder (every file in it, by relative path),
    or None for the built-in prompts and the task suites (made by code, not read from a file). ``rows`` is counted
    without parsing rows (jsonl: non-blank lines; json: array items; parquet: its metadata; a folder: None)."""
    if source == "builtin" or source in list_suites():
        return None
    path = Path(source)
    try:
        check_data_path(path)  # before opening: a FIFO or /dev/zero would never end
    except FileNotFoundError:
        raise FileNotFoundError(f"no such prompt file or folder: {path} (data.prompts)") from None
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest, size = hashlib.sha256(), 0
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
                size += len(block)
    return {"sha256": digest.hexdigest(), "bytes": size, "rows": _count_rows(path)}


def _count_rows(path: Path) -> int | None:
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson"):
            with open(path, "rb") as fh:
                return sum(1 for line in fh if line.strip())
        if suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8-sig"))
            return len(rows) if isinstance(rows, list) else None
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_metadata(path).num_rows
    except (OSError, ValueError, ImportError, RecursionError):  # a damaged file: reading the rows says what is wrong
        return None
    return None
