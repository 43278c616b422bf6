"""Checkpoints: what they hold, that they cannot be half-written, that damage is caught before HDF5
reads a byte, and how often they are written and how many are kept."""

import errno
import hashlib
import json
import os

import h5py
import numpy as np
import pytest

from ddptrain import durable
from ddptrain.distributed.comm import SerialComm
from ddptrain.errors import CheckpointError
from ddptrain.nn.model import Sequential
from ddptrain.run import checkpoint as ckpt_io
from ddptrain.run.checkpoint import Checkpoint
from ddptrain.run.config import Config
from ddptrain.run.runner import run_training
from helpers import flip_a_byte_of, flip_byte_at, model_spec

STEPS_PER_EPOCH = 15     # the 240 training rows of small_data in global batches of 16


def sample_checkpoint(seed=0, step=7):
    rng = np.random.default_rng(seed)
    model = Sequential.from_spec("64-16-bn-10")

    def random_like(arrays):
        return {name: rng.standard_normal(array.shape).astype(np.float32) for name, array in arrays}

    return Checkpoint(
        params=random_like(model.named_params()), buffers=random_like(model.named_buffers()),
        optimizer={"type": "SGD", "steps": step,
                   "velocity": rng.standard_normal(model.params.size).astype(np.float32)},
        state={"epoch": 0, "step_in_epoch": step, "step": step,
               "train_sums": {"loss_sum": 1.5, "correct": 3, "samples": 16}, "n_train": 240,
               "best_accuracy": -1.0, "world_size": 2},
        config={"model": "64-16-bn-10", "seed": seed},
        metrics=[{"epoch": 1, "test_accuracy": 0.5}], model=model.describe(),
        model_summary="64-16-bn-10", dtype="float32")


def assert_same(loaded, saved):
    for group in ("params", "buffers"):
        mine, theirs = getattr(loaded, group), getattr(saved, group)
        assert sorted(mine) == sorted(theirs)
        for name, array in theirs.items():
            assert mine[name].dtype == array.dtype and np.array_equal(mine[name], array)
    assert sorted(loaded.optimizer) == sorted(saved.optimizer)
    for name, value in saved.optimizer.items():
        assert np.array_equal(loaded.optimizer[name], value) if isinstance(value, np.ndarray) else \
            loaded.optimizer[name] == value
    assert (loaded.state, loaded.config, loaded.metrics) == (saved.state, saved.config,
                                                             saved.metrics)
    assert (loaded.model, loaded.model_summary, loaded.dtype) == (saved.model, saved.model_summary,
                                                                  saved.dtype)


def leftovers(folder):
    return [name for name in os.listdir(folder) if ".tmp" in name]


# ---------------------------------------------------------------- the file


def test_a_saved_checkpoint_loads_back_bitwise_identical(tmp_path):
    saved = sample_checkpoint()
    ckpt_io.save(tmp_path / "step-00000007.h5", saved)
    assert_same(ckpt_io.load(tmp_path / "step-00000007.h5"), saved)


def test_a_checkpoint_begins_with_the_sha256_and_length_of_the_rest_of_the_file(tmp_path):
    ckpt_io.save(tmp_path / "c.h5", sample_checkpoint())
    content = (tmp_path / "c.h5").read_bytes()
    rest = content[ckpt_io.HEADER_SIZE:]
    assert content[:ckpt_io.HEADER_SIZE].rstrip(b"\0") == (
        f"ddptrain checkpoint\nformat 2\nsha256 {hashlib.sha256(rest).hexdigest()}\nbytes "
        f"{len(rest)}\n".encode())
    assert rest.startswith(b"\x89HDF\r\n\x1a\n")            # HDF5 right after its user block


def test_a_checkpoint_is_an_ordinary_hdf5_file_with_every_array_under_its_own_name(tmp_path):
    saved = sample_checkpoint()
    ckpt_io.save(tmp_path / "c.h5", saved)
    # h5py, h5dump and HDFView skip the user block
    with h5py.File(tmp_path / "c.h5", "r") as f:
        assert sorted(f["params"]) == sorted(saved.params)
        assert list(f["buffers"]) == ["batchnorm1.running_mean", "batchnorm1.running_var"]
        assert list(f["optimizer"]) == ["velocity"]
        assert json.loads(f.attrs["optimizer"]) == {"type": "SGD", "steps": 7}
        assert json.loads(f.attrs["model"])[1] == {"name": "linear1", "type": "Linear",
                                                   "args": {"n_in": 64, "n_out": 16, "init": "he",
                                                            "bias": False}}   # bn shifts


