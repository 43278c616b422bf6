"""--clip-grad-norm: PyTorch's clip_grad_norm_ on the allreduced gradient, so P ranks clip as one
process."""

import numpy as np
import pytest

from ddptrain import cli
from ddptrain.distributed.comm import SerialComm
from ddptrain.distributed.exchange import Allreduce
from ddptrain.nn.losses import SoftmaxCrossEntropy
from ddptrain.nn.model import Sequential
from ddptrain.optim.optimizers import SGD
from ddptrain.training.step import TrainStep, clip_gradient, local_gradient
from helpers import metrics_records, model_spec, on_simulated_ranks, rel_error

UNEVEN = [0, 1, 5, 11]   # an 11-row global batch over 3 ranks: 1, 4 and 6 rows


def test_clipping_scales_to_the_norm_as_pytorch_does_and_leaves_a_small_gradient_alone():
    grads = np.array([3.0, 4.0])                           # norm 5
    clip_gradient(grads, 5.0, max_norm=1.0)
    np.testing.assert_allclose(grads, np.array([3.0, 4.0]) / (5 + 1e-6), rtol=1e-15)
    small = np.array([0.3, 0.4])
    clip_gradient(small, 0.5, max_norm=1.0)
    np.testing.assert_array_equal(small, [0.3, 0.4])


def batch(seed=3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((11, 20)), rng.integers(0, 5, 11)


def one_step(comm, rows, max_norm):
    """One TrainStep (plain SGD, lr 1) on this rank's rows; returns the parameters after it and the
    norm."""
    x, y = batch()
    model = Sequential.from_spec("20-16-5", dtype=np.float64, seed=1)
    step = TrainStep(model, SoftmaxCrossEntropy(), SGD(), Allreduce(comm), clip_grad_norm=max_norm)
    totals = step(x[rows], y[rows], len(x), lr=1.0)
    return model.params.copy(), totals.grad_norm


def test_p_ranks_clip_the_global_gradient_exactly_as_one_process():
    reference, norm = one_step(SerialComm(), slice(None), max_norm=None)
    max_norm = norm / 4          # clipping is active: the gradient shrinks to a quarter
    single, single_norm = one_step(SerialComm(), slice(None), max_norm)
    results = on_simulated_ranks(
        3, lambda comm: one_step(comm, slice(UNEVEN[comm.rank], UNEVEN[comm.rank + 1]), max_norm))
    start = Sequential.from_spec("20-16-5", dtype=np.float64, seed=1).params
    for params, reported in results:
        # every rank reports the global norm
        assert reported == pytest.approx(single_norm, rel=1e-12)
        assert rel_error(params, single) < 1e-12
    np.testing.assert_allclose(np.linalg.norm(single - start), max_norm / (1 + 1e-6 / norm),
                               rtol=1e-9)
    assert rel_error(single, reference) > 0.1


def test_clipping_each_rank_s_share_by_its_own_norm_would_give_another_gradient():
    """The bug the test above guards against, computed here: it is off by far more than rounding."""
    x, y = batch()
    model = Sequential.from_spec("20-16-5", dtype=np.float64, seed=1)
    local_gradient(model, SoftmaxCrossEntropy(), x, y, len(x))
    whole = model.grads.copy()
    max_norm = np.linalg.norm(whole) / 4
    clip_gradient(whole, np.linalg.norm(whole), max_norm)
    local_clipped = np.zeros_like(whole)
    for lo, hi in zip(UNEVEN[:-1], UNEVEN[1:]):
        local_gradient(model, SoftmaxCrossEntropy(), x[lo:hi], y[lo:hi], len(x))
        share = model.grads.copy()
        clip_gradient(share, np.linalg.norm(share), max_norm)
        local_clipped += share
    assert rel_error(local_clipped, whole) > 0.05


def test_the_norm_is_in_the_step_records_and_debug_checks_the_gradient_before_clipping(
        small_data, tmp_path, capsys):
    run = ["--data", small_data, "--model", model_spec(), "--batch-size", "29", "--epochs", "1",
           "--metrics-every", "1", "--clip-grad-norm", "0.05"]
    assert cli.main([*run, "--run-dir", str(tmp_path / "clipped"), "--quiet"]) == 0
    steps = [r for r in metrics_records(tmp_path / "clipped") if r.get("kind") == "step"]
    assert len(steps) == 9 and all(r["grad_norm"] > 0.05 for r in steps)   # every step was clipped
    assert cli.main([*run, "--clip-grad-norm", "0", "--run-dir", str(tmp_path / "plain"),
                     "--quiet"]) == 0
    assert [r["train_loss"] for r in metrics_records(tmp_path / "plain")] != \
        [r["train_loss"] for r in metrics_records(tmp_path / "clipped")]
    assert cli.main([*run, "--debug", "--simulate-ranks", "3", "--run-dir",
                     str(tmp_path / "debug")]) == 0
    assert "the allreduced gradient agrees with finite differences" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_a_bad_clipping_norm_is_refused(small_data, tmp_path, capsys, value):
    assert cli.main(["--data", small_data, "--clip-grad-norm", value, "--run-dir",
                     str(tmp_path / "r")]) == 2
    assert "--clip-grad-norm must" in capsys.readouterr().err
