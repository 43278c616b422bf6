"""Streamed shards (--data-memory): the order of the rows, a pure function that P ranks share with
one process; runs that stream train what they should, resume where they stopped, fail in one line,
and leave no thread behind.

The data: 480 training rows of 8x8 images chunked by 4 rows, so that each of
the 24 virtual shards (20 rows) spans 5 or 6 blocks; a rank holds 2 windows
of each of its shards, ``24 / P * 2 * blocks * 4`` rows of 72 bytes (64
pixels, an int64 label).
"""

import json
import subprocess
import sys
import threading
import time

import h5py
import numpy as np
import pytest

import ddptrain
import helpers
from ddptrain.data import sampler
from ddptrain.data.format import read_rows
from ddptrain.data.stream import FileRows, WindowStream
from ddptrain.data.stream_order import (
    StreamedEpochPlan,
    StreamLayout,
    StreamOrder,
    min_window_blocks,
    shard_blocks,
    streamed_epoch_plan,
)
from ddptrain.data.writer import write_dataset
from ddptrain.distributed.comm import SerialComm
from ddptrain.errors import CheckpointError, DataError, NumericalError
from ddptrain.nn.model import Sequential
from ddptrain.run import checkpoint as ckpt_io, limits, preflight
from ddptrain.run.data_memory import DataPlan, parse_size
from ddptrain.training.batches import ReadSplit, Split
from ddptrain.training.evaluation import evaluate
from ddptrain.training.trainer import Callback
from helpers import in_process, make_chunked_dataset, model_spec

CHUNK, ROW = 4, 8 * 8 + 8
OPTIONS = dict(epochs=2, batch_size=32, lr=0.1, dtype="float64", seed=5, quiet=True)


def window_memory(blocks, ranks=1):
    """What each of ``ranks`` ranks holds with windows of ``blocks`` blocks: --data-memory for
    them."""
    return 24 // ranks * 2 * blocks * CHUNK * ROW


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_chunked_dataset(tmp_path_factory.mktemp("stream") / "chunked.h5", chunk_rows=CHUNK)


def stream_threads():
    return [t for t in threading.enumerate() if t.name == "ddptrain-stream" and t.is_alive()]


def train(data, run_dir, **options):
    return ddptrain.train(model_spec(), data=data, run_dir=str(run_dir), **{**OPTIONS, **options})


# -- --data-memory SIZE ----------------------------------------------------------------------------


@pytest.mark.parametrize("text,size", [
    ("64M", 64 * 2 ** 20), ("64m", 64 * 2 ** 20), ("512MiB", 512 * 2 ** 20), ("2G", 2 * 2 ** 30),
    ("1.5G", 3 * 2 ** 29), ("2 GiB", 2 * 2 ** 30), ("100K", 102400), ("1T", 2 ** 40),
    ("100KB", 100_000), ("3MB", 3_000_000), ("2GB", 2 * 10 ** 9), ("1024", 1024), ("1024B", 1024)])
def test_sizes_are_powers_of_1024_with_k_m_g_t_and_kib_and_of_1000_with_kb_mb_gb_tb(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["12Q", "-5M", "M", "", "1e9", "five", "64 M B", "0x10"])
def test_anything_else_is_not_a_size(text):
    with pytest.raises(ValueError, match="a size such as 64M, 512MiB or 2G"):
        parse_size(text)


@pytest.mark.parametrize("bad", ["12Q", "-5M", "lots"])
def test_a_bad_size_is_refused_in_one_line_before_anything_runs(data, tmp_path, capsys, bad):
    status, lines = in_process(["--data", data, "--model", model_spec(), "--dry-run",
                                f"--data-memory={bad}"], capsys)
    assert status == 2 and len(lines) == 1
    assert lines[0].startswith("ddptrain: error: argument --data-memory: must be a size such as")


