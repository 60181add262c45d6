"""Training and held-out prompts from ``data.prompts``: the built-in set, a task suite, or the user's file."""

from __future__ import annotations

import random

from tropd.tasks import Example, PromptRow, get_suite, list_suites, load_prompts
from tropd.tasks.builtin import builtin_prompts

SUITE_SIZES = {"train": 512, "test": 64}


def prompts_for(source: str, split: str, seed: int = 0, skip_bad_rows: bool = False) -> list[PromptRow | Example]:
    """'builtin', a task suite name (its own disjoint splits), or a data file (a seeded 90/10 split)."""
    if source == "builtin":
        return builtin_prompts(split)
    if source in list_suites():
        return get_suite(source).examples(split, SUITE_SIZES[split], seed)
    rows = load_prompts(source, on_error="skip" if skip_bad_rows else "raise").rows
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_test = len(rows) // 10
    chosen = order[:n_test] if split == "test" else order[n_test:]
    return [rows[i] for i in chosen]
