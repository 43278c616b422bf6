"""BatchNorm: its backward against finite differences, PyTorch's conventions, and statistics of the
global batch however it is split across (simulated) ranks; Dropout masks that do not depend on the
split."""

import numpy as np
import pytest

from ddptrain.nn.dropout import BatchContext, Dropout
from ddptrain.nn.losses import SoftmaxCrossEntropy
from ddptrain.nn.model import Sequential
from ddptrain.nn.normalization import BatchNorm
from helpers import numerical_grad, on_simulated_ranks, rel_error

TOL = 1e-7


def batchnorm(channels, seed=0, dtype=np.float64):
    """A BatchNorm in a model of its own (so that it has parameters), with generic weight and
    bias."""
    layer = BatchNorm(channels)
    Sequential([layer], dtype=dtype)
    rng = np.random.default_rng(seed)
    layer.params["weight"][...] = rng.uniform(0.5, 1.5, channels)
    layer.params["bias"][...] = rng.standard_normal(channels)
    return layer


SHAPES = {"rows": (6, 4), "images": (3, 4, 5, 2)}


def case(shape, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape) * 3 + 1, rng.standard_normal(shape)


# ---------------------------------------------------------------- the layer


def assert_gradients_match_finite_differences(layer, shape):
    """The layer's input, weight and bias gradients on ``case(shape)`` against finite
    differences."""
    x, g = case(shape)
    # The forward updates the running statistics in training mode: each evaluation starts afresh.
    running = {name: array.copy() for name, array in layer.buffers.items()}

    def loss(x_):
        for name, array in running.items():
            layer.buffers[name][...] = array
        return np.sum(g * layer.forward(x_))

    loss(x)
    dx = layer.backward(g).copy()
    assert rel_error(dx, numerical_grad(loss, x.copy())) < TOL
    for name in ("weight", "bias"):
        analytic = layer.grads[name].copy()
        assert rel_error(analytic,
                         numerical_grad(lambda _: loss(x), layer.params[name])) < TOL, name


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batchnorm_gradients_match_finite_differences(shape, mode):
    """Input, weight and bias, in training mode (batch statistics) and evaluation mode (running
    ones)."""
    layer = batchnorm(shape[1])
    layer.buffers["running_mean"][...] = [0.3, -0.2, 0.1, 0.5]
    layer.buffers["running_var"][...] = [1.5, 0.7, 2.0, 1.1]
    layer.training = mode == "train"
    assert_gradients_match_finite_differences(layer, shape)


def test_batchnorm_normalises_each_channel_by_its_biased_variance_and_updates_running_statistics():
    layer = batchnorm(3)
    layer.params["weight"][...] = 1
    layer.params["bias"][...] = 0
    x = np.random.default_rng(2).standard_normal((5, 3, 2, 2)) * [[[[2.0]], [[0.5]], [[3.0]]]] + 4
    out = layer.forward(x)
    mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))          # biased, as for normalising
    np.testing.assert_allclose(out, (x - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5),
                               atol=1e-12)
    count = 5 * 2 * 2
    np.testing.assert_allclose(layer.buffers["running_mean"], 0.1 * mean, rtol=1e-12)
    np.testing.assert_allclose(layer.buffers["running_var"], 0.9 + 0.1 * var * count / (count - 1),
                               rtol=1e-12)


def test_evaluation_uses_the_running_statistics_and_leaves_them_alone():
    layer = batchnorm(2)
    layer.buffers["running_mean"][...] = [1.0, -1.0]
    layer.buffers["running_var"][...] = [4.0, 0.25]
    layer.training = False
    x = np.array([[3.0, 0.0], [1.0, -1.0]])
    normalised = (x - [1.0, -1.0]) / np.sqrt([4.0 + 1e-5, 0.25 + 1e-5])
    expected = normalised * layer.params["weight"] + layer.params["bias"]
    np.testing.assert_allclose(layer.forward(x), expected, rtol=1e-12)
    np.testing.assert_array_equal(layer.buffers["running_mean"], [1.0, -1.0])