def test_save_writes_through_a_temporary_file_and_leaves_none_behind(tmp_path, monkeypatch):
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(ckpt_io.os, "replace",
                        lambda a, b: (renames.append((a, b)), real_replace(a, b)))
    ckpt_io.save(tmp_path / "c.h5", sample_checkpoint())
    [(source, target)] = renames
    assert os.path.dirname(source) == str(tmp_path) and str(target) == str(tmp_path / "c.h5")
    assert leftovers(tmp_path) == []


def test_a_write_that_fails_before_the_rename_leaves_the_previous_checkpoint_intact(
        tmp_path, monkeypatch):
    previous = sample_checkpoint(seed=1)
    ckpt_io.save(tmp_path / "c.h5", previous)

    def disk_full(path):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(durable, "fsync_file", disk_full)   # after the temporary file is written
    with pytest.raises(OSError):
        ckpt_io.save(tmp_path / "c.h5", sample_checkpoint(seed=2))
    assert_same(ckpt_io.load(tmp_path / "c.h5"), previous)
    assert leftovers(tmp_path) == []


def test_a_corrupted_byte_in_the_data_is_caught_by_the_checksum(tmp_path):
    ckpt_io.save(tmp_path / "c.h5", sample_checkpoint())
    flip_a_byte_of(tmp_path / "c.h5")
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        ckpt_io.load(tmp_path / "c.h5")


@pytest.mark.parametrize("change", ["attribute", "datatype"])
def test_changed_metadata_is_refused_before_hdf5_reads_it(tmp_path, monkeypatch, change):
    """An edited attribute, or the flipped bit that turns float32 into uint32 (the values
    unchanged)."""
    path = tmp_path / "c.h5"
    ckpt_io.save(path, sample_checkpoint())
    content = path.read_bytes()
    if change == "attribute":
        at = content.index(b'"step": 7', ckpt_io.HEADER_SIZE) + len(b'"step": ')
        flip_byte_at(path, at, mask=ord("7") ^ ord("8"))   # the position says step 8
    else:
        # The float32 datatype message: version 1, class 1 (floating point), IEEE little-endian, 4
        # bytes.
        at = content.index(bytes([0x11, 0x20, 0x1f, 0x00, 0x04, 0x00, 0x00, 0x00]),
                           ckpt_io.HEADER_SIZE)
        flip_byte_at(path, at, mask=0x01)   # class 0: an integer of the same size
    opened = []
    monkeypatch.setattr(ckpt_io.h5py, "File", lambda *a, **k: opened.append(a))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        ckpt_io.load(path)
    assert opened == []                     # refused before HDF5 saw a byte


def test_a_file_rewritten_by_hdf5_itself_is_refused(tmp_path):
    """h5py keeps the user block when it edits a file: the old header no longer matches what
    follows."""
    ckpt_io.save(tmp_path / "c.h5", sample_checkpoint())
    with h5py.File(tmp_path / "c.h5", "a") as f:
        f.attrs["state"] = json.dumps({**json.loads(f.attrs["state"]), "step": 8})
    with pytest.raises(CheckpointError, match="c.h5: (checksum mismatch|truncated or extended)"):
        ckpt_io.load(tmp_path / "c.h5")


