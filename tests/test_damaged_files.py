"""Damaged and forged files, given as data or met in a run folder: refused in one line, before they
cost anything (a hang, a traceback, a huge allocation, a valid checkpoint pruned), or set aside for
the ones that are sound.

Bit flips at every position of whole files are in test_fuzz.py; here are the damages that once got
through: a flipped datatype, a name or a heap object, a file that is not a file, one that cannot be
read, and checkpoints that describe what their arrays are not.
"""

import dataclasses
import os
import time

import h5py
import numpy as np
import pytest

import helpers
from ddptrain.data import format as data, readable
from ddptrain.errors import EXIT_USAGE, DataError
from ddptrain.run import checkpoint as ckpt_io
from helpers import error_lines, flip_byte_at, in_process, metrics_records, model_spec

SMALL = ["--model", model_spec(), "--batch-size", "16", "--threads", "1", "--quiet"]


def old_format_file(path):
    """A data file as ddptrain 0.1 wrote it: HDF5's oldest format, text attributes in the global
    heap."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.attrs["format"], f.attrs["format_version"] = "ddptrain-mnist", 1
        f.attrs["source"] = "synthetic test data"
        for split, n in (("train", 240), ("test", 60)):
            f.create_dataset(f"{split}/images",
                             data=rng.integers(0, 256, (n, 8, 8), dtype=np.uint8),
                             chunks=(min(n, 1024), 8, 8))
            f.create_dataset(f"{split}/labels", data=rng.integers(0, 10, n, dtype=np.uint8))
    return path


def hanging_file(path):
    """``old_format_file`` with bit 7 of the size of the first object in its global heap flipped:
    HDF5 loops forever reading the attributes (the global heap collection's first object size is 24
    bytes after its "GCOL" signature, in the HDF5 file format specification)."""
    old_format_file(path)
    flip_byte_at(path, path.read_bytes().index(b"GCOL") + 24, mask=0x80)
    return path


def trained_checkpoint(small_data, tmp_path, capsys):
    """The step-15 checkpoint of one epoch of training on ``small_data``."""
    assert in_process(["--data", small_data, *SMALL, "--epochs", "1", "--run-dir",
                       tmp_path / "run"], capsys)[0] == 0
    return ckpt_io.step_path(tmp_path / "run" / "checkpoints", 15)


def rewritten(checkpoint, name, **changes):
    """``checkpoint`` (a path) saved again as ``name`` beside it with ``changes``, with a valid
    digest: what a forger, not damage, makes."""
    forged = checkpoint.with_name(name)
    ckpt_io.save(forged, dataclasses.replace(ckpt_io.load(checkpoint), **changes))
    return forged


# ---------------------------------------------------------------- data files


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [None, 2])
def test_a_data_file_that_hangs_hdf5_ends_every_rank_with_one_line(tmp_path, ranks):
    """One flipped bit makes HDF5 spin forever reading the file's attributes."""
    bad = hanging_file(tmp_path / "hangs.h5")
    started = time.monotonic()
    proc = helpers.run(["--data", bad, *SMALL, "--run-dir", tmp_path / "run"], ranks=ranks,
                       timeout=60)
    assert time.monotonic() - started < data.CHECK_SECONDS + 15
    assert proc.returncode == EXIT_USAGE
    assert error_lines(proc.stderr) == [f"ddptrain: error: {bad}: damaged: HDF5 did not finish "
                                        f"reading its metadata within {data.CHECK_SECONDS} s"]


@pytest.mark.slow
def test_a_file_that_hangs_hdf5_is_cut_short_in_a_child_process_and_its_undamaged_twin_is_read(
        tmp_path):
    bad = hanging_file(tmp_path / "hangs.h5")
    with pytest.raises(
        DataError, match="hangs.h5: damaged: HDF5 did not finish reading its metadata within 1 s"):
        readable.check_readable(bad, seconds=1)
    # same format, undamaged
    readable.check_readable(old_format_file(tmp_path / "fine.h5"), seconds=5)


def test_a_fifo_given_as_data_is_refused_at_once(tmp_path, capsys):
    os.mkfifo(tmp_path / "fifo.h5")   # opening it for reading would block until a writer comes
    status, lines = in_process(["--data", tmp_path / "fifo.h5", *SMALL, "--run-dir",
                                tmp_path / "run"], capsys)
    assert status == EXIT_USAGE
    assert lines == [f"ddptrain: error: {tmp_path / 'fifo.h5'}: not a regular file (a FIFO, a "
                     f"socket or a device), not a data file"]


def test_a_data_file_that_cannot_be_read_says_so_not_that_it_is_not_hdf5(small_data, monkeypatch):
    """Permission denied must not read as "not an HDF5 file (or truncated)". (As root, which reads
    everything, the refusal is simulated; it is the message under test.)"""
    monkeypatch.setattr(data.os, "access", lambda path, mode: False)
    with pytest.raises(DataError, match=r"small.h5: cannot read it \(permission denied\)$"):
        data.inspect(small_data)


# ---------------------------------------------------------------- checkpoints