@pytest.mark.parametrize("shape", [(4096, 2), (64, 2, 8, 8)], ids=["rows", "images"])
def test_float32_statistics_do_not_cancel_when_the_mean_dwarfs_the_spread(shape):
    """Values near 10,000 with a spread of 1: sum(x**2) - n * mean**2 in float32 loses every
    digit."""
    rng = np.random.default_rng(3)
    x = (10_000 + rng.standard_normal(shape)).astype(np.float32)
    layer = batchnorm(2, dtype=np.float32)
    mean, var, _ = layer._statistics(layer._local_sums(layer._groups(x)))
    axes = (0,) if len(shape) == 2 else (0, 2, 3)
    reference = x.astype(np.float64).var(axis=axes)
    assert rel_error(var, reference) < 1e-5
    assert rel_error(mean, x.astype(np.float64).mean(axis=axes)) < 1e-12
    naive = (x * x).mean(axis=axes, dtype=np.float32) - x.mean(axis=axes, dtype=np.float32) ** 2
    assert rel_error(naive, reference) > 0.1   # what the test guards against


# ---------------------------------------------------------------- the global batch across ranks


# rows of a 11-row batch per rank: sizes 1, 4, 6 (and none on a fourth rank)
UNEVEN = [0, 1, 5, 11]


@pytest.mark.parametrize("shape", [(11, 3), (11, 3, 2, 2)], ids=["rows", "images"])
@pytest.mark.parametrize("ranks", [3, 4])
def test_global_statistics_give_every_rank_the_single_process_output_and_gradients(shape, ranks):
    x, g = case(shape, seed=4)
    bounds = UNEVEN if ranks == 3 else [0, 1, 5, 5, 11]   # a rank with no rows at all

    single = batchnorm(shape[1])
    out = single.forward(x).copy()
    dx = single.backward(g).copy()

    def rank_work(comm):
        layer = batchnorm(shape[1])
        layer.sum_over_ranks = comm.allreduce_
        lo, hi = bounds[comm.rank], bounds[comm.rank + 1]
        part_out = layer.forward(x[lo:hi]).copy()
        part_dx = layer.backward(g[lo:hi]).copy()
        grads = comm.allreduce(np.concatenate([layer.grads["weight"], layer.grads["bias"]]))
        running = layer.buffers["running_mean"].copy(), layer.buffers["running_var"].copy()
        return part_out, part_dx, grads, *running

    results = on_simulated_ranks(ranks, rank_work)
    assert rel_error(np.concatenate([r[0] for r in results]), out) < 1e-12
    assert rel_error(np.concatenate([r[1] for r in results]), dx) < 1e-12
    for _, _, grads, running_mean, running_var in results:
        assert rel_error(grads,
                         np.concatenate([single.grads["weight"], single.grads["bias"]])) < 1e-12
        assert rel_error(running_mean, single.buffers["running_mean"]) < 1e-12
        assert rel_error(running_var, single.buffers["running_var"]) < 1e-12


def test_the_allreduced_gradient_matches_finite_differences_of_the_global_batch_loss():
    """An MLP with BatchNorm, its batch split unevenly over 3 simulated ranks; the reference loss is
    computed by one process on the whole batch."""
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((11, 6)), rng.integers(0, 3, 11)

    def model():
        m = Sequential.from_spec("6-5-bn-3", dtype=np.float64, seed=2)
        m.layers[2].params["bias"][...] = 0.3   # generic shift and scale of the BatchNorm
        m.layers[2].params["weight"][...] = [1.2, 0.7, 1.0, 0.9, 1.1]
        return m

    def rank_work(comm):
        m = model()
        m.set_sum_over_ranks(comm.allreduce_)
        lo, hi = UNEVEN[comm.rank], UNEVEN[comm.rank + 1]
        loss = SoftmaxCrossEntropy()
        loss.forward(m.forward(x[lo:hi]), y[lo:hi], normaliser=len(x))   # the GLOBAL count
        m.backward(loss.backward())
        return comm.allreduce_(m.grads.copy())

    grads = on_simulated_ranks(3, rank_work)
    reference = model()

    def whole(_):   # the loss of the whole batch, as numerical_grad sets reference's parameters
        return SoftmaxCrossEntropy().forward(reference.forward(x), y, normaliser=len(x))

    numeric = numerical_grad(whole, reference.params)
    for rank_grads in grads:
        assert rel_error(rank_grads, numeric) < 1e-6