def test_a_truncated_checkpoint_is_refused(tmp_path):
    ckpt_io.save(tmp_path / "c.h5", sample_checkpoint())
    size = os.path.getsize(tmp_path / "c.h5")
    os.truncate(tmp_path / "c.h5", size // 2)
    with pytest.raises(CheckpointError, match=f"truncated or extended checkpoint: {size // 2} "
                                              f"bytes, its header says {size}"):
        ckpt_io.load(tmp_path / "c.h5")


def test_an_hdf5_file_that_is_not_a_checkpoint_is_refused(small_data):
    with pytest.raises(CheckpointError, match="not a ddptrain checkpoint"):
        ckpt_io.load(small_data)


def test_a_format_1_checkpoint_of_ddptrain_0_1_is_refused_with_the_reason(tmp_path):
    with h5py.File(tmp_path / "old.h5", "w") as f:     # the layout ddptrain 0.1 wrote
        f.create_group("params").create_dataset("0.weight", data=np.zeros((64, 16), np.float32))
        f.attrs.update({"format": "ddptrain-checkpoint", "format_version": 1, "sha256": "0" * 64})
    with pytest.raises(CheckpointError, match=r"old.h5: not a ddptrain checkpoint: an HDF5 file "
                                              r"without the verified header of format 2 "
                                              r"\(checkpoints of ddptrain 0.1, format 1, cannot be "
                                              r"checked before they are read and are not loaded\)"):
        ckpt_io.load(tmp_path / "old.h5")


def test_a_checkpoint_path_that_is_not_a_regular_file_is_refused_without_reading(tmp_path):
    os.mkfifo(tmp_path / "fifo.h5")                    # opening it for reading would block forever
    with pytest.raises(CheckpointError, match="fifo.h5: not a regular file \\(a FIFO"):
        ckpt_io.load(tmp_path / "fifo.h5")


def test_newest_valid_skips_a_corrupt_newest_checkpoint_with_a_warning(tmp_path):
    ckpt_io.save(ckpt_io.step_path(tmp_path, 5), sample_checkpoint(step=5))
    ckpt_io.save(ckpt_io.step_path(tmp_path, 9), sample_checkpoint(step=9))
    flip_a_byte_of(ckpt_io.step_path(tmp_path, 9))
    warnings = []
    found = ckpt_io.newest_valid(tmp_path, warn=warnings.append)
    assert found.state["step"] == 5
    [warning] = warnings
    assert warning.startswith("warning: skipping")
    assert "step-00000009.h5" in warning and "checksum" in warning


def test_newest_valid_can_set_a_corrupt_checkpoint_aside_without_deleting_it(tmp_path):
    ckpt_io.save(ckpt_io.step_path(tmp_path, 5), sample_checkpoint(step=5))
    ckpt_io.save(ckpt_io.step_path(tmp_path, 9), sample_checkpoint(step=9))
    flip_a_byte_of(ckpt_io.step_path(tmp_path, 9))
    assert ckpt_io.newest_valid(tmp_path, warn=lambda m: None, set_aside=True).state["step"] == 5
    assert sorted(os.listdir(tmp_path)) == ["step-00000005.h5", "step-00000009.h5.corrupt"]


def test_prune_keeps_the_k_newest_step_checkpoints_best_and_nothing_temporary(tmp_path):
    for step in (3, 6, 9, 12, 15):
        ckpt_io.save(ckpt_io.step_path(tmp_path, step), sample_checkpoint(step=step))
    ckpt_io.save(tmp_path / "best.h5", sample_checkpoint(step=3))
    (tmp_path / ".step-00000018.h5.tmp-99999999").write_bytes(b"left by a writer that was killed")
    ckpt_io.prune(tmp_path, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["best.h5", "step-00000012.h5", "step-00000015.h5"]


def test_step_checkpoints_are_ordered_by_step_even_past_eight_digits(tmp_path):
    for step in (99_999_999, 100_000_000, 7):
        ckpt_io.step_path(tmp_path, step).write_bytes(b"")
    assert [p.name for p in ckpt_io.step_checkpoints(tmp_path)] == \
        ["step-100000000.h5", "step-99999999.h5", "step-00000007.h5"]


# ---------------------------------------------------------------- what a run writes, and when


def train_in_process(small_data, run_dir, **options):
    values = dict(data=small_data, model=model_spec(), batch_size=16, epochs=2, threads=1,
                  run_dir=str(run_dir))
    values.update(options)
    assert run_training(Config(**values).validated(), SerialComm(), quiet=True).exit_status == 0
    return run_dir / "checkpoints"


def steps_on_disk(folder):
    return sorted(int(p.name[5:-3]) for p in ckpt_io.step_checkpoints(folder))


def test_a_run_checkpoints_every_n_steps_and_at_the_end_of_every_epoch(small_data, tmp_path):
    folder = train_in_process(small_data, tmp_path / "run", checkpoint_every=4, keep=100)
    assert steps_on_disk(folder) == [4, 8, 12, 15, 16, 20, 24, 28, 30]


def test_without_checkpoint_every_a_run_checkpoints_at_the_end_of_every_epoch_only(
        small_data, tmp_path):
    folder = train_in_process(small_data, tmp_path / "run", epochs=3, keep=100)
    assert steps_on_disk(folder) == [15, 30, 45]


def test_a_run_keeps_the_k_newest_checkpoints_and_best(small_data, tmp_path):
    folder = train_in_process(small_data, tmp_path / "run", checkpoint_every=4, keep=2)
    assert steps_on_disk(folder) == [28, 30]
    assert sorted(os.listdir(folder)) == ["best.h5", "step-00000028.h5", "step-00000030.h5"]


def test_a_checkpoint_holds_parameters_optimizer_position_configuration_and_metrics(
        small_data, tmp_path):
    folder = train_in_process(small_data, tmp_path / "run", checkpoint_every=20, keep=100)
    mid = ckpt_io.load(ckpt_io.step_path(folder, 20))
    assert sorted(mid.params) == ["linear1.bias", "linear1.weight", "linear2.bias",
                                  "linear2.weight"]
    assert mid.buffers == {}                                # an MLP has no buffers
    assert sorted(mid.optimizer) == ["steps", "type", "velocity"]
    assert (mid.optimizer["type"], mid.optimizer["steps"]) == ("SGD", 20)
    assert mid.optimizer["velocity"].shape == (64 * 16 + 16 + 16 * 10 + 10,)
    assert np.isfinite(mid.optimizer["velocity"]).all()
    position = (mid.state["epoch"], mid.state["step"], mid.state["step_in_epoch"])
    assert position == (1, 20, 20 - STEPS_PER_EPOCH)
    assert mid.state["train_sums"]["samples"] == 5 * 16    # samples seen so far in epoch 2
    assert mid.state["n_train"] == 240 and mid.state["world_size"] == 1
    assert mid.config == json.loads((tmp_path / "run" / "config.json").read_text())
    epoch_1 = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert mid.metrics == [epoch_1]
    assert (mid.model_summary, mid.dtype) == (model_spec(), "float32")
    assert [layer["type"] for layer in mid.model] == ["Flatten", "Linear", "ReLU", "Linear"]


def test_best_holds_the_epoch_with_the_highest_test_accuracy(small_data, tmp_path):
    folder = train_in_process(small_data, tmp_path / "run", epochs=4, keep=100)
    records = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    best_record = max(records, key=lambda r: r["test_accuracy"])      # the first of equals
    # else "best" could mean "last"
    assert best_record is not records[-1]
    best = ckpt_io.load(folder / "best.h5")
    assert best.state["step"] == best_record["step"]
    at_that_step = ckpt_io.load(ckpt_io.step_path(folder, best_record["step"]))
    assert all(np.array_equal(best.params[n], at_that_step.params[n]) for n in best.params)


# ---------------------------------------------------------------- best.h5 on a full disk


@pytest.fixture
def best_cannot_be_written(monkeypatch):
    """Every write of best.h5 fails like a full disk, after its temporary file is written: a disk
    with room for the step checkpoints only."""
    real_fsync = durable.fsync_file

    def fsync_file(path):
        if os.path.basename(path).startswith(durable.temporary_prefix("best.h5")):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(path)
    monkeypatch.setattr(durable, "fsync_file", fsync_file)


def test_a_failed_write_of_best_is_a_warning_naming_it_and_old_step_checkpoints_are_still_pruned(
        small_data, tmp_path, capsys, best_cannot_be_written):
    folder = train_in_process(small_data, tmp_path / "run", epochs=3, keep=1)
    assert sorted(os.listdir(folder)) == ["step-00000045.h5"]   # pruned; no best.h5, no temporary
    warnings = capsys.readouterr().err.splitlines()
    assert warnings[0] == (f"warning: could not write {folder / 'best.h5'}: No space left on "
                           "device; it is left as it was, and step-00000015.h5 holds the best "
                           "model so far (the run goes on, and can resume from it)")
    assert all(line.startswith(f"warning: could not write {folder / 'best.h5'}: ")
               for line in warnings)


def test_a_run_resumes_on_a_disk_where_best_cannot_be_written(small_data, tmp_path,
                                                              best_cannot_be_written):
    folder = train_in_process(small_data, tmp_path / "run", epochs=2, keep=1)
    folder = train_in_process(small_data, tmp_path / "run", epochs=3, keep=1, resume="auto")
    assert steps_on_disk(folder) == [45]
    assert ckpt_io.load(ckpt_io.step_path(folder, 45)).state["epoch"] == 3
