"""Adam and AdamW against a hand-written float64 loop of PyTorch's formulas, their state, and the
options."""

import math

import numpy as np
import pytest

from ddptrain import cli
from ddptrain.errors import UserError
from ddptrain.optim.optimizers import Adam, AdamW

LRS = [1e-3, 5e-3, 2e-3, 1e-2, 1e-3, 4e-3]   # a schedule: lr is passed to each step
SETTINGS = {
    "defaults": dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0),
    "weight_decay": dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1),
    "other_betas": dict(beta1=0.5, beta2=0.9, eps=1e-3, weight_decay=0.01),
}


def reference(params, grads_per_step, lrs, beta1, beta2, eps, weight_decay, decoupled):
    """torch.optim.Adam / AdamW (amsgrad off), element by element, as PyTorch's _single_tensor_adam
    writes it."""
    param = [float(p) for p in params]
    m, v = [0.0] * len(param), [0.0] * len(param)
    for t, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        for i, grad in enumerate(grads):
            g = float(grad)
            if decoupled:
                param[i] *= 1 - lr * weight_decay
            else:
                g += weight_decay * param[i]
            m[i] += (1 - beta1) * (g - m[i])                     # exp_avg.lerp_(grad, 1 - beta1)
            # exp_avg_sq.mul_(beta2).addcmul_(...)
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            denom = math.sqrt(v[i]) / math.sqrt(1 - beta2 ** t) + eps
            param[i] -= lr / (1 - beta1 ** t) * m[i] / denom
    return np.array(param)