def test_per_rank_statistics_are_not_the_global_batch_s():
    """--batchnorm local (what plain DDP does): each rank normalises by its own rows."""
    x, _ = case((11, 3), seed=6)
    single = batchnorm(3).forward(x).copy()

    def rank_work(comm):
        lo, hi = UNEVEN[comm.rank], UNEVEN[comm.rank + 1]
        return batchnorm(3).forward(x[lo:hi]).copy()   # no sum_over_ranks: local statistics

    # rank 0's single row normalises to 0
    local = np.concatenate(on_simulated_ranks(3, rank_work)[1:])
    assert rel_error(local, single[1:]) > 0.1


# ---------------------------------------------------------------- Dropout


def dropout(p, name="dropout1"):
    layer = Dropout(p)
    layer.name = name
    return layer


def test_a_dropout_mask_depends_on_the_step_and_the_position_not_on_the_split():
    x = np.ones((12, 50))
    whole = dropout(0.3)
    whole.batch_context = BatchContext(seed=7, step=4, positions=np.arange(12))
    full = whole.forward(x).copy()
    parts = []
    for rank in range(3):                    # rank r holds positions r, r + 3, r + 6, r + 9
        layer = dropout(0.3)
        layer.batch_context = BatchContext(seed=7, step=4, positions=np.arange(rank, 12, 3))
        parts.append((np.arange(rank, 12, 3), layer.forward(x[rank::3]).copy()))
    for positions, part in parts:
        np.testing.assert_array_equal(part, full[positions])
    later = dropout(0.3)
    later.batch_context = BatchContext(seed=7, step=5, positions=np.arange(12))
    # another step, another mask
    assert not np.array_equal(later.forward(x), full)
    other = dropout(0.3, name="dropout2")
    other.batch_context = whole.batch_context
    # another layer, another mask
    assert not np.array_equal(other.forward(x), full)


def test_dropout_keeps_a_fraction_1_minus_p_scaled_by_its_inverse_and_is_the_identity_in_eval():
    layer = dropout(0.25)
    layer.batch_context = BatchContext(seed=0, step=0, positions=np.arange(400))
    out = layer.forward(np.ones((400, 100)))
    kept = out != 0
    assert abs(kept.mean() - 0.75) < 0.01 and np.allclose(out[kept], 1 / 0.75)
    g = np.random.default_rng(8).standard_normal((400, 100))
    # the same mask, the same scale
    np.testing.assert_array_equal(layer.backward(g), g * out)
    layer.training = False
    x = np.arange(6.0).reshape(2, 3)
    assert layer.forward(x) is x


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_a_dropout_probability_outside_0_to_1_is_refused(p):
    with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\)"):
        Dropout(p)


# ---------------------------------------------------------------- in a run


def train(small_data, tmp_path, *options):
    from ddptrain import cli
    return cli.main(["--data", small_data, "--epochs", "1", "--quiet", "--run-dir",
                     str(tmp_path / "run"), *map(str, options)])


@pytest.mark.parametrize("options, message", [
    (["--model", "64-16-bn-10", "--batch-size", "1"], "--model 64-16-bn-10: batch normalisation "
                                                      "needs at least 2 values per channel in "
                                                      "every global batch, but a global batch of 1 "
                                                      "gives layer batchnorm1 1"),
    (["--model", "64-16-bn-10", "--batch-size", "239"], "but the last, short global batch of an "
                                                        "epoch (240 rows in batches of 239) gives "
                                                        "layer batchnorm1 1: add --drop-last or "
                                                        "choose another --batch-size"),
    (["--model", "64-16-bn-10", "--batch-size", "3", "--simulate-ranks", "2", "--batchnorm",
      "local"], "--batchnorm local needs at least 2 values per channel on every rank, but a rank's "
                "share of a global batch of 3 gives layer batchnorm1 1"),
    (["--model", "64-bn-16-10"], "the input size cannot take 'bn' or 'drop<p>'"),
    (["--model", "64-16-drop1.0-10"], "'drop1.0' (token 3) is not a dropout probability in [0, 1)"),
    (["--model", "64-16-drop-0.1-10"], "'drop' (token 3) is not a dropout probability in [0, 1)"),
    (["--model", "64-16-10-bn"],
     "it must end with the output size (the number of classes), not 'bn'"),
    (["--model", "64-16-bn-10", "--batchnorm", "sync"], "--batchnorm: invalid choice: 'sync'"),
],
                         ids=["global-batch-of-1", "last-batch-of-1", "local-share-of-1",
                              "bn-first", "drop1.0", "drop-0.1", "bn-after-the-output",
                              "unknown-mode"])
