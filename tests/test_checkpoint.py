"""Checkpoints: what they hold, that they cannot be half-written, that damage is caught on load,
and how often they are written and how many are kept (issue 4, point 1)."""

import json
import os

import h5py
import numpy as np
import pytest

from ddptrain import checkpoint as ckpt_io
from ddptrain.checkpoint import Checkpoint
from ddptrain.comm import SerialComm
from ddptrain.config import Config
from ddptrain.errors import CheckpointError
from ddptrain.runner import run_training
from synthetic import model_spec

STEPS_PER_EPOCH = 15     # the 240 training rows of small_data in global batches of 16


def sample_checkpoint(seed=0, step=7):
    rng = np.random.default_rng(seed)
    params = {"0.weight": rng.standard_normal((64, 16)).astype(np.float32),
              "0.bias": rng.standard_normal(16).astype(np.float32),
              "2.weight": rng.standard_normal((16, 10)).astype(np.float32),
              "2.bias": rng.standard_normal(10).astype(np.float32)}
    return Checkpoint(params=params, velocity=rng.standard_normal(1210).astype(np.float32),
                      optimizer={"momentum": 0.9, "weight_decay": 0.0, "nesterov": False, "steps": step},
                      state={"epoch": 0, "step_in_epoch": step, "step": step, "train_sums": [1.5, 3.0, 16.0],
                             "n_train": 240, "best_accuracy": -1.0, "world_size": 2},
                      config={"model": "64-16-10", "seed": seed}, metrics=[{"epoch": 1, "test_accuracy": 0.5}],
                      model="64-16-10", dtype="float32")


def assert_same(loaded, saved):
    assert sorted(loaded.params) == sorted(saved.params)
    for name, array in saved.params.items():
        assert loaded.params[name].dtype == array.dtype and np.array_equal(loaded.params[name], array)
    assert np.array_equal(loaded.velocity, saved.velocity)
    assert (loaded.optimizer, loaded.state, loaded.config, loaded.metrics) == \
        (saved.optimizer, saved.state, saved.config, saved.metrics)
    assert (loaded.model, loaded.dtype) == (saved.model, saved.dtype)


def flip_a_byte_of(path, dataset="params/0.weight"):
    """Corrupt the file on disk, as a bad sector would: one byte inside a dataset's stored data."""
    with h5py.File(path, "r") as f:
        offset = f[dataset].id.get_offset() + 5
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def leftovers(folder):
    return [name for name in os.listdir(folder) if ".tmp" in name]


# ---------------------------------------------------------------- the file


def test_a_saved_checkpoint_loads_back_bitwise_identical(tmp_path):
    saved = sample_checkpoint()
    ckpt_io.save(tmp_path / "step-00000007.h5", saved)
    assert_same(ckpt_io.load(tmp_path / "step-00000007.h5"), saved)


def test_a_checkpoint_stores_a_sha256_of_its_contents(tmp_path):
    ckpt_io.save(tmp_path / "c.h5", sample_checkpoint())
    with h5py.File(tmp_path / "c.h5", "r") as f:
        digest = f.attrs["sha256"]
    assert len(digest) == 64 and int(digest, 16) >= 0


def test_save_writes_through_a_temporary_file_and_leaves_none_behind(tmp_path, monkeypatch):
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(ckpt_io.os, "replace", lambda a, b: (renames.append((a, b)), real_replace(a, b)))
    ckpt_io.save(tmp_path / "c.h5", sample_checkpoint())
    [(source, target)] = renames
    assert os.path.dirname(source) == str(tmp_path) and str(target) == str(tmp_path / "c.h5")
    assert leftovers(tmp_path) == []


def test_a_write_that_fails_before_the_rename_leaves_the_previous_checkpoint_intact(tmp_path):
    previous = sample_checkpoint(seed=1)
    ckpt_io.save(tmp_path / "c.h5", previous)

    def disk_full():
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        ckpt_io.save(tmp_path / "c.h5", sample_checkpoint(seed=2), fail_after_write=disk_full)
    assert_same(ckpt_io.load(tmp_path / "c.h5"), previous)
    assert leftovers(tmp_path) == []


def test_a_corrupted_byte_is_caught_by_the_checksum(tmp_path):
    ckpt_io.save(tmp_path / "c.h5", sample_checkpoint())
    flip_a_byte_of(tmp_path / "c.h5")
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        ckpt_io.load(tmp_path / "c.h5")


