"""A rank's rows on T threads (row_threads.py): the step trains what one thread trains, to rounding,
BatchNorm's statistics included; a failing thread stops the step without a hang."""

import copy

import numpy as np
import pytest

from ddptrain import cli
from ddptrain.backends import threads as blas_threads
from ddptrain.distributed.comm import SerialComm
from ddptrain.distributed.exchange import Allreduce, BucketedAllreduce
from ddptrain.errors import UserError
from ddptrain.nn.dropout import BatchContext
from ddptrain.nn.losses import SoftmaxCrossEntropy
from ddptrain.nn.model import Sequential
from ddptrain.optim.optimizers import SGD
from ddptrain.run.config import Config
from ddptrain.training.row_threads import row_threads_of_run, suit_threads, wants_row_threads
from ddptrain.training.step import TrainStep
from helpers import final_params, metrics_records, relative_error

# a convolution, BatchNorm over channels, pooling and dropout: every layer that sums over rows or
# draws per row
CNN = "conv6k3-bn-maxpool2-flatten-16-bn-drop0.3-10"


def steps(threads, spec=CNN, batches=((13, 0), (13, 1), (2, 2)), micro_batches=1, exchange=None):
    """Parameters, buffers and step totals after training ``spec`` (float64) on ``batches`` of
    ``(rows, step)``, the rows on ``threads`` threads."""
    model = Sequential.from_spec(spec, dtype=np.float64, seed=3, input_shape=(1, 10, 10))
    rng = np.random.default_rng(0)
    step = TrainStep(model, SoftmaxCrossEntropy(), SGD(momentum=0.9),
                     exchange(model) if exchange else Allreduce(SerialComm()),
                     micro_batches=micro_batches, row_threads=threads)
    totals = []
    for rows, number in batches:
        x, y = rng.standard_normal((rows, 1, 10, 10)), rng.integers(0, 10, rows)
        totals.append(step(x, y, rows, lr=0.1, context=BatchContext(7, number, np.arange(rows))))
    step.close()
    return model.params, model.buffers, totals


@pytest.mark.parametrize("threads", [2, 3])
def test_t_threads_train_the_parameters_and_statistics_of_one_thread(threads):
    params, buffers, totals = steps(1)
    theirs, their_buffers, their_totals = steps(threads)
    np.testing.assert_allclose(theirs, params, rtol=0, atol=1e-10)
    np.testing.assert_allclose(their_buffers, buffers, rtol=0, atol=1e-10)
    for mine, one in zip(their_totals, totals):
        assert mine.loss_sum == pytest.approx(one.loss_sum, rel=1e-12)
        assert (mine.correct, mine.samples) == (one.correct, one.samples)
        assert mine.grad_norm == pytest.approx(one.grad_norm, rel=1e-12)


def test_threads_that_hold_no_rows_still_take_part():
    # 2 rows on 3 threads: one thread has none, yet the others wait for its BatchNorm sums
    params, buffers, _ = steps(1, batches=((2, 0), (1, 1)))
    theirs, their_buffers, _ = steps(3, batches=((2, 0), (1, 1)))
    np.testing.assert_allclose(theirs, params, rtol=0, atol=1e-10)
    np.testing.assert_allclose(their_buffers, buffers, rtol=0, atol=1e-10)


def test_row_threads_with_micro_batches_train_what_one_thread_trains():
    params, buffers, _ = steps(1, micro_batches=2)
    theirs, their_buffers, _ = steps(2, micro_batches=2)
    np.testing.assert_allclose(theirs, params, rtol=0, atol=1e-10)
    np.testing.assert_allclose(their_buffers, buffers, rtol=0, atol=1e-10)


def test_buckets_of_overlap_allreduce_start_once_the_threads_gradients_are_summed():
    params, _, _ = steps(1)
    theirs, _, _ = steps(2, exchange=lambda model: BucketedAllreduce(SerialComm(), model,
                                                                     bucket_bytes=2 ** 10))
    np.testing.assert_allclose(theirs, params, rtol=0, atol=1e-10)


