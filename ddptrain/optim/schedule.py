"""Learning rate as a pure function of the global step.

Linear warmup from 0 over ``warmup_epochs``, then constant, cosine decay to 0
at the last step, or step decay by ``step_gamma`` every ``step_size`` epochs.
With ``lr_scaling = "linear"`` the peak learning rate follows the linear
scaling rule of Goyal et al. (2017), "Accurate, Large Minibatch SGD": it
grows in proportion to the global batch, ``lr * batch_size / reference_batch``;
pair it with a few epochs of warmup when the batch is large.

The step count is global (the same on every rank and for any rank count), so
the schedule, like the batches, does not depend on how many ranks train.
"""

from __future__ import annotations

import math


def peak_learning_rate(config):
    if config.lr_scaling == "linear":
        return config.lr * config.batch_size / config.reference_batch
    return config.lr


def learning_rate(config, step, steps_per_epoch):
    """The learning rate for global step ``step`` (0-based) of the run."""
    peak = peak_learning_rate(config)
    total = config.epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return peak * (step + 1) / warmup
    if config.lr_schedule == "constant":
        return peak
    if config.lr_schedule == "step":
        return peak * config.step_gamma ** ((step // steps_per_epoch) // config.step_size)
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
