"""Single-process training through the command line, as a user runs it."""

import json

import h5py
import numpy as np
import pytest

import helpers
from ddptrain.run import checkpoint
from helpers import model_spec

pytestmark = pytest.mark.slow   # every test here runs python -m ddptrain

METRIC_KEYS = {"epoch", "step", "train_loss", "test_loss", "test_accuracy", "seconds",
               "samples_per_second"}


def train(small_data, run_dir, *extra):
    return helpers.run(["--data", small_data, "--model", model_spec(), "--epochs", "3",
                        "--batch-size", "32", "--run-dir", run_dir, *extra])


def test_training_learns_and_writes_one_metrics_record_per_epoch(small_data, tmp_path):
    proc = train(small_data, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    records = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all(METRIC_KEYS <= set(r) for r in records)
    # 240 rows / 32 per batch = 8 steps per epoch
    assert records[-1]["step"] == 3 * 8
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert records[-1]["test_accuracy"] > 0.5                 # chance is 0.1
    assert "1 rank (none (single process))" in proc.stdout


def test_the_final_checkpoint_is_an_hdf5_file_with_the_trained_parameters(small_data, tmp_path):
    assert train(small_data, tmp_path / "run").returncode == 0
    final = checkpoint.step_checkpoints(tmp_path / "run" / "checkpoints")[0]
    with h5py.File(final, "r") as f:
        assert sorted(f["params"]) == ["linear1.bias", "linear1.weight", "linear2.bias",
                                       "linear2.weight"]
        assert f["params"]["linear1.weight"].shape == (64, 16)
    assert checkpoint.load(final).state["step"] == 24


def test_a_seed_fixes_the_run(small_data, tmp_path):
    def final_params(run_dir, seed):
        assert train(small_data, run_dir, "--seed", seed).returncode == 0
        return checkpoint.newest_valid(run_dir / "checkpoints").params["linear1.weight"]

    first, again = final_params(tmp_path / "a", 5), final_params(tmp_path / "b", 5)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, final_params(tmp_path / "c", 6))


def test_float64_training_runs_in_float64(small_data, tmp_path):
    assert train(small_data, tmp_path / "run", "--dtype", "float64").returncode == 0
    final = checkpoint.newest_valid(tmp_path / "run" / "checkpoints")
    assert final.params["linear1.weight"].dtype == np.float64 and final.dtype == "float64"


def test_a_bad_data_file_is_one_line_and_exit_status_2(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5 at all")
    proc = helpers.run(["--data", bad, "--run-dir", tmp_path / "run"])
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert str(bad) in proc.stderr and "Traceback" not in proc.stderr


def test_a_bad_option_is_one_line_and_exit_status_2(tmp_path):
    for args in (["--batch-size", "0"], ["--model", "784-x-10"], ["--lr", "fast"],
                 ["--no-such-option"]):
        proc = helpers.run([*args, "--run-dir", tmp_path / "run"])
        assert proc.returncode == 2, args
        assert proc.stderr.startswith("ddptrain: error:"), proc.stderr
        assert proc.stderr.strip().count("\n") == 0, proc.stderr
