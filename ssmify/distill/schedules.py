"""Learning-rate schedules as a factor of the peak lr: constant, cosine and WSD (warmup-stable-decay).

Each is a pure function of the step, so a resumed run needs no scheduler state: it recomputes
the lr from the step it resumes at.
"""

from __future__ import annotations

import math

from ssmify.distill.recipe import Schedule


def lr_factor(schedule: Schedule, step: int, total_steps: int) -> float:
    """The multiplier of the peak lr at optimizer step `step` (0-based) of `total_steps`.

    All three warm up linearly over the first `warmup` fraction of steps. Then constant stays at 1;
    cosine falls towards min_lr_ratio, which it would reach one step after the last; wsd stays at 1
    until the last `decay` fraction of steps and falls linearly towards min_lr_ratio over them.
    """
    warmup_steps = math.floor(schedule.warmup * total_steps)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    floor = schedule.min_lr_ratio
    if schedule.kind == "constant":
        return 1.0
    if schedule.kind == "cosine":
        span = max(total_steps - warmup_steps, 1)
        progress = (step - warmup_steps) / span
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = math.floor(schedule.decay * total_steps)
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = (step - decay_start) / decay_steps
    return floor + (1 - floor) * (1 - progress)
