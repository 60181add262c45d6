"""The learning rate at each optimizer step: a pure function of the step, so a resumed run needs no saved state.

With peak rate ``η``, ``N`` steps and ``W`` warm-up steps, step ``s`` (0-based) trains at::

    warm-up (s < W):  η · (s + 1) / W
    then, with p = (s − W) / (N − W) ∈ [0, 1):
        constant      η
        linear        η · (1 − p)
        cosine        η · (1 + cos(π p)) / 2

(the decays reach 0 only after the last step, so every step trains). ``constant`` without warm-up is the
trainer's default and what it did before schedules existed.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def lr_at(step: int, peak: float, steps: int, schedule: str = "constant", warmup_steps: int = 0) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``steps`` (module docstring)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"learning-rate schedule must be one of {SCHEDULES}, got {schedule!r}")
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    if schedule == "linear":
        return peak * (1.0 - progress)
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak
