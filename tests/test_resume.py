"""Resuming: a run stopped at step s and resumed ends exactly where an
uninterrupted run ends: bitwise on the same number of ranks, within float tolerance on another.

The runs: 240 training rows, global batch 16 (15 steps per epoch), 3 epochs (45 steps). The
stopped run gets SIGUSR1 on rank 1 just before step 20 (a fault injected by tests/inject.py),
finishes that step and checkpoints at step 21, in the middle of epoch 2. The runs are in float64,
where the order of additions shows in the last bits (float32 losses add up exactly in float64),
and record metrics every 5 steps as well as every epoch.
"""

import json
import shutil

import numpy as np
import pytest

import helpers
from ddptrain.run import checkpoint as ckpt_io
from helpers import flip_a_byte_of, make_dataset, model_spec

pytestmark = pytest.mark.slow   # every test here starts ddptrain processes

FINAL_STEP, STOP_STEP = 45, 21
TIMING_KEYS = {"seconds", "samples_per_second"}


def train(data, run_dir, *extra, ranks=None, fault=None):
    args = ["--data", data, "--model", model_spec(), "--batch-size", "16", "--epochs", "3",
            "--dtype", "float64", "--metrics-every", "5", "--threads", "1", "--quiet", "--run-dir",
            run_dir, *extra]
    return helpers.run(args, ranks=ranks, timeout=60, faults=fault)


def final(run_dir):
    return ckpt_io.load(ckpt_io.step_path(run_dir / "checkpoints", FINAL_STEP))


def metrics(run_dir):
    """metrics.jsonl without the timings: the per-epoch and the every-5-steps records."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def epochs(run_dir):
    return [r for r in metrics(run_dir) if r.get("kind", "epoch") == "epoch"]


def resumed_copy(stopped, destination, *extra, ranks=None):
    """Copy the stopped run's folder and resume it there with --resume auto."""
    shutil.copytree(stopped, destination)
    proc = train(proc_data(stopped), destination, "--resume", "auto", *extra, ranks=ranks)
    assert proc.returncode == 0, proc.stderr
    return destination, proc


