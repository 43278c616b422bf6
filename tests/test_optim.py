"""SGD against a hand-written loop of the PyTorch formulas, and its checkpointable state."""

import copy

import numpy as np
import pytest

from ddptrain.optim.optimizers import SGD

CONFIGS = {
    "plain": dict(momentum=0.0, weight_decay=0.0, nesterov=False),
    "momentum": dict(momentum=0.9, weight_decay=0.0, nesterov=False),
    "nesterov": dict(momentum=0.9, weight_decay=0.0, nesterov=True),
    "weight_decay": dict(momentum=0.0, weight_decay=1e-2, nesterov=False),
    "momentum_weight_decay": dict(momentum=0.8, weight_decay=5e-3, nesterov=False),
    "nesterov_weight_decay": dict(momentum=0.8, weight_decay=5e-3, nesterov=True),
}
LRS = [0.1, 0.05, 0.2, 0.01, 0.1, 0.03]   # a schedule: lr is passed to each step


def reference_sgd(params, grads_per_step, lrs, momentum, weight_decay, nesterov):
    """torch.optim.SGD with dampening 0, written out as in optim.py's docstring."""
    param = params.copy()
    buf = None
    for grad, lr in zip(grads_per_step, lrs):
        g = grad + weight_decay * param
        if momentum != 0:
            buf = g.copy() if buf is None else momentum * buf + g
            g = g + momentum * buf if nesterov else buf
        param = param - lr * g
    return param


def problem(n=50, steps=None, seed=0, dtype=np.float64):
    """Parameters, and a gradient for each of ``steps`` steps (one per rate of LRS unless told)."""
    steps = len(LRS) if steps is None else steps
    rng = np.random.default_rng(seed)
    params = rng.standard_normal(n).astype(dtype)
    grads_per_step = [rng.standard_normal(n).astype(dtype) for _ in range(steps)]
    return params, grads_per_step


def run(optimiser, params, grads_per_step, lrs):
    for grad, lr in zip(grads_per_step, lrs):
        optimiser.step(params, grad, lr)
    return params


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_sgd_follows_the_pytorch_formulas_over_several_steps(config):
    params, grads_per_step = problem()
    expected = reference_sgd(params, grads_per_step, LRS, **config)
    actual = run(SGD(**config), params.copy(), grads_per_step, LRS)
    np.testing.assert_allclose(actual, expected, rtol=1e-13, atol=1e-15)


def test_plain_sgd_step_is_params_minus_lr_times_grad():
    params, (grad, *_) = problem()
    expected = params - 0.1 * grad
    SGD().step(params, grad, 0.1)
    # The BLAS's axpby (blas.py) may fuse the multiply and the subtraction: one rounding instead of
    # two.
    np.testing.assert_allclose(params, expected, rtol=0,
                               atol=4 * np.spacing(np.abs(expected).max()))


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_step_leaves_the_grads_unchanged(config):
    params, grads_per_step = problem()
    originals = [g.copy() for g in grads_per_step]
    run(SGD(**config), params, grads_per_step, LRS)
    for grad, original in zip(grads_per_step, originals):
        np.testing.assert_array_equal(grad, original)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_float32_params_stay_float32_and_track_the_reference(config):
    params, grads_per_step = problem(dtype=np.float32)
    expected = reference_sgd(params.astype(np.float64),
                             [g.astype(np.float64) for g in grads_per_step], LRS, **config)
    actual = run(SGD(**config), params, grads_per_step, LRS)
    assert actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("saved_after", [0, 1, 3])
def test_resuming_from_state_dict_is_bitwise_identical_to_an_uninterrupted_run(config, saved_after):
    params, grads_per_step = problem()
    optimiser = SGD(**config)
    run(optimiser, params, grads_per_step[:saved_after], LRS[:saved_after])
    # A checkpoint: a deep copy, as if written to disk and read back.
    state, saved_params = copy.deepcopy(optimiser.state_dict()), params.copy()
    uninterrupted = run(optimiser, params, grads_per_step[saved_after:], LRS[saved_after:])

    resumed_optimiser = SGD(**config)   # the settings are given again; the state holds the rest
    resumed_optimiser.load_state_dict(state)
    resumed = run(resumed_optimiser, saved_params, grads_per_step[saved_after:], LRS[saved_after:])
    np.testing.assert_array_equal(resumed, uninterrupted)
    assert resumed_optimiser.steps == optimiser.steps == len(LRS)


def test_state_dict_is_a_snapshot_not_a_live_view():
    params, grads_per_step = problem()
    optimiser = SGD(momentum=0.9)
    run(optimiser, params, grads_per_step[:2], LRS[:2])
    state = optimiser.state_dict()
    velocity = state["velocity"].copy()
    run(optimiser, params, grads_per_step[2:], LRS[2:])
    np.testing.assert_array_equal(state["velocity"], velocity)
    assert state["steps"] == 2


def test_load_state_dict_copies_the_velocity():
    params, grads_per_step = problem()
    optimiser = SGD(momentum=0.9)
    run(optimiser, params, grads_per_step[:2], LRS[:2])
    state = optimiser.state_dict()
    resumed = SGD(momentum=0.9)
    resumed.load_state_dict(state)
    state["velocity"][...] = 0
    assert resumed.state_dict()["velocity"].any()


def test_the_state_holds_what_training_changed_and_none_of_the_settings():
    params, grads_per_step = problem()
    optimiser = SGD(momentum=0.9, weight_decay=1e-3, nesterov=True)
    assert optimiser.state_dict() == {"steps": 0}                       # no momentum buffer yet
    run(optimiser, params, grads_per_step[:1], LRS[:1])
    assert sorted(optimiser.state_dict()) == ["steps", "velocity"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(momentum=-0.1), "--momentum must be finite and not negative, got -0.1"),
    (dict(momentum=float("inf")), "--momentum must be finite and not negative, got inf"),
    (dict(weight_decay=-1e-4), "--weight-decay must be finite and not negative, got -0.0001"),
    (dict(weight_decay=float("nan")), "--weight-decay must be finite and not negative, got nan"),
    (dict(momentum=0.0, nesterov=True), "--nesterov needs --momentum > 0"),
], ids=["negative_momentum", "infinite_momentum", "negative_weight_decay", "nan_weight_decay",
        "nesterov_without_momentum"])
def test_invalid_settings_raise_a_value_error_naming_the_option(kwargs, message):
    with pytest.raises(ValueError) as raised:
        SGD(**kwargs)
    assert str(raised.value) == message
