"""--reproducible: P ranks give bitwise the bits of one process, at every step.

These run the ranks as threads of this process (``simulate_ranks``, the
same code as MPI ranks: tests/mpi/test_reproducible.py runs it under
mpiexec). "The same" here always means the same bytes: a hash of the
parameters and buffers after every step, the step's loss, accuracy and
gradient norm as exact floats, and every array of the final checkpoint.
"""

import contextlib
import hashlib
import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest

import ddptrain
from ddptrain.data import sampler
from ddptrain.distributed.gather import MessageGather, NodeGather
from ddptrain.distributed.sharding import NORM_CHUNK, shard_bounds
from ddptrain.errors import UserError
from ddptrain.nn.columns import BLOCK, ColumnSplit, blocks_of, owned_range
from ddptrain.nn.dropout import BatchContext
from ddptrain.nn.layer import Layer
from ddptrain.nn.layers import Linear
from ddptrain.nn.model import Sequential
from ddptrain.run import checkpoint
from ddptrain.training import groups
from ddptrain.training.reproducible import chunk_squares, norm_chunks, norm_of_squares
from helpers import SignalAtStep, on_simulated_ranks, template_arrays

SIDE = 8


@pytest.fixture(scope="module")
def arrays():
    return template_arrays(SIDE)


class StepHashes(ddptrain.Callback):
    """After every step: a hash of the parameters and buffers, and the step's totals as exact
    floats."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, trainer, end):
        if trainer.comm.rank:   # simulated ranks share this object: rank 0 records
            return
        model, totals = trainer.model, end.totals
        digest = hashlib.sha256(model.params.tobytes() + model.buffers.tobytes()).hexdigest()
        self.steps.append((digest, float(totals.loss_sum).hex(), totals.correct,
                           float(totals.grad_norm).hex()))


# Layers wide enough to be cut into several blocks of columns (nn/columns.py: BLOCK), which the
# ranks share out differently for every rank count: 300 columns are 3 blocks, 140 are 2.
MLP = "64-300-bn-drop0.2-140-10"


def train(arrays, tmp_path, ranks, spec=MLP, **options):
    """Train ``spec`` on ``ranks`` simulated ranks; ``(per-step records, final checkpoint, epoch
    metrics)``."""
    hashes = StepHashes()
    settings = dict(epochs=2, batch_size=40, lr=0.05, reproducible=True, seed=3, quiet=True,
                    run_dir=str(tmp_path / f"run-{ranks}-{len(list(tmp_path.iterdir()))}"))
    settings.update(options)
    run_dir = Path(settings["run_dir"])
    side = arrays[0].shape[-1]
    model = Sequential.from_spec(spec, dtype=settings.get("dtype", "float32"), seed=1,
                                 input_shape=(side, side))
    with contextlib.redirect_stdout(io.StringIO()):
        result = ddptrain.train(model, arrays, simulate_ranks=ranks if ranks > 1 else 0,
                                callbacks=[hashes, *settings.pop("callbacks", ())], **settings)
    final = checkpoint.newest_valid(run_dir / "checkpoints")
    return hashes.steps, final, [(m["train_loss"], m["test_loss"], m["test_accuracy"])
                                 for m in result.metrics]


def arrays_of(final):
    """Every array of a checkpoint (parameters, buffers, optimiser state), by name, as bytes."""
    named = {f"params/{k}": v for k, v in final.params.items()}
    named.update({f"buffers/{k}": v for k, v in final.buffers.items()})
    named.update({f"optimizer/{k}": v for k, v in final.optimizer.items()
                  if isinstance(v, np.ndarray)})
    return {name: (array.dtype.str, array.shape, array.tobytes()) for name, array in named.items()}


def assert_bitwise_equal(one, other, ranks):
    steps, final, metrics = one
    other_steps, other_final, other_metrics = other
    for step, (mine, theirs) in enumerate(zip(steps, other_steps), start=1):
        assert mine == theirs, f"{ranks} ranks differ from one process at step {step}"
    assert len(steps) == len(other_steps)
    assert arrays_of(final) == arrays_of(other_final)
    assert metrics == other_metrics


# ------------------------------------------------------------------ the promise, option by option

CASES = {
    "mlp sgd": dict(spec="64-300-140-10"),
    "bn + dropout mlp": dict(),
    "float64": dict(dtype="float64"),
    "adam, clipped": dict(optimizer="adam", clip_grad_norm=0.05),
    "adamw, sharded optimiser": dict(optimizer="adamw", weight_decay=0.01, shard_optimizer=True),
    "nesterov, overlapped allreduce": dict(nesterov=True, momentum=0.9, overlap_allreduce=True),
    "mpi allreduce exchange": dict(exchange="allreduce"),
    "accumulation": dict(spec="64-300-drop0.1-140-10", accumulate=3),
    "cnn": dict(spec="conv6k3p1-bn-maxpool2-flatten-150-10", epochs=1),
    "lenet-like": dict(spec="conv4k3-avgpool2-conv6k3-flatten-12-10", optimizer="adam", epochs=1),
}


@pytest.mark.parametrize("case", CASES)
def test_2_3_and_4_ranks_give_the_bits_of_one_process_at_every_step(arrays, tmp_path, case):
    options = CASES[case]
    one = train(arrays, tmp_path, 1, **options)
    for ranks in (2, 3, 4):
        assert_bitwise_equal(one, train(arrays, tmp_path, ranks, **options), ranks)


@pytest.mark.parametrize("exchange, through_memory", [("auto", True), ("allreduce", False)])
def test_on_one_node_the_rows_and_columns_go_through_its_shared_memory(arrays, tmp_path,
                                                                     monkeypatch, exchange,
                                                                     through_memory):
    """Where the gradient is summed in the node's memory, each step's rows (where each goes is
    known: no counts gathered first) and the two shared products of 64-300-140-10 (the last
    layer's 10 columns are one block, computed by every rank) meet there, and so do the
    evaluation's two products (the test set in one pass); with --exchange allreduce, they go
    through MPI."""
    gathers = []
    gathered = NodeGather.allgather_

    def counted(self, array, bounds):
        gathers.append(len(array))
        gathered(self, array, bounds)

    monkeypatch.setattr(NodeGather, "allgather_", counted)
    steps, _, _ = train(arrays, tmp_path, 2, spec="64-300-140-10", epochs=1, exchange=exchange)
    assert len(gathers) == through_memory * 2 * (3 * len(steps) + 2)   # 2 ranks


def test_6_and_8_ranks_too_with_uneven_local_batches(arrays, tmp_path):
    # batch 44 on 6 and 8 ranks: local batches of 7 and 8, and of 5 and 6
    one = train(arrays, tmp_path, 1, batch_size=44, epochs=1)
    for ranks in (6, 8):
        assert_bitwise_equal(one, train(arrays, tmp_path, ranks, batch_size=44, epochs=1), ranks)


# 141,814 parameters: three chunks of the norm's recipe (NORM_CHUNK), the last one partial, which
# the exchanges share out as whole chunks differently for every rank count
MANY_CHUNKS = "64-1100-64-10"


@pytest.mark.parametrize("exchange", [dict(), dict(shard_optimizer=True),
                                      dict(exchange="allreduce"), dict(overlap_allreduce=True)],
                         ids=["shared-memory", "sharded", "allreduce", "overlap"])
def test_a_gradient_of_several_norm_chunks_gives_the_bits_of_one_process_through_every_exchange(
        arrays, tmp_path, exchange):
    """Each chunk's squares come from the one rank that holds it reduced; the norm, the clipping
    it drives and the parameters are one process's on 2, 3 and 4 ranks."""
    assert norm_chunks(Sequential.from_spec(MANY_CHUNKS, input_shape=(SIDE, SIDE)).params.size) == 3
    options = dict(spec=MANY_CHUNKS, epochs=1, clip_grad_norm=0.5, **exchange)
    one = train(arrays, tmp_path, 1, **options)
    for ranks in (2, 3, 4):
        assert_bitwise_equal(one, train(arrays, tmp_path, ranks, **options), ranks)


def test_the_chunks_squares_from_any_split_into_whole_chunks_add_up_to_one_norm():
    """The squares of the chunks each rank counts, added over the ranks (one number and zeros per
    chunk), give bitwise the norm of all chunks squared by one rank, and the 2-norm to rounding."""
    grads = np.random.default_rng(4).standard_normal(3 * NORM_CHUNK + 123).astype(np.float32)
    whole = chunk_squares(grads, 0, grads.size, np.dot, np.zeros(norm_chunks(grads.size)))
    for ranks in (2, 3, 4, 8):
        bounds = shard_bounds(grads.size, ranks, NORM_CHUNK)
        assert all(start % NORM_CHUNK == 0 for start in bounds[:-1])
        summed = np.zeros_like(whole)
        for rank in range(ranks):
            summed += chunk_squares(grads, bounds[rank], bounds[rank + 1], np.dot,
                                    np.zeros_like(whole))
        assert summed.tobytes() == whole.tobytes()
    assert norm_of_squares(whole) == pytest.approx(np.linalg.norm(grads.astype(np.float64)),
                                                   rel=1e-6)


def test_one_process_with_2_threads_gives_the_bits_of_one_thread_and_of_2_ranks(arrays, tmp_path):
    one = train(arrays, tmp_path, 1, threads=1)
    assert_bitwise_equal(one, train(arrays, tmp_path, 1, threads=2), 1)
    assert_bitwise_equal(one, train(arrays, tmp_path, 2, threads=1), 2)


@pytest.mark.parametrize("below, threads", [(1, 1), (0, 2)])
def test_a_small_product_runs_on_its_own_thread_and_a_large_one_on_the_crew(below, threads):
    from ddptrain.nn.columns import INLINE_FLOPS
    split, ran = ColumnSplit(threads=2), []
    try:
        split.run([lambda: ran.append(threading.get_ident())] * 2, INLINE_FLOPS - below)
    finally:
        split.close()
    assert len(set(ran)) == threads
    assert threading.get_ident() in ran


def test_a_run_stopped_on_2_ranks_and_resumed_on_3_is_bitwise_the_uninterrupted_run(
        arrays, tmp_path):
    one = train(arrays, tmp_path, 1, optimizer="adam", epochs=3)
    run_dir = str(tmp_path / "stopped")
    stopped, _, _ = train(arrays, tmp_path, 2, optimizer="adam", epochs=3, run_dir=run_dir,
                          callbacks=[SignalAtStep(8)])
    assert 8 <= len(stopped) < 12   # mid-epoch (6 steps an epoch): the ranks stop together
    resumed, final, _ = train(arrays, tmp_path, 3, optimizer="adam", epochs=3, run_dir=run_dir,
                              resume="auto")
    assert stopped + resumed == one[0]
    assert arrays_of(final) == arrays_of(one[1])


@pytest.mark.parametrize("case", ["mlp sgd", "bn + dropout mlp", "accumulation"])
def test_it_trains_what_the_default_mode_trains_to_rounding(arrays, tmp_path, case):
    """The same bits on every rank count would hold for wrong arithmetic too: the blocks of columns
    must compute the model's gradient (float64: 1e-9 after two epochs)."""
    options = dict(CASES[case], dtype="float64")
    assert_trains_the_default_to_rounding(arrays, tmp_path, 3, **options)


def assert_trains_the_default_to_rounding(arrays, tmp_path, ranks, **options):
    """``--reproducible`` on ``ranks`` ends where the default mode does, to 1e-9 (float64): every
    parameter and buffer."""
    _, reproducible, _ = train(arrays, tmp_path, ranks, **options)
    _, default, _ = train(arrays, tmp_path, ranks, reproducible=False, **options)
    for name, array in default.params.items():
        np.testing.assert_allclose(reproducible.params[name], array, rtol=0, atol=1e-9,
                                   err_msg=name)
    for name, array in default.buffers.items():
        np.testing.assert_allclose(reproducible.buffers[name], array, rtol=0, atol=1e-9,
                                   err_msg=name)


def test_without_it_the_ranks_do_not_give_the_bits_of_one_process(arrays, tmp_path):
    """What the mode does: the default mode's sums follow the split, so the bits differ (and the
    values agree to rounding)."""
    one = train(arrays, tmp_path, 1, reproducible=False)
    two = train(arrays, tmp_path, 2, reproducible=False)
    assert one[0][0] != two[0][0]   # from the first step on
    first, second = one[1].params["linear1.weight"], two[1].params["linear1.weight"]
    assert not np.array_equal(first, second)
    np.testing.assert_allclose(first, second, rtol=0, atol=1e-4)


# ------------------------------------------------------------------ CNNs in groups of rows

@pytest.fixture
def small_groups(monkeypatch):
    """Groups of rows from one row a group on (the rule's threshold is 16: training/groups.py),
    so that these small batches train in groups, some of them empty or of one row."""
    monkeypatch.setattr(groups, "GROUP_ROWS", 1)


CNN = "conv6k3p1-bn-maxpool2-flatten-150-10"
GROUP_CASES = {
    "cnn": dict(),
    "float64, dropout": dict(spec="conv4k3p1-bn-drop0.3-maxpool2-flatten-20-drop0.2-10",
                             dtype="float64"),
    "lenet-like, adam": dict(spec="conv4k3-avgpool2-conv6k3-flatten-12-10", optimizer="adam"),
    "accumulation": dict(spec="conv4k3p1-maxpool2-flatten-20-drop0.2-10", accumulate=3),
    "adamw, sharded, clipped": dict(optimizer="adamw", weight_decay=0.01, shard_optimizer=True,
                                    clip_grad_norm=0.05),
    "batchnorm in the head": dict(spec="conv4k3p1-bn-maxpool2-flatten-20-bn-drop0.2-10"),
    "nesterov, overlapped, mpi exchange": dict(nesterov=True, momentum=0.9,
                                               overlap_allreduce=True, exchange="allreduce"),
}


@pytest.mark.parametrize("case", GROUP_CASES)
def test_a_cnn_in_groups_of_rows_gives_the_bits_of_one_process_on_2_3_and_4_ranks(
        arrays, tmp_path, small_groups, case):
    options = {"spec": CNN, "epochs": 1, **GROUP_CASES[case]}
    one = train(arrays, tmp_path, 1, **options)
    for ranks in (2, 3, 4):
        assert_bitwise_equal(one, train(arrays, tmp_path, ranks, **options), ranks)


def test_in_groups_a_cnn_trains_what_the_default_mode_trains_to_rounding(
        arrays, tmp_path, small_groups):
    assert_trains_the_default_to_rounding(
        arrays, tmp_path, 2, spec="conv4k3p1-bn-maxpool2-flatten-20-drop0.2-10", dtype="float64",
        epochs=1)


def test_in_groups_rows_of_odd_sizes_give_the_bits_of_one_process_too(tmp_path, small_groups):
    # 11 x 11 images, 3 filters of 3 x 3: BatchNorm's rows of 3 x 81 values, odd strides in memory
    # (a sum that depended on where its row lies, or on its alignment, would differ)
    arrays = template_arrays(11)
    spec = "conv3k3-bn-drop0.1-maxpool2-flatten-30-10"
    one = train(arrays, tmp_path, 1, spec=spec, epochs=1, batch_size=44)
    for ranks, threads in ((1, 2), (2, 1), (3, 1), (4, 1)):
        assert_bitwise_equal(one, train(arrays, tmp_path, ranks, spec=spec, epochs=1,
                                        batch_size=44, threads=threads), ranks)


def test_in_groups_6_and_8_ranks_and_2_threads_give_the_bits_of_one_thread_too(
        arrays, tmp_path, small_groups):
    one = train(arrays, tmp_path, 1, spec=CNN, batch_size=44, epochs=1, threads=1)
    assert_bitwise_equal(one, train(arrays, tmp_path, 1, spec=CNN, batch_size=44, epochs=1,
                                    threads=2), 1)
    for ranks in (6, 8):
        assert_bitwise_equal(one, train(arrays, tmp_path, ranks, spec=CNN, batch_size=44,
                                        epochs=1), ranks)


def test_in_groups_a_run_stopped_on_2_ranks_and_resumed_on_3_is_the_uninterrupted_run(
        arrays, tmp_path, small_groups):
    one = train(arrays, tmp_path, 1, spec=CNN, epochs=2)
    run_dir = str(tmp_path / "stopped")
    stopped, _, _ = train(arrays, tmp_path, 2, spec=CNN, epochs=2, run_dir=run_dir,
                          callbacks=[SignalAtStep(4)])
    resumed, final, _ = train(arrays, tmp_path, 3, spec=CNN, epochs=2, run_dir=run_dir,
                              resume="auto")
    assert stopped + resumed == one[0]
    assert arrays_of(final) == arrays_of(one[1])


def test_in_groups_profiling_the_layers_changes_nothing(arrays, tmp_path, small_groups):
    # --profile times the model's layers through wrappers of their methods; the groups' copies of a
    # layer must run their own
    one = train(arrays, tmp_path, 2, spec=CNN, epochs=1)
    assert_bitwise_equal(one, train(arrays, tmp_path, 2, spec=CNN, epochs=1, profile=3), 2)


def test_in_groups_each_thread_has_a_track_of_its_trunk_layers(arrays, tmp_path, small_groups):
    """Two group threads: thread 1's replica runs the trunk (convolution, BatchNorm, pooling) on
    its groups, and the timeline shows its layers as a track of their own."""
    one = train(arrays, tmp_path, 1, spec=CNN, epochs=1, threads=2)
    profiled = train(arrays, tmp_path, 1, spec=CNN, epochs=1, threads=2, profile=3,
                     run_dir=str(tmp_path / "profiled"))
    assert_bitwise_equal(one, profiled, 1)
    trace = json.loads((tmp_path / "profiled" / "timeline.json").read_text())
    thread_1 = {e["name"] for e in trace["traceEvents"] if e["ph"] == "X" and e["tid"] == 1}
    assert {"forward conv2d1", "forward batchnorm1", "backward conv2d1"} <= thread_1


def test_a_groups_copy_of_a_layer_runs_its_own_methods_not_a_wrapper_of_the_layers():
    # --profile wraps a layer's bound methods: a copy made for a group while they are wrapped must
    # run on itself, not call the layer it was copied from
    model = Sequential.from_spec(CNN, input_shape=(1, SIDE, SIDE))
    conv = model.layers[0]
    conv.forward = lambda x: pytest.fail("the layer itself ran a group's rows")
    twin = groups._Worker(model, head=len(model.layers))._copy(0, conv, 0)
    assert twin.forward(np.zeros((2, 1, SIDE, SIDE), np.float32)).shape[0] == 2


def test_a_cnn_trains_in_groups_from_4_rows_a_group_on_and_says_so(arrays, tmp_path, capsys):
    # 12 groups: 48 rows are 4 a group (groups), 36 are 3 (the whole batch on every rank)
    for batch, expected in ((48, "in 12 fixed groups"), (36, f"blocks of {BLOCK} columns")):
        ddptrain.train(CNN, arrays, reproducible=True, batch_size=batch, virtual_shards=12,
                       dry_run=True, run_dir=str(tmp_path / f"r{batch}"))
        assert expected in capsys.readouterr().out
    one = train(arrays, tmp_path, 1, spec=CNN, batch_size=48, virtual_shards=12, epochs=2)
    assert_bitwise_equal(one, train(arrays, tmp_path, 3, spec=CNN, batch_size=48,
                                    virtual_shards=12, epochs=2), 3)


@pytest.mark.parametrize("batch", [24, 29, 128])
def test_a_group_lies_on_one_rank_for_every_rank_count_the_shards_allow(batch):
    """Row p of a global batch is in group p % 24; whatever the rank count, and wherever the batch
    begins in its epoch, each rank holds whole groups."""
    n = 24 * 20 + 7
    for ranks in (1, 2, 3, 4, 6, 8, 12, 24):
        plans = [sampler.epoch_plan(n, batch, rank, ranks, seed=0, epoch=0) for rank in
                 range(ranks)]
        for step in range(plans[0].n_steps):
            held = [{group for group, _ in groups.groups_of(plan.positions_in_batch(step), 24)}
                    for plan in plans]
            assert sum(len(groups_held) for groups_held in held) == len(set().union(*held))
            assert len(set().union(*held)) == min(24, plans[0].global_counts[step])


def test_the_memory_estimate_counts_the_groups_or_the_whole_batch(small_data):
    from ddptrain.data.format import inspect
    from ddptrain.run.config import Config
    from ddptrain.run.limits import estimate_rank_bytes
    model = Sequential.from_spec(CNN, input_shape=(1, 8, 8))
    info = inspect(small_data)

    def parts(batch, layers=model.layers, threads=1, **options):   # one of 3 ranks, 12 groups
        return estimate_rank_bytes(layers, Config(model=CNN, batch_size=batch, virtual_shards=12,
                                                  **options), info, 3, threads=threads)

    grads, own = model.params.size * 4, (model.params.size + model.buffers.size) * 4
    blocks = sum(layer.block_bytes() for layer in model.layers)
    # 8 rows a group, 4 groups a rank: a row of gradients each; a replica of the model for the
    # rank's second thread
    plain, grouped = parts(96), parts(96, threads=2, reproducible=True)
    assert (grouped["the model and its optimiser"] - plain["the model and its optimiser"]
            == 4 * grads + own)
    # the convolutions' blocks in groups' sizes (Conv2d.GROUP_CHUNK_BYTES), the rank's own and its
    # replica's
    group_blocks = sum(layer.block_bytes() for layer in groups.with_group_blocks(model.layers))
    assert group_blocks > blocks
    assert grouped["activations"] - plain["activations"] == 2 * group_blocks - blocks

    class OwnLayer(Layer):   # neither rowwise nor sums_over_rows: a copy per group
        def output_shape(self, input_shape):
            return input_shape

        def block_bytes(self):
            return 1000

    layers = [model.layers[0], OwnLayer(), *model.layers[1:]]   # in the trunk
    plain, grouped = parts(96, layers), parts(96, layers, reproducible=True)
    assert grouped["activations"] - plain["activations"] == group_blocks - blocks + 4 * 1000
    # 3 rows a group: the whole batch on every rank, 3 times a rank's share
    plain, whole = parts(36), parts(36, reproducible=True)
    rows = (whole["activations"] - plain["activations"]) / (36 - 12)
    assert rows > 0 and whole["the model and its optimiser"] == plain["the model and its optimiser"]


def test_in_groups_a_failing_thread_stops_the_step_with_its_error_and_the_next_step_works(
        monkeypatch):
    import threading

    from ddptrain.distributed.comm import SerialComm
    from ddptrain.distributed.exchange import Allreduce
    from ddptrain.nn.conv import Conv2d
    from ddptrain.nn.dropout import BatchContext
    from ddptrain.nn.losses import SoftmaxCrossEntropy
    from ddptrain.optim.optimizers import SGD
    from ddptrain.training.step import TrainStep

    model = Sequential.from_spec(CNN, dtype="float64", seed=1, input_shape=(1, SIDE, SIDE))
    step = TrainStep(model, SoftmaxCrossEntropy(), SGD(), Allreduce(SerialComm()),
                     reproducible=True, row_groups=24, group_threads=2)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((48, 1, SIDE, SIDE)), rng.integers(0, 10, 48)
    forward = Conv2d.forward

    def fails_on_the_other_thread(self, value):
        if threading.current_thread().name.startswith("groups"):
            raise ValueError("a layer's own error")
        return forward(self, value)

    monkeypatch.setattr(Conv2d, "forward", fails_on_the_other_thread)
    with pytest.raises(ValueError, match="a layer's own error"):   # not a BrokenBarrierError
        step(x, y, 48, lr=0.1, context=BatchContext(0, 0, np.arange(48)))
    monkeypatch.setattr(Conv2d, "forward", forward)
    totals = step(x, y, 48, lr=0.1, context=BatchContext(0, 1, np.arange(48)))
    assert totals.samples == 48 and np.isfinite(totals.loss_sum)
    step.close()
    assert not any(t.name.startswith("groups") for t in threading.enumerate())


def test_groups_of_sorts_a_ranks_rows_by_group_then_position():
    assert [(group, rows.tolist()) for group, rows in groups.groups_of([1, 3, 5, 25, 27], 24)] \
        == [(1, [0, 3]), (3, [1, 4]), (5, [2])]


# ------------------------------------------------------------------ the blocks of columns


def test_columns_are_cut_into_fixed_blocks_shared_out_in_consecutive_runs():
    assert blocks_of(150, 64) == [(0, 64), (64, 128), (128, 150)]
    assert [owned_range(8, rank, 3) for rank in range(3)] == [(0, 2), (2, 5), (5, 8)]
    assert [owned_range(2, rank, 4) for rank in range(4)] == [(0, 0), (0, 1), (1, 1), (1, 2)]
    split = ColumnSplit(rank=1, size=3, width=64)
    assert split.my_blocks(512) == [(128, 192), (192, 256), (256, 320)]
    assert split.columns_of(512, 1) == (128, 320)


def test_sharing_gives_every_rank_every_ranks_columns():
    rows, n = 5, 200

    def work(comm):
        split = ColumnSplit(comm.rank, comm.size, MessageGather(comm), width=64)
        array = np.full((rows, n), -1.0, dtype=np.float32)
        start, stop = split.columns_of(n, comm.rank)
        array[:, start:stop] = comm.rank   # each rank writes its own columns only
        return split.share(array)

    shared = on_simulated_ranks(3, work)
    expected = np.repeat([[0] * 64 + [1] * 64 + [2] * 72], rows, axis=0)
    for array in shared:
        np.testing.assert_array_equal(array, expected)


def test_a_linear_layer_in_blocks_keeps_the_gradient_of_its_own_columns_only():
    """One owner per gradient value: the others send zeros, so the exchange's sum is exact."""
    rng = np.random.default_rng(0)
    x, dout = rng.standard_normal((6, 10)), rng.standard_normal((6, 150))

    def work(comm):
        model = Sequential.from_spec("10-150", dtype="float64", seed=0)
        model.set_column_split(ColumnSplit(comm.rank, comm.size, MessageGather(comm), width=64))
        out = model.forward(x).copy()
        model.backward(dout)
        return out, model.layers[-1].grads["weight"].copy()

    outs, grads = zip(*on_simulated_ranks(2, work))
    np.testing.assert_array_equal(outs[0], outs[1])   # every rank holds all the columns
    np.testing.assert_array_equal(grads[0][:, 64:], 0)    # rank 0 owns block 0
    np.testing.assert_array_equal(grads[1][:, :64], 0)    # rank 1 blocks 1 and 2
    np.testing.assert_allclose(grads[0] + grads[1], x.T @ dout, rtol=1e-12)


@pytest.mark.parametrize("spec, shares", [
    # forward: the 300 and 140 columns of the first two layers; the last layer's 10 columns are one
    # block, computed by every rank (forward and input gradient); backward: the second layer's
    # input gradient reaches the first layer through a ReLU and dropout, which read each value
    # alone, so each rank keeps the columns it computed: the first layer reads no other
    ("10-300-drop0.2-140-10", 2),
    # BatchNorm's statistics are sums over every column's values: that input gradient goes whole
    ("10-300-bn-140-10", 3),
])
def test_a_rank_gathers_only_the_columns_that_a_layer_below_reads(spec, shares):
    rng = np.random.default_rng(0)
    x, dout = rng.standard_normal((6, 10)), rng.standard_normal((6, 10))

    def gradient(comm=None, split=True):
        model = Sequential.from_spec(spec, dtype="float64", seed=0)
        calls = []

        class Counted(MessageGather):
            def allgather_(self, flat, bounds):
                calls.append(len(flat))
                super().allgather_(flat, bounds)

        if split:
            model.set_column_split(ColumnSplit(comm.rank, comm.size, Counted(comm)) if comm else
                                   ColumnSplit())
        model.set_batch_context(BatchContext(seed=0, step=1, positions=np.arange(6)))
        model.forward(x)
        model.backward(dout)
        return model.grads.copy(), len(calls)

    in_blocks, _ = gradient()
    grads, counts = zip(*on_simulated_ranks(2, gradient))
    assert counts == (shares, shares)
    np.testing.assert_array_equal(grads[0] + grads[1], in_blocks)   # one process's bits
    np.testing.assert_allclose(in_blocks, gradient(split=False)[0], rtol=1e-9, atol=1e-15)


def test_through_the_nodes_memory_each_rank_writes_its_columns_where_the_others_read_them():
    """No copy in or out: a layer's output is a buffer of the gather, whose other columns the other
    ranks wrote; the layer after it does not write over it; and the bits are those of the gather
    through MPI."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 10))

    def forward(comm, way):
        model = Sequential.from_spec("10-300-bn-140-10", dtype="float64", seed=0)
        gather = (NodeGather(comm.split_by_node()[0]) if way == "node memory"
                  else MessageGather(comm))
        buffers, outputs, arrays = [], {}, {}
        handed = gather.buffer
        gather.buffer = lambda *args: buffers.append(handed(*args)) or buffers[-1]

        def observe(kind, layer, array):
            outputs[layer.name], arrays[layer.name] = array.copy(), array

        model.observer = observe
        model.set_column_split(ColumnSplit(comm.rank, comm.size, gather, width=64))
        model.forward(x)
        in_buffer = any(np.shares_memory(arrays["linear1"], buffer) for buffer in buffers)
        # the layers after an output in shared memory do not write over it: the BatchNorm centres
        # a copy, the ReLU writes its own array; through MPI, each rank's output is its own
        in_place = way == "messages"
        assert model.layers[2].in_place == in_place and model.layers[5].in_place == in_place
        if not in_place:   # left alone
            assert outputs["linear1"].tobytes() == arrays["linear1"].tobytes()
        gather.close()
        return outputs, in_buffer

    node = on_simulated_ranks(2, lambda comm: forward(comm, "node memory"))
    messages = on_simulated_ranks(2, lambda comm: forward(comm, "messages"))
    assert [in_buffer for _, in_buffer in node] == [True, True]
    assert [in_buffer for _, in_buffer in messages] == [False, False]
    for (got, _), (want, _) in zip(node + messages, messages + messages):
        assert got.keys() == want.keys()
        for name in got:
            np.testing.assert_array_equal(got[name], want[name])


class NegativeZeroShift(Layer):
    """``y = x + shift`` whose gradient is ``-0.0`` (as an element-wise product like ``-0.0 * 1.0``
    makes): a whole-batch layer, owned by rank 0."""

    def param_shapes(self):
        return {"shift": (3,)}

    def forward(self, x):
        return x + self.params["shift"]

    def backward(self, dout, need_input_grad=True):
        self.grads["shift"][...] = -0.0
        return dout


def test_a_negative_zero_gradient_keeps_its_bits_in_one_process_as_through_the_sum_over_ranks():
    def gradient(comm=None):
        model = Sequential([Linear(2, 3), NegativeZeroShift()], dtype="float64", seed=0)
        model.set_column_split(ColumnSplit(comm.rank, comm.size, MessageGather(comm), width=1)
                               if comm else ColumnSplit())
        model.forward(np.ones((1, 2)))
        model.backward(np.array([[-0.0, 0.0, 1.0]]))
        return model.grads.copy()

    alone = gradient()
    assert np.signbit(alone).any()   # one process keeps its -0.0
    for ranks in (2, 3):
        shares = on_simulated_ranks(ranks, gradient)
        for order in (shares, shares[::-1]):   # what an exchange adds up, in any order
            summed = order[0].copy()
            for share in order[1:]:
                summed += share
            np.testing.assert_array_equal(summed.view(np.uint64), alone.view(np.uint64))


# ------------------------------------------------------------------ what the mode refuses


@pytest.mark.parametrize("options, named", [
    (dict(batchnorm="local"), "--batchnorm local"),
    (dict(gemm="mkl"), "--gemm mkl"),
])
def test_options_that_break_the_promise_are_refused_in_one_line(arrays, options, named):
    with pytest.raises(UserError, match=f"--reproducible with {named}"):
        ddptrain.train("64-10", arrays, reproducible=True, dry_run=True, quiet=True, **options)


def test_the_start_up_line_says_the_mode_is_on(arrays, tmp_path, capsys):
    threads = threading.active_count()
    ddptrain.train("64-10", arrays, reproducible=True, dry_run=True, run_dir=str(tmp_path / "r"))
    out = capsys.readouterr().out
    assert "reproducible: the bits of one process on any number of ranks" in out
    assert f"blocks of {BLOCK} columns" in out
    # and the threads of its products stop with the run, a dry run too (with threads alive, a
    # later run would check its data file in a new process rather than a fork: data/readable.py)
    assert threading.active_count() == threads
