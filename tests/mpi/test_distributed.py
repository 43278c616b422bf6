"""P ranks reproduce one process. Run under mpiexec: ``mpiexec -n P python -m pytest --with-mpi
tests/mpi``.

Every test holds for any number of ranks; tests/test_mpi.py runs this file
with 2, 3 and 4. Each test computes its single-process reference itself, in
the same process, with ``SerialComm``.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from ddptrain.data import format as data
from ddptrain.data.arrays import Arrays
from ddptrain.data.sampler import evaluation_block, owned_blocks
from ddptrain.distributed.comm import SerialComm
from ddptrain.errors import DataError, UserError
from ddptrain.nn.layer import Layer
from ddptrain.nn.losses import SoftmaxCrossEntropy
from ddptrain.nn.model import Sequential
from ddptrain.run import checkpoint
from ddptrain.run.config import Config
from ddptrain.run.runner import run_training
from ddptrain.training.batches import Split
from ddptrain.training.callbacks import ReplicaDivergence, check_replicas
from ddptrain.training.evaluation import evaluate
from helpers import Tally, make_chunked_dataset, make_dataset, model_spec

pytestmark = pytest.mark.mpi(min_size=2)


def relative_error(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def uneven_split(n_rows, ranks):
    """Row ranges of sizes proportional to 1, 2, ..., P: deliberately uneven local batches."""
    weights = np.arange(1, ranks + 1)
    edges = np.concatenate([[0], np.cumsum(weights)]) * n_rows // weights.sum()
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def gradient(model, x, y, normaliser):
    loss_fn = SoftmaxCrossEntropy()
    loss_fn.forward(model.forward(x), y, normaliser)
    model.backward(loss_fn.backward())
    return model.grads.copy()


def global_batch(seed=7, n=37, features=20, classes=5):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, features)), rng.integers(0, classes, n)


def test_allreduced_gradient_equals_the_single_process_gradient_on_uneven_shares(comm):
    x, y = global_batch()
    model = Sequential.from_spec("20-16-12-5", dtype=np.float64, seed=1)
    reference = gradient(model, x, y, normaliser=len(x))

    start, stop = uneven_split(len(x), comm.size)[comm.rank]
    local = gradient(model, x[start:stop], y[start:stop], normaliser=len(x))   # the GLOBAL count
    comm.allreduce_(local)

    assert relative_error(local, reference) < 1e-10


def test_mean_of_local_means_does_not_give_the_global_gradient(comm):
    """The wrong scaling the test above guards against: it is off by far more than rounding."""
    x, y = global_batch()
    model = Sequential.from_spec("20-16-12-5", dtype=np.float64, seed=1)
    reference = gradient(model, x, y, normaliser=len(x))

    start, stop = uneven_split(len(x), comm.size)[comm.rank]
    local_mean = gradient(model, x[start:stop], y[start:stop], normaliser=stop - start)
    mean_of_means = comm.allreduce_(local_mean) / comm.size

    assert relative_error(mean_of_means, reference) > 1e-2


def train_and_load(comm, config, with_buffers=False):
    run_training(config, comm, quiet=True)
    final = checkpoint.newest_valid(Path(config.run_dir) / "checkpoints")
    records = (Path(config.run_dir) / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in records]
    params = np.concatenate([final.params[name].ravel() for name in sorted(final.params)])
    if with_buffers:
        buffers = [final.buffers[name].ravel() for name in sorted(final.buffers)] or [np.zeros(0)]
        return params, np.concatenate(buffers), metrics
    return params, metrics


@pytest.mark.parametrize("dtype,epochs,tolerance", [("float64", 2, 1e-9), ("float32", 1, 1e-5)])
def test_training_on_p_ranks_gives_the_parameters_of_one_process(
        comm, shared_dir, dataset, dtype, epochs, tolerance):
    # Batch 29 does not divide by 2, 3 or 4: the ranks' shares differ every step,
    # and the last batch of each epoch (8 samples) is short.
    config = Config(data=dataset, model=model_spec(), dtype=dtype, epochs=epochs, batch_size=29,
                    lr=0.2, momentum=0.9, weight_decay=1e-3, log_every=1000, threads=1)
    distributed, distributed_metrics = train_and_load(
        comm, Config(**{**config.to_dict(), "run_dir": str(shared_dir / f"p{comm.size}-{dtype}")}))

    # The single-process reference, trained by every rank on its own.
    serial_dir = shared_dir / f"serial-{dtype}-rank{comm.rank}"
    single, single_metrics = train_and_load(
        SerialComm(), Config(**{**config.to_dict(), "run_dir": str(serial_dir)}))

    assert relative_error(distributed, single) < tolerance
    for mine, theirs in zip(distributed_metrics, single_metrics):
        # Training and test metrics are exact global sums, not averages of averages.
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=tolerance)
        assert mine["train_accuracy"] == theirs["train_accuracy"]
        assert mine["test_loss"] == pytest.approx(theirs["test_loss"], rel=tolerance)
        assert mine["test_accuracy"] == theirs["test_accuracy"]


def test_streamed_shards_on_p_ranks_train_the_parameters_of_one_process_with_p_times_the_memory(
        comm, shared_dir):
    """--data-memory: each rank streams its shards through windows of 2 blocks of 4 rows (the
    file's chunks); one process with P times the memory streams through the same windows."""
    data_file = shared_dir / "chunked.h5"
    if comm.rank == 0:
        make_chunked_dataset(data_file, chunk_rows=4)
    comm.barrier()
    per_rank = 24 // comm.size * 2 * 2 * 4 * (64 + 8)   # 2 windows of 2 blocks, 72-byte rows
    config = Config(data=str(data_file), model=model_spec(), dtype="float64", epochs=2,
                    batch_size=29, lr=0.2, momentum=0.9, log_every=1000, threads=1)
    distributed, distributed_metrics = train_and_load(comm, Config(**{
        **config.to_dict(), "data_memory": per_rank,
        "run_dir": str(shared_dir / f"streamed-p{comm.size}")}))
    single, single_metrics = train_and_load(SerialComm(), Config(**{
        **config.to_dict(), "data_memory": per_rank * comm.size,
        "run_dir": str(shared_dir / f"streamed-serial-rank{comm.rank}")}))
    assert relative_error(distributed, single) < 1e-9
    assert ([m["train_accuracy"] for m in distributed_metrics]
            == [m["train_accuracy"] for m in single_metrics])
    saved = checkpoint.newest_valid(shared_dir / f"streamed-p{comm.size}" / "checkpoints")
    assert saved.state["data_order"] == {"window_blocks": 2, "block_rows": 4}


BN_MODEL = "64-16-bn-drop0.2-12-bn-10"   # batch normalisation and dropout in both hidden layers


def test_with_batchnorm_and_dropout_p_ranks_train_the_parameters_and_statistics_of_one_process(
        comm, shared_dir, dataset):
    """Global batch statistics and position-keyed dropout masks: the split changes nothing but
    rounding."""
    config = Config(data=dataset, model=BN_MODEL, dtype="float64", epochs=2, batch_size=29, lr=0.2,
                    momentum=0.9, log_every=1000, threads=1)
    params, buffers, metrics = train_and_load(
        comm, Config(**{**config.to_dict(), "run_dir": str(shared_dir / f"bn-p{comm.size}")}),
        with_buffers=True)
    single, single_buffers, single_metrics = train_and_load(
        SerialComm(),
        Config(**{**config.to_dict(), "run_dir": str(shared_dir / f"bn-serial-{comm.rank}")}),
        with_buffers=True)

    assert relative_error(params, single) < 1e-9
    assert relative_error(buffers, single_buffers) < 1e-9   # running means and variances
    assert len(metrics) == len(single_metrics) == 2
    for mine, theirs in zip(metrics, single_metrics):
        for key in ("train_loss", "test_loss"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-9)
        assert mine["train_accuracy"] == theirs["train_accuracy"]
        assert mine["test_accuracy"] == theirs["test_accuracy"]

    # What plain DDP does, each rank normalising by its own rows: the model depends on the ranks.
    local, local_buffers, _ = train_and_load(
        comm, Config(**{**config.to_dict(), "batchnorm": "local",
                        "run_dir": str(shared_dir / f"bn-local-p{comm.size}")}),
        with_buffers=True)
    assert relative_error(local, single) > 1e-4
    assert relative_error(local_buffers, single_buffers) > 1e-4


# Convolution with padding and stride, both poolings, batch normalisation of images and dropout, on
# 8x8 images: 4x8x8 -> maxpool 4x4x4 -> 6x2x2 (stride 2) -> avgpool 6x1x1 -> 12 -> 10.
CNN_MODEL = "conv4k3p1-bn-maxpool2-conv6k3s2p1-bn-drop0.1-avgpool2-flatten-12-10"


def test_a_cnn_on_p_ranks_trains_the_parameters_and_statistics_of_one_process(
        comm, shared_dir, dataset):
    config = Config(data=dataset, model=CNN_MODEL, dtype="float64", epochs=2, batch_size=29, lr=0.1,
                    momentum=0.9, log_every=1000, threads=1)
    params, buffers, metrics = train_and_load(
        comm, Config(**{**config.to_dict(), "run_dir": str(shared_dir / f"cnn-p{comm.size}")}),
        with_buffers=True)
    single, single_buffers, single_metrics = train_and_load(
        SerialComm(),
        Config(**{**config.to_dict(), "run_dir": str(shared_dir / f"cnn-serial-{comm.rank}")}),
        with_buffers=True)

    assert relative_error(params, single) < 1e-9
    assert relative_error(buffers, single_buffers) < 1e-9
    assert [(m["train_accuracy"], m["test_accuracy"]) for m in metrics] == \
        [(m["train_accuracy"], m["test_accuracy"]) for m in single_metrics]
    # It learned something: the test is not comparing two untrained models.
    assert relative_error(single, train_and_load(SerialComm(), Config(**{
        **config.to_dict(), "epochs": 1,
        "run_dir": str(shared_dir / f"cnn-one-epoch-{comm.rank}")}))[0]) > 1e-3



def test_gradient_accumulation_on_p_ranks_trains_the_parameters_of_one_process_without_it(
        comm, shared_dir, dataset):
    config = Config(data=dataset, model="64-16-drop0.2-10", dtype="float64", epochs=1,
                    batch_size=29, lr=0.2, momentum=0.9, log_every=1000, threads=1)
    accumulated, _ = train_and_load(
        comm,
        Config(**{**config.to_dict(), "accumulate": 3,
                  "run_dir": str(shared_dir / f"accumulate-p{comm.size}")}))
    single, _ = train_and_load(
        SerialComm(),
        Config(**{**config.to_dict(),
                  "run_dir": str(shared_dir / f"accumulate-serial-{comm.rank}")}))
    assert relative_error(accumulated, single) < 1e-9



@pytest.mark.parametrize("optimizer",
                         [dict(optimizer="sgd", momentum=0.9),
                          dict(optimizer="adamw", lr=0.01, weight_decay=0.01)],
                         ids=["sgd", "adamw"])
def test_a_sharded_optimiser_on_p_ranks_trains_the_parameters_of_one_unsharded_process(
        comm, shared_dir, dataset, optimizer):
    """Reduce-scatter, a slice's update, allgather: MPI's collectives, P = 2, 3, 4 (uneven
    slices)."""
    config = Config(**{**dict(data=dataset, model="64-16-10", dtype="float64", epochs=1,
                              batch_size=29, lr=0.2, log_every=1000, threads=1), **optimizer})
    name = optimizer["optimizer"]
    sharded, _ = train_and_load(
        comm,
        Config(**{**config.to_dict(), "shard_optimizer": True,
                  "run_dir": str(shared_dir / f"shard-{name}-p{comm.size}")}))
    single, _ = train_and_load(SerialComm(),
                               Config(**{**config.to_dict(),
                                         "run_dir": str(shared_dir / f"shard-{name}-{comm.rank}")}))
    assert relative_error(sharded, single) < 1e-9



@pytest.mark.parametrize("spec", [model_spec(), BN_MODEL])
def test_evaluation_over_ranks_equals_one_process_evaluating_everything(comm, dataset, spec):
    model = Sequential.from_spec(spec, dtype=np.float64, seed=3)
    for name, buffer in model.named_buffers():   # running statistics that are not the initial ones
        buffer[...] = np.random.default_rng(len(name)).uniform(0.5, 1.5, buffer.shape)
    info = data.inspect(dataset)
    rows = evaluation_block(info.n_test, comm.rank, comm.size)
    mine = evaluate(model, comm, Split(*data.read_rows(dataset, "test", [rows], np.float64)), 10)
    whole = evaluate(model, SerialComm(),
                     Split(*data.read_rows(dataset, "test", [(0, info.n_test)], np.float64)), 10)
    assert mine.loss == pytest.approx(whole.loss, rel=1e-12)
    assert mine.accuracy == whole.accuracy
    assert np.array_equal(mine.confusion, whole.confusion)


def test_every_rank_holds_the_same_bits_of_an_evaluation(comm, dataset):
    """What each rank decides from an evaluation (early stopping) is the same on every rank."""
    model = Sequential.from_spec(model_spec(), dtype=np.float64, seed=3)
    info = data.inspect(dataset)
    rows = evaluation_block(info.n_test, comm.rank, comm.size)
    mine = evaluate(model, comm, Split(*data.read_rows(dataset, "test", [rows], np.float64)), 10)
    assert len(set(comm.allgather((mine.loss.hex(), mine.accuracy.hex())))) == 1


def test_early_stopping_stops_every_rank_after_the_epoch_one_process_stops_after(
        comm, shared_dir, dataset):
    # At a constant --lr 0.3 the test loss is best at epoch 3: --early-stop 3 stops after epoch 6.
    config = dict(data=dataset, model=model_spec(), dtype="float64", epochs=12, batch_size=16,
                  lr=0.3, lr_schedule="constant", early_stop=3, log_every=1000, threads=1)
    distributed = run_training(Config(**config, run_dir=str(shared_dir / f"early-p{comm.size}")),
                               comm, quiet=True)
    single = run_training(Config(**config, run_dir=str(shared_dir / f"early-serial-{comm.rank}")),
                          SerialComm(), quiet=True)
    assert single.stopped_early_at == 6
    everyone = comm.allgather((distributed.stopped_early_at, distributed.best_epoch))
    assert everyone == [(single.stopped_early_at, single.best_epoch)] * comm.size
    for mine, theirs in zip(distributed.metrics, single.metrics, strict=True):
        assert mine["test_loss"] == pytest.approx(theirs["test_loss"], rel=1e-9)
        assert mine["test_accuracy"] == theirs["test_accuracy"]


def test_each_rank_reads_only_its_own_shard_and_together_they_read_every_row(
        comm, shared_dir, dataset, monkeypatch):
    reads = []
    real_read_rows = data.read_rows

    def recording_read_rows(path, split, blocks, dtype=np.float32):
        reads.append((split, list(blocks)))
        return real_read_rows(path, split, blocks, dtype)

    monkeypatch.setattr(data, "read_rows", recording_read_rows)
    run_training(Config(data=dataset, model=model_spec(), epochs=1, batch_size=24, threads=1,
                        log_every=1000, run_dir=str(shared_dir / f"reads-p{comm.size}")), comm,
                 quiet=True)

    train_blocks = [block for split, blocks in reads if split == "train" for block in blocks]
    assert train_blocks == owned_blocks(240, comm.rank, comm.size)
    rows = np.concatenate(comm.allgather(np.concatenate([np.arange(a, b) for a,
                                                         b in train_blocks])))
    assert np.array_equal(np.sort(rows), np.arange(240))   # disjoint, and every row read once


def test_only_rank_0_writes_metrics_and_checkpoints(comm, shared_dir, dataset):
    run_dir = shared_dir / f"writes-p{comm.size}"
    run_training(Config(data=dataset, model=model_spec(), epochs=2, batch_size=24, threads=1,
                        log_every=1000, run_dir=str(run_dir)), comm, quiet=True)
    comm.barrier()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    # once per epoch, not once per rank
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert checkpoint.newest_valid(run_dir / "checkpoints").state["epoch"] == 2


def test_diverged_replicas_are_detected_on_every_rank(comm):
    model = Sequential.from_spec("4-3-2", dtype=np.float64, seed=0)
    check_replicas(model, comm, step=0)   # identical: no error
    if comm.rank == comm.size - 1:
        model.params[0] += 1e-12   # one bit-level difference on one rank
    with pytest.raises(ReplicaDivergence,
                       match="parameters or buffers differ across ranks at step 5"):
        check_replicas(model, comm, step=5)


def test_diverged_buffers_are_detected_like_diverged_parameters(comm):
    model = Sequential([Tally(), *Sequential.from_spec("4-3-2").layers], dtype=np.float64)
    model.forward(np.ones((comm.rank + 1, 4)))   # each rank counts its own rows: the buffers differ
    with pytest.raises(ReplicaDivergence):
        check_replicas(model, comm, step=1)


class CountsForwardPasses(Layer):
    """A layer with a collective in its forward pass, as global batch normalisation has."""

    def __init__(self, comm):
        super().__init__()
        self.comm, self.passes = comm, 0

    def forward(self, x):
        self.passes += 1
        self.comm.allreduce(np.ones(1))   # every rank must get here as often, or the job hangs
        return x

    def backward(self, dout, need_input_grad=True):
        return dout


def test_evaluation_runs_as_many_forward_passes_on_every_rank_whatever_their_rows(comm):
    counter = CountsForwardPasses(comm)
    model = Sequential([counter, *Sequential.from_spec("4-3-2").layers], dtype=np.float64)
    rows = 7 * comm.rank   # rank 0 holds none, the last rank the most
    split = Split(np.ones((rows, 4)), np.zeros(rows, dtype=np.int64))
    result = evaluate(model, comm, split, n_classes=2, chunk=3)
    most = 7 * (comm.size - 1)
    # padded to the largest count, with empty batches
    assert counter.passes == -(-most // 3)
    assert result.confusion.sum() == sum(7 * r for r in range(comm.size))


def test_a_model_that_differs_between_ranks_is_refused_on_every_rank(comm, shared_dir, dataset):
    """Each rank of a script builds its own model: they must be the same network."""
    hidden = 16 if comm.rank == 0 else 12
    model = Sequential.from_spec(f"64-{hidden}-10", dtype=np.float64)
    config = Config(data=dataset, model=model.summary(), dtype="float64",
                    run_dir=str(shared_dir / "differs"))
    differs = r"the model differs between ranks \(rank 1's is not rank 0's\)"
    with pytest.raises(UserError, match=differs) as raised:
        run_training(config, comm, quiet=True, model=model)
    assert raised.value.all_ranks   # met alike by every rank: printed once, no abort


def test_in_memory_arrays_that_differ_between_ranks_are_refused_on_every_rank(
        comm, shared_dir, dataset):
    images, labels = data.read_rows(dataset, "train", [(0, 60)])
    pixels = (images * 255).round().astype(np.uint8)
    if comm.rank == comm.size - 1:
        pixels[7, 3, 3] ^= 1   # one bit of one pixel
    arrays = Arrays(pixels, labels, pixels[:20], labels[:20])
    config = Config(model=model_spec(), run_dir=str(shared_dir / "arrays-differ"))
    with pytest.raises(DataError,
                       match=f"the in-memory arrays of rank {comm.size - 1} differ from rank 0's"):
        run_training(config, comm, quiet=True, arrays=arrays)


# -- what ranks on several nodes must agree on (tests/test_multi_node.py runs them on separate
# hosts) -------


def last_rank_only(comm, mine, theirs):
    return theirs if comm.rank == comm.size - 1 else mine


def test_a_data_file_that_differs_on_one_rank_is_refused_on_every_rank_naming_that_rank(
        comm, shared_dir, dataset):
    other = shared_dir / f"other-{comm.size}.h5"
    if comm.rank == 0:
        make_dataset(other, n_train=240, n_test=60, seed=1)   # the same shapes, other pixels
    comm.barrier()
    config = Config(data=last_rank_only(comm, dataset, str(other)), model=model_spec(),
                    run_dir=str(shared_dir / "file-differs"))
    with pytest.raises(
        DataError,
        match=rf"rank {comm.size - 1} \(on [^)]+\) reads another file than rank 0 " r"\(on [^)]+\) "
        r"\(its content checksum attribute differs"):
        run_training(config, comm, quiet=True, dry_run=True)


def test_a_data_file_missing_on_one_rank_only_is_named_with_that_rank(comm, shared_dir, dataset):
    config = Config(data=last_rank_only(comm, dataset, str(shared_dir / "nowhere.h5")),
                    model=model_spec(), run_dir=str(shared_dir / "file-missing"))
    with pytest.raises(DataError,
                       match=rf"^rank {comm.size - 1} \(on [^)]+\): .*nowhere.h5: no such file$"):
        run_training(config, comm, quiet=True, dry_run=True)


def test_another_numpy_on_one_rank_is_refused_on_every_rank(comm, shared_dir, dataset, monkeypatch):
    from ddptrain.distributed import agreement
    if comm.rank == comm.size - 1:
        monkeypatch.setattr(agreement.np, "__version__", "1.0.0")
    config = Config(data=dataset, model=model_spec(), run_dir=str(shared_dir / "versions-differ"))
    with pytest.raises(UserError,
                       match=rf"rank {comm.size - 1} \(on [^)]+\) runs ddptrain \S+ with numpy "
                             rf"1.0.0, " r"but rank 0 \(on [^)]+\) runs ddptrain \S+ with numpy "):
        run_training(config, comm, quiet=True, dry_run=True)


@pytest.mark.parametrize("spec", [model_spec(hidden=(16, 12)), BN_MODEL, CNN_MODEL])
def test_overlapping_the_allreduce_with_backward_trains_the_parameters_of_one_process(
        comm, shared_dir, dataset, spec):
    """Buckets of 1 KiB: several non-blocking Allreduces in flight during backward, among the
    blocking ones of batch normalisation's backward."""
    config = Config(data=dataset, model=spec, dtype="float64", epochs=1, batch_size=29, lr=0.1,
                    momentum=0.9, log_every=1000, threads=1)
    name = spec.replace("-", "")
    params, buffers, metrics = train_and_load(
        comm,
        Config(**{**config.to_dict(), "overlap_allreduce": True, "bucket_mb": 1 / 1024,
                  "run_dir": str(shared_dir / f"overlap-{name}-p{comm.size}")}), with_buffers=True)
    single, single_buffers, single_metrics = train_and_load(
        SerialComm(),
        Config(**{**config.to_dict(),
                  "run_dir": str(shared_dir / f"overlap-{name}-1-r{comm.rank}")}),
        with_buffers=True)
    assert relative_error(params, single) < 1e-9
    if buffers.size:
        assert relative_error(buffers, single_buffers) < 1e-9
    assert metrics[-1]["test_accuracy"] == single_metrics[-1]["test_accuracy"]


def test_the_ranks_of_a_node_share_the_parameters_and_each_receives_the_sum_of_its_slice(comm):
    """node_memory.NodeMemory in MPI's shared windows: one copy of the parameters, a gradient slot
    each."""
    from ddptrain.distributed.node_memory import NodeMemory
    from ddptrain.distributed.sharding import shard_bounds
    model = Sequential.from_spec("20-16-5", dtype=np.float64, seed=1)
    shared = NodeMemory(comm, model.params.size, model.dtype)
    shared.place(model)
    np.testing.assert_array_equal(model.params,
                                  Sequential.from_spec("20-16-5", dtype=np.float64, seed=1).params)
    shared.sync()   # every rank has read them before one writes
    if shared.node.rank == shared.node.size - 1:
        model.params[0] = 42.0   # written by one rank of the node...
    shared.sync()
    assert model.params[0] == 42.0   # ...read by all of them
    model.grads[...] = np.arange(model.grads.size) * (comm.rank + 1.0)
    bounds = shard_bounds(model.grads.size, shared.node.size)
    mine = shared.reduce_scatter_(model.grads, bounds)
    lo, hi = bounds[shared.node.rank], bounds[shared.node.rank + 1]
    np.testing.assert_array_equal(mine, np.arange(lo, hi) * sum(range(1, comm.size + 1)))
    shared.release(model)


@pytest.mark.parametrize("optimizer",
                         [dict(optimizer="sgd", momentum=0.9, weight_decay=1e-3),
                          dict(optimizer="adamw", lr=0.01, weight_decay=0.01)],
                         ids=["sgd", "adamw"])
def test_the_shared_memory_exchange_trains_the_parameters_of_one_process(
        comm, shared_dir, dataset, optimizer):
    """Each rank sums its slice of every rank's gradient in the node's memory and updates that slice
    of the shared parameters; the clipping norm adds up the slices' squares."""
    config = Config(**{**dict(data=dataset, model=model_spec(), dtype="float64", epochs=2,
                              batch_size=29, lr=0.2, log_every=1000, threads=1, clip_grad_norm=2.0),
                       **optimizer})
    name = optimizer["optimizer"]
    shared, _ = train_and_load(comm,
                               Config(**{**config.to_dict(), "exchange": "shared-memory",
                                         "run_dir": str(shared_dir / f"node-{name}-p{comm.size}")}))
    mpi, _ = train_and_load(
        comm,
        Config(**{**config.to_dict(), "exchange": "allreduce",
                  "run_dir": str(shared_dir / f"allreduce-{name}-p{comm.size}")}))
    single, _ = train_and_load(SerialComm(),
                               Config(**{**config.to_dict(),
                                         "run_dir": str(shared_dir / f"node-{name}-{comm.rank}")}))
    assert relative_error(shared, single) < 1e-9
    if comm.size == 2:   # two ranks' gradients are added in the same order both ways
        np.testing.assert_array_equal(shared, mpi)
    else:
        assert relative_error(shared, mpi) < 1e-12