def test_batch_normalisation_that_cannot_work_is_refused_at_start_with_one_line(
        small_data, tmp_path, capsys, options, message):
    assert train(small_data, tmp_path, *options) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ddptrain: error: ") and message in err, err
    assert not (tmp_path / "run").exists()


def test_debug_confirms_the_gradient_of_a_model_with_batchnorm_and_dropout_on_simulated_ranks(
        small_data, tmp_path, capsys):
    assert train(small_data, tmp_path, "--model", "64-16-bn-drop0.3-10", "--batch-size", "29",
                 "--debug", "--simulate-ranks", "3") == 0
    assert "the allreduced gradient agrees with finite differences" in capsys.readouterr().out


def test_debug_catches_batch_statistics_taken_over_each_rank_s_rows_only(
        small_data, tmp_path, monkeypatch, capsys):
    """The bug plain DDP has by design, injected into global mode: the layers never see the other
    ranks."""
    monkeypatch.setattr(Sequential, "set_sum_over_ranks", lambda model, sum_over_ranks: None)
    assert train(small_data, tmp_path, "--model", "64-16-bn-10", "--batch-size", "29", "--debug",
                 "--simulate-ranks", "3") == 1
    err = capsys.readouterr().err
    assert "gradient check failed at step 0" in err and err.count("ddptrain: error:") == 1


# ---------------------------------------------------------------- block by block


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batchnorm_block_by_block_gives_the_values_and_gradients_of_one_pass(mode):
    """Blocks of one sample and of three (the last shorter) against one block of all 7."""
    x, g = case((7, 4, 3, 5), seed=8)

    def run(block_values):
        layer = batchnorm(4)
        layer.BLOCK_VALUES = block_values
        layer.training = mode == "train"
        out = layer.forward(x).copy()
        return out, layer.backward(g).copy(), layer.grads["weight"].copy(), \
            layer.grads["bias"].copy()

    whole = run(1 << 20)
    for samples in (1, 3):
        for got, expected in zip(run(samples * 4 * 3 * 5), whole):
            assert rel_error(got, expected) < 1e-13


def test_a_training_backward_uses_up_its_forward_and_a_second_one_is_refused():
    """The input gradient is written over the centred values the forward kept."""
    layer = batchnorm(4)
    x, g = case(SHAPES["images"])
    layer.forward(x)
    first = layer.backward(g).copy()
    with pytest.raises(RuntimeError, match="backward once per training forward"):
        layer.backward(g)
    layer.forward(x)
    np.testing.assert_array_equal(layer.backward(g), first)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_batchnorm_block_by_block_matches_finite_differences(shape):
    layer = batchnorm(shape[1])
    layer.BLOCK_VALUES = 1   # one sample per block
    assert_gradients_match_finite_differences(layer, shape)


def test_float32_gradients_do_not_cancel_when_the_mean_dwarfs_the_spread():
    """Values near 10,000 with a spread of 1, in float32: the output and the input gradient agree
    with float64's to float32 precision, as the centred values carry them (the output as x * scale
    + shift, as it once was, measured 2e-4 off)."""
    rng = np.random.default_rng(9)
    # the float64 run takes the same, float32, values
    x = (10_000 + rng.standard_normal((64, 2, 8, 8))).astype(np.float32).astype(np.float64)
    g = rng.standard_normal(x.shape).astype(np.float32).astype(np.float64)
    results = []
    for dtype in (np.float32, np.float64):
        layer = batchnorm(2, dtype=dtype)
        out = layer.forward(x.astype(dtype)).astype(np.float64)
        results.append((out, layer.backward(g.astype(dtype)).astype(np.float64)))
    (out32, dx32), (out64, dx64) = results
    assert rel_error(out32, out64) < 1e-5
    assert rel_error(dx32, dx64) < 1e-5