def test_a_configuration_file_and_the_python_api_take_a_size_or_bytes(data, tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text('data-memory = "13.5K"\nbatch-size = 32\n')
    status, _ = in_process(["--data", data, "--model", model_spec(), "--dry-run", "--config",
                            toml, "--run-dir", tmp_path / "a"], capsys)
    assert status == 0
    toml.write_text("data-memory = [1]\n")
    status, lines = in_process(["--data", data, "--dry-run", "--config", toml], capsys)
    assert status == 2 and "--data-memory must be a size such as" in lines[0]
    for size in ("13.5K", 13824):
        result = train(data, tmp_path / f"api-{size}", data_memory=size, epochs=1)
        saved = json.loads((tmp_path / f"api-{size}" / "config.json").read_text())
        assert result.exit_status == 0 and saved["data_memory"] == 13824
    with pytest.raises(ddptrain.UserError, match="--data-memory must be a size"):
        train(data, tmp_path / "bad", data_memory="lots")


def test_a_window_smaller_than_a_step_needs_is_refused_with_the_minimum(data, tmp_path, capsys):
    status, lines = in_process(["--data", data, "--model", model_spec(), "--dry-run",
                                "--batch-size", 32, "--data-memory", window_memory(1) - 1], capsys)
    assert status == 2 and len(lines) == 1
    assert lines[0] == ("ddptrain: error: --data-memory 13.5 KiB is too small for --batch-size "
                        "32 on 1 rank(s): each rank streams its 24 virtual shards through 2 "
                        "windows each, of at least 1 block of 4 rows (a block of the file's "
                        "chunks): 13.5 KiB at least (--data-memory 14K)")


# -- the order: a pure function of (seed, epoch, step), whatever P ---------------------------------

CASES = [(480, 32, 4, 1), (480, 96, 4, 3), (1003, 64, 16, 2), (5000, 240, 37, 2), (2400, 24, 8, 5)]


def step_rows(plans, step):
    return np.sort(np.concatenate([p.global_rows[p.step_bounds[step]:p.step_bounds[step + 1]]
                                   for p in plans]))


@pytest.mark.parametrize("ranks", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("n,batch,chunk,window", CASES)
def test_p_ranks_stream_the_global_batches_of_one_process(n, batch, chunk, window, ranks):
    order = StreamOrder(window, chunk)
    one = streamed_epoch_plan(n, batch, 0, 1, 7, 3, 24, False, order)
    mine = [streamed_epoch_plan(n, batch, r, ranks, 7, 3, 24, False, order) for r in range(ranks)]
    for step in range(one.n_steps):
        assert np.array_equal(step_rows(mine, step), step_rows([one], step)), step
        # and in the same place of the global batch: the dropout masks and ranks' shares agree
        positions = np.concatenate([p.positions_in_batch(step) for p in mine])
        rows = np.concatenate([p.global_rows[p.step_bounds[step]:p.step_bounds[step + 1]]
                               for p in mine])
        ordered = one.global_rows[one.step_bounds[step]:one.step_bounds[step + 1]]
        assert np.array_equal(rows[np.argsort(positions)], ordered)


@pytest.mark.parametrize("n,batch,chunk,window", CASES)
@pytest.mark.parametrize("drop_last", [False, True])
def test_an_epoch_trains_each_row_once_and_each_rank_only_rows_of_its_shards(
        n, batch, chunk, window, drop_last):
    plans = [streamed_epoch_plan(n, batch, r, 3, 1, 0, 24, drop_last, StreamOrder(window, chunk))
             for r in range(3)]
    rows = np.concatenate([p.global_rows for p in plans])
    assert len(np.unique(rows)) == len(rows)
    assert len(rows) == (n // batch * batch if drop_last else n)
    for rank, plan in enumerate(plans):
        owned = np.concatenate([np.arange(a, b) for a, b in sampler.owned_blocks(n, rank, 3)])
        assert np.isin(plan.global_rows, owned).all()


@pytest.mark.parametrize("n,batch,chunk,window", CASES)
def test_windows_are_whole_chunks_and_a_step_takes_rows_of_two_windows_of_a_shard_at_most(
        n, batch, chunk, window):
    for epoch in range(20):
        plan = streamed_epoch_plan(n, batch, 0, 1, 0, epoch, 24, False, StreamOrder(window, chunk))
        for windows in plan.windows:
            for blocks in windows.blocks:
                assert len(blocks) <= window
                # a block is one chunk of the file, or the part of one in this shard
                assert all(a // chunk == (b - 1) // chunk for a, b in blocks)
        spans = plan.last_window - plan.first_window[:-1]
        assert spans.max() <= 1


def test_the_smallest_window_is_the_one_that_keeps_a_step_within_two():
    # 100-row shards of 8-row chunks: 12 full blocks and partial ones of 4 rows (or 100 = 8 * 12 +
    # 4); a step takes 20 rows of a shard, so a middle window needs 19: 3 blocks of 8, or 2 of 8
    # and the partial 4 (20); 2 blocks may be the partial ones, 4 + 4 rows
    assert min_window_blocks(2400, 480, 24, 8) == 3
    assert min_window_blocks(2400, 24, 24, 8) == 1    # a row of each shard per step
    assert min_window_blocks(480, 32, 24, 4) == 1
    for epoch in range(10):
        streamed_epoch_plan(2400, 480, 0, 1, 0, epoch, 24, False, StreamOrder(3, 8))
    with pytest.raises(AssertionError, match="a step spans more than two windows"):
        streamed_epoch_plan(2400, 480, 0, 1, 0, 0, 24, False, StreamOrder(2, 8))


def test_with_one_window_a_shard_the_streamed_order_is_the_in_memory_order():
    for n, batch, ranks in [(1003, 64, 3), (480, 32, 2), (60000, 512, 4)]:
        for rank in range(ranks):
            memory = sampler.epoch_plan(n, batch, rank, ranks, 11, 2)
            streamed = streamed_epoch_plan(n, batch, rank, ranks, 11, 2, 24, False,
                                           StreamOrder(10 ** 6, 16))
            assert np.array_equal(memory.global_rows, streamed.global_rows)


def test_the_order_is_fixed_by_the_seed_and_the_epoch_and_is_not_a_full_permutation():
    def rows(seed, epoch):
        return streamed_epoch_plan(2400, 96, 0, 1, seed, epoch, 24, False,
                                   StreamOrder(2, 8)).global_rows

    assert np.array_equal(rows(1, 4), rows(1, 4))
    assert not np.array_equal(rows(1, 4), rows(1, 5))
    assert not np.array_equal(rows(1, 4), rows(2, 4))
    # a window shuffle: the first 16 rows of a shard in the epoch come from its first window, two
    # blocks, where a full permutation would draw them from all of the shard's 100 rows
    first = rows(1, 4)[::24][:16]
    assert len(np.unique(first // 8)) <= 2


# -- training on streamed rows ---------------------------------------------------------------------


def test_streamed_runs_on_p_ranks_train_the_parameters_of_one_process_with_the_same_p_x_memory(
        data, tmp_path):
    one = train(data, tmp_path / "one", data_memory=window_memory(2))
    reference = helpers.final_params(tmp_path / "one")
    for ranks in (2, 3):
        result = train(data, tmp_path / f"p{ranks}", data_memory=window_memory(2, ranks),
                       simulate_ranks=ranks)
        assert helpers.relative_error(helpers.final_params(tmp_path / f"p{ranks}"),
                                      reference) < 1e-12
        assert [r["train_accuracy"] for r in result.metrics] == [
            r["train_accuracy"] for r in one.metrics]
    saved = ckpt_io.newest_valid(tmp_path / "one" / "checkpoints")
    assert saved.state["data_order"] == {"window_blocks": 2, "block_rows": CHUNK}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_stream_with_one_window_a_shard_trains_the_in_memory_run_bit_for_bit(
        data, tmp_path, monkeypatch, dtype):
    """The stream's rows and order, through the reading thread and the buffer: exactly the rows
    that the in-memory path gathers."""
    train(data, tmp_path / "memory", dtype=dtype)
    whole = DataPlan(StreamOrder(10 ** 6, CHUNK), None, True)
    monkeypatch.setattr(preflight, "plan_data", lambda *args: whole)
    train(data, tmp_path / "streamed", dtype=dtype)
    assert "data_order" in ckpt_io.newest_valid(tmp_path / "streamed" / "checkpoints").state
    np.testing.assert_array_equal(helpers.final_params(tmp_path / "streamed"),
                                  helpers.final_params(tmp_path / "memory"))
    assert (helpers.metrics_records(tmp_path / "streamed")[-1]["test_loss"]
            == helpers.metrics_records(tmp_path / "memory")[-1]["test_loss"])


def test_data_that_fits_its_data_memory_stays_in_memory_in_the_sampler_order(data, tmp_path):
    train(data, tmp_path / "memory")
    result = train(data, tmp_path / "fits", data_memory=480 * ROW, quiet=False)
    assert result.exit_status == 0
    np.testing.assert_array_equal(helpers.final_params(tmp_path / "fits"),
                                  helpers.final_params(tmp_path / "memory"))
    assert "data_order" not in ckpt_io.newest_valid(tmp_path / "fits" / "checkpoints").state


def test_a_resumed_streamed_run_lands_on_the_same_rows_on_any_number_of_ranks(data, tmp_path):
    memory = window_memory(2)
    train(data, tmp_path / "straight", data_memory=memory, epochs=3, checkpoint_every=7, keep=20)
    straight = helpers.final_params(tmp_path / "straight")
    middle = ckpt_io.step_path(tmp_path / "straight" / "checkpoints", 21)   # step 6 of epoch 2
    train(data, tmp_path / "same", data_memory=memory, epochs=3, resume=str(middle))
    np.testing.assert_array_equal(helpers.final_params(tmp_path / "same"), straight)
    # on 2 ranks with room for larger windows: the checkpoint's windows, not the larger ones
    train(data, tmp_path / "two", data_memory=memory, epochs=3, resume=str(middle),
          simulate_ranks=2)
    assert helpers.relative_error(helpers.final_params(tmp_path / "two"), straight) < 1e-12
    with pytest.raises(CheckpointError, match=(
            r"checkpoint was trained on rows streamed through windows of 2 block\(s\) of 4 rows; "
            r"resuming it on 2 rank\(s\) needs 13.5 KiB per rank for them: resume with "
            r"--data-memory 14K \(or on more ranks\)")):
        train(data, tmp_path / "small", data_memory=window_memory(1, 2), epochs=3,
              resume=str(middle), simulate_ranks=2)


def test_a_shard_that_does_not_fit_the_memory_limits_finds_is_streamed_saying_so(
        data, tmp_path, monkeypatch, capsys):
    from ddptrain.nn.spec import parse_spec
    from ddptrain.run.config import Config
    info = ddptrain.data.format.inspect(data)
    layers = parse_spec(model_spec()).layers(info.image_shape)
    parts = limits.estimate_rank_bytes(layers, Config(model=model_spec(), **{
        k: v for k, v in OPTIONS.items() if k != "quiet"}), info, 1)
    beside = sum(parts.values()) - parts["this rank's data"]
    # room for 30,000 bytes of data beside the model: not the 38,880 of the shard and test rows in
    # memory; less a chunk of test rows (4,320), 16 KiB for windows of 1 block (13.5 KiB)
    monkeypatch.setattr(limits, "available_memory", lambda: (beside + 30_000) / limits.MEMORY_SHARE)
    result = train(data, tmp_path / "auto", quiet=False)
    out = capsys.readouterr().out
    assert result.exit_status == 0
    assert ("data: this rank's data (38 KiB) does not fit the memory this host has left for it: "
            "streamed (--data-memory 16K keeps these batches); each rank holds 2 windows of 1 "
            "block(s) of 4 rows") in out
    saved = ckpt_io.newest_valid(tmp_path / "auto" / "checkpoints")
    assert saved.state["data_order"] == {"window_blocks": 1, "block_rows": CHUNK}



class RaiseAtStep(Callback):
    def on_step_end(self, trainer, end):
        if trainer.position.step == 4:
            raise RuntimeError("a callback failed")


@pytest.mark.parametrize("way_out", ["finished", "signal", "nan", "early stop", "exception"])
def test_the_reading_thread_stops_on_every_way_out_of_training(data, tmp_path, way_out):
    options = {"finished": {}, "signal": {"callbacks": [helpers.SignalAtStep(5)]},
               "nan": {"lr": 1e30, "dtype": "float32"},
               "early stop": {"epochs": 6, "early_stop": 1, "early_stop_min_delta": 10.0},
               "exception": {"callbacks": [RaiseAtStep()]}}[way_out]
    expected = {"nan": NumericalError, "exception": RuntimeError}.get(way_out)
    if expected:
        with pytest.raises(expected):
            train(data, tmp_path / "run", data_memory=window_memory(1), **options)
    else:
        result = train(data, tmp_path / "run", data_memory=window_memory(1), **options)
        assert result.exit_status == (3 if way_out == "signal" else 0)
        assert result.stopped_early == (way_out == "early stop")
    assert stream_threads() == []


def damage_a_training_chunk(path, tmp_path):
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(open(path, "rb").read())
    with h5py.File(damaged, "r") as f:
        offset = f["train/images"].id.get_chunk_info(70).byte_offset   # rows 280-283: shard 14
    helpers.flip_byte_at(damaged, offset + 2)
    return str(damaged)


def test_a_damaged_chunk_is_the_one_line_data_error_of_the_in_memory_path(data, tmp_path):
    damaged = damage_a_training_chunk(data, tmp_path)
    with pytest.raises(DataError) as in_memory:
        train(damaged, tmp_path / "memory")
    with pytest.raises(DataError) as streamed:
        train(damaged, tmp_path / "streamed", data_memory=window_memory(1))
    assert str(streamed.value) == str(in_memory.value)
    assert str(streamed.value).startswith(f"{damaged}: damaged: a checksum does not match "
                                          "(cannot read 'train' rows:")
    assert "\n" not in str(streamed.value) and stream_threads() == []


def test_a_rank_holds_no_more_than_its_data_memory(data):
    info = ddptrain.data.format.inspect(data)
    for ranks, blocks in [(1, 1), (2, 1), (3, 2), (4, 3), (8, 5)]:
        order = StreamOrder(blocks, CHUNK)
        for rank in range(ranks):
            layout = StreamLayout(480, 32, rank, ranks, 0, 24, False, order)
            stream = WindowStream(layout, FileRows(data, "train"), info.image_shape, np.uint8, 1)
            assert stream.images.nbytes + stream.labels.nbytes <= window_memory(blocks, ranks)


def test_evaluation_reads_the_test_rows_a_chunk_at_a_time_and_gives_the_in_memory_result(data):
    info = ddptrain.data.format.inspect(data)
    model = Sequential.from_spec(model_spec(), dtype=np.float64, seed=1)
    x, y = read_rows(data, "test", [(0, info.n_test)], dtype=np.uint8)
    in_memory = evaluate(model, SerialComm(), Split(x, y, np.float64), 10, chunk=16)
    read = evaluate(model, SerialComm(), ReadSplit(info, "test", 0, info.n_test, np.float64,
                                                   model.as_input), 10, chunk=16)
    assert (read.loss, read.accuracy) == (in_memory.loss, in_memory.accuracy)
    np.testing.assert_array_equal(read.confusion, in_memory.confusion)


def test_blocks_are_cut_at_the_chunk_boundaries_of_the_file():
    assert shard_blocks(10, 30, 8).tolist() == [[10, 16], [16, 24], [24, 30]]
    assert shard_blocks(16, 24, 8).tolist() == [[16, 24]]


def test_the_stream_gives_each_step_the_rows_of_the_file_that_the_order_names(data):
    x, y = read_rows(data, "train", [(0, 480)], dtype=np.uint8)
    for ranks in (1, 3):
        for rank in range(ranks):
            layout = StreamLayout(480, 32, rank, ranks, 5, 24, False, StreamOrder(1, CHUNK))
            with WindowStream(layout, FileRows(data, "train"), (8, 8), np.uint8, 3) as stream:
                for epoch in range(3):
                    plan = StreamedEpochPlan(layout, epoch)
                    for step in range(plan.n_steps):
                        stream.wait_for(plan, step)
                        rows = plan.global_rows[plan.step_bounds[step]:plan.step_bounds[step + 1]]
                        np.testing.assert_array_equal(stream.images[plan.local_batch(step)],
                                                      x[rows])
                        np.testing.assert_array_equal(stream.labels[plan.local_batch(step)],
                                                      y[rows])
                        stream.done_with(plan, step)
            # every epoch's rows read once: whole blocks, no row twice
            assert stream.bytes_read == 3 * len(plan.global_rows) * 64


def test_the_thread_reads_the_next_window_of_each_shard_while_the_step_runs(data):
    layout = StreamLayout(480, 32, 0, 1, 5, 24, False, StreamOrder(1, CHUNK))
    plan = StreamedEpochPlan(layout, 0)
    first_two = sum(int(w.cum[min(2, w.count)]) for w in plan.windows) * 64
    with WindowStream(layout, FileRows(data, "train"), (8, 8), np.uint8, 1) as stream:
        stream.wait_for(plan, 0)
        stream.done_with(plan, 0)
        deadline = time.monotonic() + 10
        while stream.bytes_read < first_two and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        # read ahead: the window after the one step 1 trains on, in every shard; and no further,
        # each shard's two slots being full
        assert stream.bytes_read == first_two


# -- under mpiexec ---------------------------------------------------------------------------------

LIMIT, OVERHEAD = 32 * 2 ** 20, 32 * 2 ** 20
LARGE_ROWS = 24 * 341 * 10   # 3x32x32 images: 341 rows a chunk, 10 chunks a virtual shard


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """240 MiB of training rows, 7.5 times the --data-memory of the 2 ranks together."""
    rng = np.random.default_rng(0)
    images = np.frombuffer(rng.bytes(LARGE_ROWS * 3072), np.uint8).reshape(-1, 3, 32, 32)
    labels = rng.integers(0, 10, LARGE_ROWS)
    path = tmp_path_factory.mktemp("large") / "large.h5"
    write_dataset(path, images, labels, images[:1000], labels[:1000])
    return str(path)


def peaks(data, tmp_path, data_memory):
    """Each rank's peak resident memory above what it held before training, in bytes."""
    out = tmp_path / f"peaks-{data_memory}"
    out.mkdir()
    proc = subprocess.run(
        [*helpers.mpiexec(2), sys.executable, str(helpers.ROOT / "tests" /
                                                                  "memory_job.py"),
         data, str(tmp_path / f"run-{data_memory}"), str(out), data_memory],
        capture_output=True, text=True, timeout=120, env=helpers.clean_env(), cwd=helpers.ROOT)
    assert proc.returncode == 0, proc.stderr
    reports = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]
    return [report["peak"] - report["before"] for report in reports]


@pytest.mark.slow
def test_each_rank_of_a_streamed_run_holds_its_model_its_data_memory_and_a_stated_overhead(
        large, tmp_path):
    """The overhead: the batch and evaluation arrays (12 MB here), HDF5's chunk caches, MPI's
    buffers and what Python allocates as it runs; a rank that held its shard, 120 MiB, would pass
    the bound by far."""
    model = 4 * (3072 * 16 + 16 + 16 * 10 + 10) * 4   # parameters, gradients, momentum, scratch
    bound = model + LIMIT + OVERHEAD
    assert all(peak <= bound for peak in peaks(large, tmp_path, "32M"))
    assert all(peak > bound for peak in peaks(large, tmp_path, "0"))


@pytest.mark.slow
def test_a_damaged_chunk_under_mpiexec_ends_the_job_in_the_in_memory_path_s_one_line(
        data, tmp_path):
    damaged = damage_a_training_chunk(data, tmp_path)   # a chunk of shard 14: rank 0's of 2
    lines = {}
    for how, extra in (("memory", []), ("streamed", ["--data-memory", window_memory(1, 2)])):
        proc = helpers.run(["--data", damaged, "--model", model_spec(), "--batch-size", 32,
                            "--epochs", 1, "--run-dir", tmp_path / how, *extra], ranks=2,
                           timeout=60)
        assert proc.returncode == 2, proc.stderr
        lines[how] = [line for line in helpers.error_lines(proc.stderr)
                      if line.startswith("ddptrain: error")]
    assert lines["streamed"] == lines["memory"]
    assert lines["memory"][0].startswith(f"ddptrain: error on rank 0 of 2: {damaged}: damaged: a "
                                         "checksum does not match (cannot read 'train' rows:")