def proc_data(run_dir):
    return json.loads((run_dir / "config.json").read_text())["data"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def uninterrupted(small_data, runs):
    proc = train(small_data, runs / "uninterrupted", ranks=2)
    assert proc.returncode == 0, proc.stderr
    return runs / "uninterrupted"


@pytest.fixture(scope="module")
def stopped(small_data, runs):
    proc = train(small_data, runs / "stopped", ranks=2, fault="signal:rank=1:step=20:SIGUSR1")
    assert proc.returncode == 3, proc.stderr
    return runs / "stopped"


@pytest.fixture(scope="module")
def resumed_on_2(stopped, runs):
    return resumed_copy(stopped, runs / "resumed-on-2", ranks=2)[0]


def test_a_stopped_run_checkpoints_the_step_it_stopped_after(stopped):
    newest = ckpt_io.newest_valid(stopped / "checkpoints")
    assert newest.path.endswith(f"step-{STOP_STEP:08d}.h5")
    position = (newest.state["epoch"], newest.state["step_in_epoch"], newest.state["step"])
    assert position == (1, 6, STOP_STEP)


def test_resumed_on_the_same_number_of_ranks_the_parameters_are_bitwise_identical(
        uninterrupted, resumed_on_2):
    expected, got = final(uninterrupted), final(resumed_on_2)
    for name in expected.params:
        assert np.array_equal(got.params[name], expected.params[name]), name
    assert sorted(got.optimizer) == ["steps", "type", "velocity"]
    assert np.array_equal(got.optimizer["velocity"], expected.optimizer["velocity"])
    assert got.optimizer["steps"] == expected.optimizer["steps"] == FINAL_STEP


def test_resumed_mid_epoch_the_metrics_are_those_of_the_uninterrupted_run(
        uninterrupted, resumed_on_2):
    # exactly, train_loss of epoch 2 included
    assert metrics(resumed_on_2) == metrics(uninterrupted)
    assert [r["step"] for r in epochs(uninterrupted)] == [15, 30, 45]


def test_resumed_on_a_different_number_of_ranks_the_parameters_match_within_tolerance(
        uninterrupted, stopped, runs):
    resumed, proc = resumed_copy(stopped, runs / "resumed-on-3", ranks=3)
    assert "written by 2 ranks, resumed on 3" in proc.stdout
    expected, got = final(uninterrupted), final(resumed)
    for name in expected.params:
        np.testing.assert_allclose(got.params[name], expected.params[name], rtol=1e-4, atol=1e-6)
    assert len(metrics(resumed)) == len(metrics(uninterrupted))
    for got_record, expected_record in zip(metrics(resumed), metrics(uninterrupted)):
        assert got_record.keys() == expected_record.keys()
        for key, value in expected_record.items():
            expected = pytest.approx(value, rel=1e-5) if isinstance(value, float) else value
            assert got_record[key] == expected


def test_a_run_stopped_after_the_last_step_of_an_epoch_resumes_into_that_epoch_s_evaluation(
        small_data, runs, uninterrupted):
    proc = train(small_data, runs / "stopped-at-15", ranks=2, fault="signal:rank=0:step=14:SIGTERM")
    assert proc.returncode == 3, proc.stderr
    stop = ckpt_io.newest_valid(runs / "stopped-at-15" / "checkpoints")
    assert (stop.state["epoch"], stop.state["step_in_epoch"]) == (0, 15)
    assert [(r["kind"], r["step"]) for r in stop.metrics] == [("step", 5), ("step", 10),
                                                              ("step", 15)]   # no epoch
    # record yet: the epoch was not evaluated
    resumed, _ = resumed_copy(runs / "stopped-at-15", runs / "resumed-at-15", ranks=2)
    assert metrics(resumed) == metrics(uninterrupted)
    assert all(np.array_equal(final(resumed).params[n],
                              final(uninterrupted).params[n]) for n in stop.params)


def test_resume_auto_skips_a_corrupt_newest_checkpoint_with_a_warning(uninterrupted, stopped, runs):
    shutil.copytree(stopped, runs / "corrupt-newest")
    flip_a_byte_of(ckpt_io.step_path(runs / "corrupt-newest" / "checkpoints", STOP_STEP))
    proc = train(proc_data(stopped), runs / "corrupt-newest", "--resume", "auto", ranks=2)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("warning: skipping") == 1
    assert f"step-{STOP_STEP:08d}.h5: checksum mismatch" in proc.stderr
    assert "resumed from" in proc.stdout and "step-00000015.h5" in proc.stdout
    assert (runs / "corrupt-newest" / "checkpoints" / f"step-{STOP_STEP:08d}.h5.corrupt").exists()
    expected, got = final(uninterrupted), final(runs / "corrupt-newest")
    assert all(np.array_equal(got.params[n], expected.params[n]) for n in expected.params)


def test_resume_auto_without_a_checkpoint_starts_from_the_beginning(small_data, tmp_path):
    proc = train(small_data, tmp_path / "fresh", "--resume", "auto", "--epochs", "1")
    assert proc.returncode == 0, proc.stderr
    assert "no valid checkpoint" in proc.stderr and "starting from the beginning" in proc.stderr
    assert [r["epoch"] for r in epochs(tmp_path / "fresh")] == [1]


def test_resume_path_continues_from_that_checkpoint_in_a_new_run_folder(stopped, tmp_path):
    given = ckpt_io.step_path(stopped / "checkpoints", STOP_STEP)
    proc = train(proc_data(stopped), tmp_path / "elsewhere", "--resume", given)
    assert proc.returncode == 0, proc.stderr
    assert f"resumed from {given}: epoch 2, step {STOP_STEP}" in proc.stdout
    assert [r["epoch"] for r in epochs(tmp_path / "elsewhere")] == [1, 2, 3]
    # epoch 1 came with the checkpoint
    assert epochs(tmp_path / "elsewhere")[0] == epochs(stopped)[0]


@pytest.mark.parametrize("extra, message", [
    (["--model", "64-8-10"], "checkpoint is for model 64-16-10, not 64-8-10"),
    (["--model", "64-16-16-10"], "checkpoint is for model 64-16-10, not 64-16-16-10 (parameter "
                                 "linear2.bias is 10 there, 16 here)"),
    (["--dtype", "float32"], "checkpoint holds float64 parameters, not float32"),
    (["--batch-size", "24"], "checkpoint was trained with --batch-size 16, not 24"),
    (["--seed", "1"], "checkpoint was trained with --seed 0, not 1"),
    (["--virtual-shards", "12"], "checkpoint was trained with --virtual-shards 24, not 12"),
    (["--drop-last"],
     "checkpoint was trained with --drop-last False, not True; resume without --drop-last"),
], ids=["model", "deeper-model", "dtype", "batch-size", "seed", "virtual-shards", "drop-last"])
def test_resume_refuses_a_checkpoint_that_does_not_fit_the_run(stopped, tmp_path, extra, message):
    given = ckpt_io.step_path(stopped / "checkpoints", STOP_STEP)
    before = given.read_bytes()
    proc = train(proc_data(stopped), tmp_path / "run", "--resume", given, *extra)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"ddptrain: error: {given}: {message}")
    assert proc.stderr.count("\n") == 1
    assert given.read_bytes() == before


