"""Learning-rate schedules as a multiplier of the peak LR: linear warm-up, then cosine decay, WSD
(warm-up, stable, decay: constant until the last `decay_fraction` of the steps, then a linear decay)
or constant."""

from __future__ import annotations

import math

from hemat.errors import HematError

SCHEDULES = ("cosine", "wsd", "constant")


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str = "cosine",
              min_ratio: float = 0.1, decay_fraction: float = 0.2) -> float:
    """The LR multiplier for optimizer step `step` (0-based) of `total_steps`: rises linearly to 1 over
    warmup_steps, then follows the schedule down to min_ratio at the last step."""
    if schedule not in SCHEDULES:
        raise HematError(f"unknown LR schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, total_steps - 1 - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, round(decay_fraction * total_steps))
    decay_start = max(warmup_steps, total_steps - decay_steps)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / max(1, total_steps - decay_start))
    return 1.0 - (1.0 - min_ratio) * progress
