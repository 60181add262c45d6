"""Evaluation metrics over sampled completions: unbiased pass@k, avg@n, and per-task aggregation.

pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): with ``n`` samples of which ``c``
are correct, the unbiased estimate of the probability that at least one of ``k`` samples drawn without
replacement is correct is ``1 - C(n-c, k) / C(n, k)``, computed as the product
``prod_{i=n-c+1}^{n} (1 - k / i)`` so no large binomial is ever formed.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``n`` samples, ``c`` of them correct (``0 <= c <= n``, ``1 <= k <= n``)."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError(f"n, c, k must be ints, got {n!r}, {c!r}, {k!r}")
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need n >= 1, 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prob_all_wrong = math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
    return 1.0 - prob_all_wrong


def avg_at_n(scores: Sequence[float]) -> float:
    """Mean score over the ``n`` samples of one problem (avg@n; scores may be fractional)."""
    if len(scores) == 0:
        raise ValueError("avg@n of no samples")
    return float(sum(scores)) / len(scores)


def count_correct(scores: Iterable[float], threshold: float = 1.0) -> int:
    """Samples whose score reaches ``threshold`` (default: a full 1.0 counts as correct)."""
    return sum(1 for s in scores if s >= threshold - 1e-9)


def summarize(results: Mapping[str, Mapping[str, Sequence[float]]], ks: Sequence[int] = (1,),
              threshold: float = 1.0) -> dict[str, dict[str, float]]:
    """Per-task means over problems.

    Args:
        results: ``results[task][problem_id]`` = the scores of that problem's samples (in ``[0, 1]``).
        ks: the k of each pass@k to report; every problem needs at least ``max(ks)`` samples.
        threshold: score that counts a sample as correct for pass@k.

    Returns:
        ``{task: {"avg@n": ..., "pass@1": ..., ..., "problems": P, "samples": S}}`` where ``avg@n`` and each
        ``pass@k`` are means over the task's problems (each problem weighs the same whatever its n).
    """
    summary: dict[str, dict[str, float]] = {}
    for task, problems in results.items():
        if not problems:
            raise ValueError(f"task {task!r} has no problems")
        row: dict[str, float] = {"avg@n": sum(avg_at_n(s) for s in problems.values()) / len(problems)}
        for k in ks:
            too_few = [pid for pid, s in problems.items() if len(s) < k]
            if too_few:
                raise ValueError(f"pass@{k} of task {task!r} needs >= {k} samples per problem; "
                                 f"{len(too_few)} have fewer (e.g. {too_few[0]!r})")
            row[f"pass@{k}"] = sum(pass_at_k(len(s), count_correct(s, threshold), k)
                                   for s in problems.values()) / len(problems)
        row["problems"] = float(len(problems))
        row["samples"] = float(sum(len(s) for s in problems.values()))
        summary[task] = row
    return summary