def problem(n=40, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(n).astype(dtype), [rng.standard_normal(n).astype(dtype) for _ in LRS]


@pytest.mark.parametrize("kind", [Adam, AdamW])
@pytest.mark.parametrize("setting", SETTINGS, ids=list(SETTINGS))
def test_adam_and_adamw_follow_pytorch_s_formulas_over_several_steps(kind, setting):
    params, grads = problem()
    expected = reference(params, grads, LRS, decoupled=kind is AdamW, **SETTINGS[setting])
    optimizer = kind(**SETTINGS[setting])
    for grad, lr in zip(grads, LRS):
        optimizer.step(params, grad, lr)
    np.testing.assert_allclose(params, expected, rtol=1e-12, atol=1e-14)
    assert optimizer.steps == len(LRS)


def test_adam_s_l2_term_and_adamw_s_decoupled_decay_differ():
    """The test above would pass for both if weight decay were ignored: here it must move the
    result."""
    params, grads = problem()
    results = {}
    for kind in (Adam, AdamW):
        for decay in (0.0, 0.1):
            p = params.copy()
            optimizer = kind(weight_decay=decay)
            for grad, lr in zip(grads, LRS):
                optimizer.step(p, grad, lr)
            results[kind.__name__, decay] = p
    assert not np.allclose(results["Adam", 0.1], results["Adam", 0.0])
    assert not np.allclose(results["AdamW", 0.1], results["AdamW", 0.0])
    assert not np.allclose(results["Adam", 0.1], results["AdamW", 0.1])
    np.testing.assert_array_equal(results["Adam", 0.0], results["AdamW", 0.0])


def test_the_first_step_moves_each_parameter_by_about_lr():
    """Bias correction: after one step m/sqrt(v) is +-1, so each parameter moves by lr (up to
    eps)."""
    params, grads = problem()
    before = params.copy()
    Adam().step(params, grads[0], 0.01)
    np.testing.assert_allclose(np.abs(params - before), 0.01, rtol=1e-5)


@pytest.mark.parametrize("kind", [Adam, AdamW])
def test_resuming_from_state_dict_is_bitwise_an_uninterrupted_run(kind):
    params, grads = problem(dtype=np.float32)
    whole, first = params.copy(), params.copy()
    uninterrupted = kind(weight_decay=0.01)
    for grad, lr in zip(grads, LRS):
        uninterrupted.step(whole, grad, lr)
    interrupted = kind(weight_decay=0.01)
    for grad, lr in zip(grads[:3], LRS[:3]):
        interrupted.step(first, grad, lr)
    state = interrupted.state_dict()
    assert sorted(state) == ["exp_avg", "exp_avg_sq", "steps"] and state["steps"] == 3
    resumed = kind(weight_decay=0.01)
    resumed.load_state_dict(state)
    state["exp_avg"][...] = 0   # the optimiser holds copies, not the dict's arrays
    for grad, lr in zip(grads[3:], LRS[3:]):
        resumed.step(first, grad, lr)
    np.testing.assert_array_equal(first, whole)


def test_a_step_allocates_nothing_once_warm():
    import tracemalloc
    params, grads = problem(n=100_000, dtype=np.float32)
    optimizer = AdamW(weight_decay=0.01)
    optimizer.step(params, grads[0], 1e-3)
    tracemalloc.start()
    try:
        optimizer.step(params, grads[1], 1e-3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < params.nbytes / 10


@pytest.mark.parametrize("kwargs, message", [
    (dict(beta1=1.0), "--beta1"), (dict(beta2=-0.1), "--beta2"), (dict(eps=0.0), "--eps"),
    (dict(weight_decay=-1.0), "--weight-decay"), (dict(beta1=float("nan")), "--beta1"),
])
def test_invalid_settings_are_refused_naming_the_option(kwargs, message):
    with pytest.raises(UserError, match=message):
        Adam(**kwargs)


# ---------------------------------------------------------------- the options

def config(*argv):
    return cli.config_from_args(cli.parse(list(argv)))


def test_the_optimizer_option_chooses_the_optimiser_with_its_settings():
    optimizer = config("--optimizer", "adamw", "--beta1", "0.8", "--eps", "1e-6",
                       "--weight-decay", "0.05").make_optimizer()
    assert isinstance(optimizer, AdamW) and (optimizer.beta1, optimizer.beta2,
                                             optimizer.eps) == (0.8, 0.999, 1e-6)
    assert optimizer.weight_decay == 0.05
    assert type(config().make_optimizer()).__name__ == "SGD"
    # a named model's SGD defaults (cnn: Nesterov momentum) step aside for Adam
    assert isinstance(config("--model", "cnn", "--optimizer", "adam").make_optimizer(), Adam)


@pytest.mark.parametrize("argv, message", [
    (["--optimizer", "adam", "--momentum", "0.5"],
     "--momentum is SGD's, and the optimiser is adam"),
    (["--optimizer", "adamw", "--nesterov"], "--nesterov is SGD's, and the optimiser is adamw"),
    (["--beta1", "0.8"], "--beta1 is Adam's and AdamW's, and the optimiser is sgd"),
    (["--optimizer", "adam", "--beta2", "1.5"], "--beta2 must be in [0, 1), got 1.5"),
])
def test_an_option_of_another_optimiser_or_a_bad_value_is_refused(argv, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace(")", r"\)")):
        config(*argv).validated()


def train(small_data, run_dir, *options):
    from helpers import model_spec
    return cli.main(["--data", small_data, "--model", model_spec(), "--optimizer", "adamw", "--lr",
                     "0.01", "--weight-decay", "0.01", "--lr-schedule", "constant", "--batch-size",
                     "16", "--quiet", "--run-dir", str(run_dir), *options])


def test_adamw_trains_and_resumes_bitwise_from_its_checkpoint(small_data, tmp_path):
    from ddptrain.run import checkpoint as ckpt_io
    from helpers import final_params, metrics_records
    assert train(small_data, tmp_path / "whole", "--epochs", "2") == 0
    records = metrics_records(tmp_path / "whole")
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert records[-1]["test_accuracy"] > 0.5
    assert train(small_data, tmp_path / "resumed", "--epochs", "1") == 0
    saved = ckpt_io.newest_valid(tmp_path / "resumed" / "checkpoints")
    assert saved.optimizer["type"] == "AdamW" and saved.optimizer["steps"] == 15
    assert saved.optimizer["exp_avg"].shape == saved.optimizer["exp_avg_sq"].shape == (sum(
        a.size for a in saved.params.values()),)
    assert train(small_data, tmp_path / "resumed", "--epochs", "2", "--resume", "auto") == 0
    np.testing.assert_array_equal(final_params(tmp_path / "resumed"),
                                  final_params(tmp_path / "whole"))


def test_a_checkpoint_of_another_optimiser_is_refused_with_one_line(small_data, tmp_path, capsys):
    assert train(small_data, tmp_path / "r", "--epochs", "1") == 0
    capsys.readouterr()
    assert train(small_data, tmp_path / "r", "--epochs", "2", "--resume", "auto", "--optimizer",
                 "adam") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "checkpoint holds the state of optimiser AdamW, not Adam" in err, err