def test_changed_metadata_is_caught_by_the_checksum(tmp_path):
    ckpt_io.save(tmp_path / "c.h5", sample_checkpoint())
    with h5py.File(tmp_path / "c.h5", "a") as f:
        f.attrs["state"] = json.dumps({**json.loads(f.attrs["state"]), "step": 8})
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        ckpt_io.load(tmp_path / "c.h5")


def test_a_truncated_checkpoint_is_refused(tmp_path):
    ckpt_io.save(tmp_path / "c.h5", sample_checkpoint())
    size = os.path.getsize(tmp_path / "c.h5")
    os.truncate(tmp_path / "c.h5", size // 2)
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        ckpt_io.load(tmp_path / "c.h5")


def test_an_hdf5_file_that_is_not_a_checkpoint_is_refused(small_data):
    with pytest.raises(CheckpointError, match="not a ddptrain checkpoint"):
        ckpt_io.load(small_data)


def test_newest_valid_skips_a_corrupt_newest_checkpoint_with_a_warning(tmp_path):
    ckpt_io.save(ckpt_io.step_path(tmp_path, 5), sample_checkpoint(step=5))
    ckpt_io.save(ckpt_io.step_path(tmp_path, 9), sample_checkpoint(step=9))
    flip_a_byte_of(ckpt_io.step_path(tmp_path, 9))
    warnings = []
    found = ckpt_io.newest_valid(tmp_path, warn=warnings.append)
    assert found.state["step"] == 5
    [warning] = warnings
    assert warning.startswith("warning: skipping") and "step-00000009.h5" in warning and "checksum" in warning


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
    values = dict(data=small_data, model=model_spec(), batch_size=16, epochs=2, threads=1, run_dir=str(run_dir))
    values.update(options)
    assert run_training(Config(**values).validated(), SerialComm(), quiet=True) == 0
    return run_dir / "checkpoints"


def steps_on_disk(folder):
    return sorted(int(p.name[5:-3]) for p in ckpt_io.step_checkpoints(folder))


def test_a_run_checkpoints_every_n_steps_and_at_the_end_of_every_epoch(small_data, tmp_path):
    folder = train_in_process(small_data, tmp_path / "run", checkpoint_every=4, keep=100)
    assert steps_on_disk(folder) == [4, 8, 12, 15, 16, 20, 24, 28, 30]


def test_without_checkpoint_every_a_run_checkpoints_at_the_end_of_every_epoch_only(small_data, tmp_path):
    folder = train_in_process(small_data, tmp_path / "run", epochs=3, keep=100)
    assert steps_on_disk(folder) == [15, 30, 45]


def test_a_run_keeps_the_k_newest_checkpoints_and_best(small_data, tmp_path):
    folder = train_in_process(small_data, tmp_path / "run", checkpoint_every=4, keep=2)
    assert steps_on_disk(folder) == [28, 30]
    assert sorted(os.listdir(folder)) == ["best.h5", "step-00000028.h5", "step-00000030.h5"]


def test_a_checkpoint_holds_parameters_optimizer_position_configuration_and_metrics(small_data, tmp_path):
    folder = train_in_process(small_data, tmp_path / "run", checkpoint_every=20, keep=100)
    mid = ckpt_io.load(ckpt_io.step_path(folder, 20))
    assert sorted(mid.params) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert mid.velocity.shape == (64 * 16 + 16 + 16 * 10 + 10,) and np.isfinite(mid.velocity).all()
    assert mid.optimizer == {"momentum": 0.9, "weight_decay": 0.0, "nesterov": False, "steps": 20}
    assert (mid.state["epoch"], mid.state["step"], mid.state["step_in_epoch"]) == (1, 20, 20 - STEPS_PER_EPOCH)
    assert mid.state["train_sums"][2] == 5 * 16            # samples seen so far in epoch 2
    assert mid.state["n_train"] == 240 and mid.state["world_size"] == 1
    assert mid.config == json.loads((tmp_path / "run" / "config.json").read_text())
    epoch_1 = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert mid.metrics == [epoch_1]
    assert (mid.model, mid.dtype) == (model_spec(), "float32")


def test_best_holds_the_epoch_with_the_highest_test_accuracy(small_data, tmp_path):
    folder = train_in_process(small_data, tmp_path / "run", epochs=4, keep=100)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    best_record = max(records, key=lambda r: r["test_accuracy"])      # the first of equals
    assert best_record is not records[-1]                             # else "best" could mean "last"
    best = ckpt_io.load(folder / "best.h5")
    assert best.state["step"] == best_record["step"]
    at_that_step = ckpt_io.load(ckpt_io.step_path(folder, best_record["step"]))
    assert all(np.array_equal(best.params[n], at_that_step.params[n]) for n in best.params)