@pytest.mark.slow
def test_resume_auto_sets_aside_a_checkpoint_whose_datatype_was_flipped_and_prunes_no_valid_one(
        small_data, tmp_path):
    """float32 became uint32 in the newest checkpoint: the run resumes from the one before, and
    pruning to --keep 1 removes only what the resumed run made obsolete."""
    run = tmp_path / "run"
    assert helpers.run(["--data", small_data, *SMALL, "--epochs", "2", "--run-dir",
                        run]).returncode == 0
    newest = ckpt_io.step_path(run / "checkpoints", 30)
    # HDF5's datatype message of a little-endian float32 starts with version 1, class 1 (floating
    # point): the flip makes it class 0, an integer of the same size.
    float32_datatype = bytes([0x11, 0x20, 0x1f, 0x00, 0x04])
    flip_byte_at(newest, newest.read_bytes().index(float32_datatype, ckpt_io.HEADER_SIZE),
                 mask=0x01)
    proc = helpers.run(["--data", small_data, *SMALL, "--epochs", "3", "--keep", "1", "--run-dir",
                        run, "--resume", "auto"])
    assert proc.returncode == 0, proc.stderr
    assert "step-00000030.h5: checksum mismatch" in proc.stderr and "resumed from" in proc.stdout
    assert sorted(os.listdir(run / "checkpoints")) == ["best.h5", "step-00000030.h5.corrupt",
                                                       "step-00000045.h5"]


def test_resume_auto_with_every_step_checkpoint_damaged_resumes_from_best_h5_and_keeps_it(
        small_data, tmp_path, capsys):
    """best.h5 is a checkpoint too: a start from scratch would overwrite it."""
    run = tmp_path / "run"
    assert in_process(["--data", small_data, *SMALL, "--epochs", "2", "--keep", "1", "--run-dir",
                       run], capsys)[0] == 0
    best = ckpt_io.load(run / "checkpoints" / "best.h5")
    flip_byte_at(ckpt_io.step_path(run / "checkpoints", 30), 600)
    status, lines = in_process(["--data", small_data, *SMALL, "--epochs", "3", "--run-dir", run,
                                "--resume", "auto"], capsys)
    assert status == 0
    assert f"resuming from best.h5 (step {best.state['step']})" in " ".join(lines)
    assert [r["epoch"] for r in metrics_records(run)] == [1, 2, 3]
    assert (ckpt_io.load(run / "checkpoints" / "best.h5").state["best_accuracy"]
            >= best.state["best_accuracy"])


def test_a_flipped_bit_in_a_parameter_s_name_is_refused_before_hdf5_reads_the_file(
        small_data, tmp_path, capsys):
    """A damaged name once reached h5py, and came out as a TypeError's traceback."""
    checkpoint = trained_checkpoint(small_data, tmp_path, capsys)
    name_at = checkpoint.read_bytes().index(b"linear1.weight", ckpt_io.HEADER_SIZE)
    flip_byte_at(checkpoint, name_at, mask=0x80)
    status, lines = in_process(["evaluate", checkpoint, "--data", small_data], capsys)
    assert status == EXIT_USAGE
    assert lines == [f"ddptrain: error: {checkpoint}: checksum mismatch, the checkpoint is corrupt"]


def test_a_checkpoint_whose_description_asks_for_more_than_its_arrays_is_refused_before_allocating(
        small_data, tmp_path, capsys):
    """A digest proves the bytes are whole, not that they are honest: a description of a huge layer
    with the arrays of a small one must not make evaluate allocate the huge one."""
    from ddptrain.nn.conv import Conv2d
    from ddptrain.nn.layers import Flatten, Linear
    checkpoint = trained_checkpoint(small_data, tmp_path, capsys)
    huge = [Conv2d(1, 4_000_000_000, 3), Flatten(), Linear(64, 10)]   # 36 billion weights
    forged = rewritten(checkpoint, "forged.h5", model=[{"name": None, "type": type(layer).__name__,
                                                       "args": layer.config()} for layer in huge])
    status, lines = in_process(["evaluate", forged, "--data", small_data], capsys)
    assert status == EXIT_USAGE and len(lines) == 1
    assert lines[0].startswith(f"ddptrain: error: {forged}: malformed checkpoint: it has no "
                               f"parameter conv2d1.bias"), lines


def test_evaluate_refuses_a_model_whose_activations_would_not_fit_in_memory(
        small_data, tmp_path, capsys, monkeypatch):
    """Few parameters, huge activations: 20,000 channels of 8x8 pixels for 60 test rows. Checked
    like a training run's options (limits.py), with the memory said to be 1 GiB."""
    from ddptrain.nn.conv import Conv2d
    from ddptrain.nn.layers import Flatten, Linear
    from ddptrain.nn.model import Sequential
    from ddptrain.nn.pooling import AvgPool2d
    from ddptrain.run import limits
    checkpoint = trained_checkpoint(small_data, tmp_path, capsys)
    wide = Sequential([Conv2d(1, 20_000, 1), AvgPool2d(8), Flatten(), Linear(20_000, 10)],
                      dtype=np.float32)
    forged = rewritten(checkpoint, "wide.h5", model=wide.describe(),
                       params=dict(wide.named_params()), model_summary=wide.summary(),
                       optimizer={"type": "SGD", "steps": 0})   # no momentum of another size
    monkeypatch.setattr(limits, "available_memory", lambda: limits.GIB)
    status, lines = in_process(["evaluate", forged, "--data", small_data], capsys)
    assert status == EXIT_USAGE and len(lines) == 1
    assert "needs about" in lines[0] and "and it has 1.0 GiB available" in lines[0], lines
