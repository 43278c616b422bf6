"""The learning rate: a pure function of the global step (warmup, cosine or step decay, the scaling
rule)."""

import numpy as np
import pytest

from ddptrain.optim.schedule import learning_rate
from ddptrain.run.config import Config


def schedule(**options):
    config = Config(epochs=4, lr=0.4, **options)
    return [learning_rate(config, step, steps_per_epoch=10) for step in range(40)]


def test_warmup_rises_linearly_then_cosine_decays_to_zero():
    lrs = schedule(warmup_epochs=1, lr_schedule="cosine")
    assert lrs[:10] == pytest.approx([0.04 * (s + 1) for s in range(10)])
    assert lrs[10] == pytest.approx(0.4) and all(np.diff(lrs[10:]) < 0) and lrs[-1] < 0.002


def test_step_decay_multiplies_by_gamma_every_step_size_epochs():
    lrs = schedule(lr_schedule="step", step_size=2, step_gamma=0.5)
    assert lrs[0] == lrs[19] == pytest.approx(0.4) and lrs[20] == lrs[39] == pytest.approx(0.2)


def test_the_linear_scaling_rule_scales_the_peak_with_the_global_batch():
    assert schedule(lr_schedule="constant", lr_scaling="linear", batch_size=512,
                    reference_batch=128)[0] == pytest.approx(1.6)
    assert schedule(lr_schedule="constant", batch_size=512)[0] == pytest.approx(0.4)
