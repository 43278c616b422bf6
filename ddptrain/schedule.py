"""Learning rate as a pure function of the global step.

Linear warmup from 0 over ``warmup_epochs``, then constant, cosine decay to 0
at the last step, or step decay by ``step_gamma`` every ``step_size`` epochs.
The step count is global (the same on every rank and for any rank count), so
the schedule, like the batches, does not depend on how many ranks train.
"""

from __future__ import annotations

import math


def learning_rate(config, step, steps_per_epoch):
    """The learning rate for global step ``step`` (0-based) of the run."""
    total = config.epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.lr_schedule == "constant":
        return config.lr
    if config.lr_schedule == "step":
        return config.lr * config.step_gamma ** ((step // steps_per_epoch) // config.step_size)
    progress = (step - warmup) / max(1, total - warmup)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