def test_closing_the_step_gives_the_model_its_own_block_sizes_back():
    # the threads work in larger blocks than a rank's own thread (suit_threads); a model trained
    # on, in one thread, after a run on row threads (the Python API) computes in its own blocks
    model = Sequential.from_spec(CNN, dtype=np.float64, seed=3, input_shape=(1, 10, 10))
    conv, norm = model.layers[0], model.layers[1]
    conv.CHUNK_BYTES = 12345   # a size its user chose, on the layer itself
    step = TrainStep(model, SoftmaxCrossEntropy(), SGD(), Allreduce(SerialComm()), row_threads=2)
    x, y = np.random.default_rng(0).standard_normal((6, 1, 10, 10)), np.arange(6)
    step(x, y, 6, lr=0.1, context=BatchContext(7, 0, np.arange(6)))
    assert (conv.CHUNK_BYTES, norm.BLOCK_VALUES) != (12345, type(norm).BLOCK_VALUES)
    step.close()
    assert conv.CHUNK_BYTES == 12345
    assert "BLOCK_VALUES" not in vars(norm) and norm.BLOCK_VALUES == type(norm).BLOCK_VALUES


def poison_work_arrays(monkeypatch):
    """``np.empty`` hands out NaNs from here on: a layer that reads a work array it never wrote
    trains on NaN."""
    real_empty = np.empty

    def empty(shape, dtype=float, *args, **kwargs):
        array = real_empty(shape, dtype, *args, **kwargs)
        if array.dtype.kind == "f":
            array.fill(np.nan)
        return array
    monkeypatch.setattr(np, "empty", empty)


@pytest.mark.parametrize("spec", [CNN, "conv4k3p1-bn-maxpool2-flatten-10"])
def test_replicas_of_a_model_that_has_trained_read_no_work_array_they_never_wrote(
        spec, monkeypatch):
    # The model trains on 7 rows alone, then on 14 rows over 2 threads: each replica meets the
    # model's layout of 7 rows in work arrays of its own.
    poison_work_arrays(monkeypatch)
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((rows, 1, 10, 10)), rng.integers(0, 10, rows))
               for rows in (7, 14)]

    def trained(threads):
        model = Sequential.from_spec(spec, dtype=np.float64, seed=3, input_shape=(1, 10, 10))
        for (x, y), step_threads in zip(batches, (1, threads)):
            step = TrainStep(model, SoftmaxCrossEntropy(), SGD(), Allreduce(SerialComm()),
                             row_threads=step_threads)
            step(x, y, len(y), lr=0.1, context=BatchContext(7, 0, np.arange(len(y))))
            step.close()
        return model.params

    one_thread, two_threads = trained(1), trained(2)
    assert np.isfinite(two_threads).all()
    np.testing.assert_allclose(two_threads, one_thread, rtol=0, atol=1e-10)


@pytest.mark.parametrize("rows", [9, 2])   # 2 rows on 3 threads: one of them has none
def test_evaluation_on_the_threads_gives_the_outputs_of_one_model(rows):
    model = Sequential.from_spec(CNN, dtype=np.float64, seed=3, input_shape=(1, 10, 10))
    step = TrainStep(model, SoftmaxCrossEntropy(), SGD(), Allreduce(SerialComm()), row_threads=3)
    x = np.random.default_rng(1).standard_normal((16, 1, 10, 10))
    step(x, np.arange(16) % 10, 16, lr=0.1)
    model.buffers[...] *= 1.5   # as a checkpoint may hold them: the model's statistics count
    model.eval()
    threaded = step.forward(x[:rows]).copy()
    np.testing.assert_allclose(threaded, model.forward(x[:rows]), rtol=0, atol=1e-12)
    model.train()
    assert all(replica.training for replica in step._rows.replicas)   # ready for the next step
    step.close()


def test_a_failing_thread_stops_the_step_with_its_error_and_leaves_no_thread_waiting():
    model = Sequential.from_spec(CNN, dtype=np.float64, seed=3, input_shape=(1, 10, 10))
    step = TrainStep(model, SoftmaxCrossEntropy(), SGD(), Allreduce(SerialComm()), row_threads=2)
    replica = step._rows.replicas[1]
    conv = replica.layers[0]
    broken = conv.forward
    conv.forward = lambda x: (_ for _ in ()).throw(MemoryError("no memory for thread 1"))
    x, y = np.random.default_rng(0).standard_normal((8, 1, 10, 10)), np.arange(8)
    with pytest.raises(MemoryError, match="no memory for thread 1"):
        step(x, y, 8, lr=0.1)   # thread 0 waited in the first BatchNorm: released, not hung
    conv.forward = broken
    before = model.params.copy()
    step(x, y, 8, lr=0.1)   # the next step runs
    assert not np.array_equal(model.params, before)
    workers = list(step._rows._pool._threads)
    step.close()
    assert workers and not any(worker.is_alive() for worker in workers)