def test_resume_refuses_data_of_another_size(stopped, tmp_path):
    other = make_dataset(tmp_path / "other.h5", n_train=264)
    given = ckpt_io.step_path(stopped / "checkpoints", STOP_STEP)
    proc = train(other, tmp_path / "run", "--resume", given)
    assert proc.returncode == 2
    assert proc.stderr == (f"ddptrain: error: {given}: checkpoint was trained on 240 rows, this "
                           f"data file has 264\n")


def test_resume_applies_the_optimiser_settings_given_not_those_of_the_checkpoint(stopped, tmp_path):
    """The checkpoint holds the optimiser's state (its momentum buffer); its settings are the
    options."""
    given = ckpt_io.step_path(stopped / "checkpoints", STOP_STEP)
    runs = {}
    for momentum in ("0.9", "0.5"):
        proc = train(proc_data(stopped), tmp_path / momentum, "--resume", given, "--epochs", "2",
                     "--momentum", momentum)
        assert proc.returncode == 0, proc.stderr
        runs[momentum] = final_at(tmp_path / momentum, 30)
    assert runs["0.5"].config["momentum"] == 0.5 and runs["0.9"].config["momentum"] == 0.9
    assert not np.array_equal(runs["0.5"].params["linear1.weight"],
                              runs["0.9"].params["linear1.weight"])


def final_at(run_dir, step):
    return ckpt_io.load(ckpt_io.step_path(run_dir / "checkpoints", step))


@pytest.mark.parametrize("spec, buffers", [
    ("64-16-bn-drop0.3-12-bn-10",
     ["batchnorm1.running_mean", "batchnorm1.running_var", "batchnorm2.running_mean",
      "batchnorm2.running_var"]),
    ("conv4k3p1-bn-maxpool2-conv6k3s2p1-drop0.1-avgpool2-flatten-12-10",
     ["batchnorm1.running_mean", "batchnorm1.running_var"]),
], ids=["mlp", "cnn"])
def test_with_batchnorm_and_dropout_a_resumed_run_is_bitwise_the_uninterrupted_one(
        small_data, tmp_path, spec, buffers):
    """Running statistics come back from the checkpoint; dropout masks are drawn from the step, not
    a state; a CNN's work arrays hold nothing from one step to the next."""
    model = ["--model", spec]
    whole = train(small_data, tmp_path / "whole", *model, ranks=2)
    assert whole.returncode == 0, whole.stderr
    stopped = train(small_data, tmp_path / "resumed", *model, ranks=2,
                    fault="signal:rank=1:step=20:SIGUSR1")
    assert stopped.returncode == 3, stopped.stderr
    resumed = train(small_data, tmp_path / "resumed", *model, "--resume", "auto", ranks=2)
    assert resumed.returncode == 0, resumed.stderr
    expected, got = final(tmp_path / "whole"), final(tmp_path / "resumed")
    assert sorted(got.buffers) == buffers
    for group in ("params", "buffers"):
        for name, array in getattr(expected, group).items():
            assert np.array_equal(getattr(got, group)[name], array), name
    assert metrics(tmp_path / "resumed") == metrics(tmp_path / "whole")