@pytest.mark.parametrize("spec, threads, choice, expected", [
    (CNN, 2, "auto", 2),             # a convolution: the threads on the rows
    ("64-16-10", 2, "auto", 1),      # an MLP: the BLAS's threads, inside its large products
    ("64-16-10", 2, "rows", 2),
    (CNN, 2, "blas", 1),
    (CNN, 1, "rows", 1),             # one thread: nothing to split
])
def test_the_rows_go_to_threads_for_convolutions_unless_told(spec, threads, choice, expected):
    model = Sequential.from_spec(spec, input_shape=(1, 10, 10) if spec == CNN else None)
    assert wants_row_threads(model.layers, threads, choice) == expected


# ---------------------------------------------------------------- from the command line

SMALL_CNN = "conv4k3-bn-maxpool2-flatten-12-drop0.2-10"   # for the 8x8 images of small_data


def train(small_data, run_dir, *options):
    return cli.main(["--data", small_data, "--model", SMALL_CNN, "--dtype", "float64",
                     "--batch-size", "29", "--epochs", "2", "--lr", "0.1", "--threads", "2",
                     "--run-dir", str(run_dir), *options])


def test_a_run_on_row_threads_trains_what_the_blas_threads_train(small_data, tmp_path, monkeypatch,
                                                                 capsys):
    monkeypatch.setattr(blas_threads, "usable_cores", lambda: {0, 1})   # any machine: 2 threads
    assert train(small_data, tmp_path / "blas", "--thread-work", "blas", "--quiet") == 0
    assert train(small_data, tmp_path / "rows") == 0   # auto: a convolution, so rows
    assert ("2 threads per rank, each on a slice of the step's rows with 1 BLAS thread"
            in capsys.readouterr().out)
    assert relative_error(final_params(tmp_path / "rows"), final_params(tmp_path / "blas")) < 1e-10
    rows, blas = metrics_records(tmp_path / "rows"), metrics_records(tmp_path / "blas")
    assert [r["test_accuracy"] for r in rows] == [r["test_accuracy"] for r in blas]


@pytest.mark.parametrize("options, problem", [
    ({"thread_work": "cores"}, "--thread-work must be one of auto, rows, blas, got 'cores'"),
    ({"thread_work": "rows", "reproducible": True}, "--reproducible with --thread-work rows"),
    ({"thread_work": "rows", "debug": True, "dtype": "float64"}, "--debug with --thread-work rows"),
])
def test_thread_work_refuses_what_it_cannot_do(options, problem):
    with pytest.raises(UserError, match=problem):
        Config(**options).validated()


def test_the_memory_estimate_counts_the_replicas_of_the_row_threads(small_data):
    from ddptrain.data.format import inspect
    from ddptrain.run.limits import estimate_rank_bytes
    model = Sequential.from_spec("conv4k3p1-bn-maxpool2-flatten-10", input_shape=(1, 8, 8))
    config, info = Config(model=model.spec), inspect(small_data)
    threads = row_threads_of_run(config, model.layers, 3)
    one, three = (estimate_rank_bytes(model.layers, config, info, 1, row_threads=count)
                  for count in (1, threads))
    # two replicas, each with a gradient and buffers of its own; three sets of work blocks, each of
    # the threads' size
    own = (model.params.size + model.buffers.size) * 4
    blocks = sum(layer.block_bytes() for layer in model.layers)
    thread_blocks = sum(layer.block_bytes()
                        for layer in suit_threads([copy.copy(layer) for layer in model.layers]))
    assert 0 < blocks < thread_blocks
    assert three["the model and its optimiser"] - one["the model and its optimiser"] == 2 * own
    assert three["activations"] - one["activations"] == 3 * thread_blocks - blocks
    assert three["this rank's data"] == one["this rank's data"]
    for off in ({"reproducible": True}, {"debug": True}, {"thread_work": "blas"}):
        assert row_threads_of_run(Config(model=model.spec, **off), model.layers, 3) == 1
