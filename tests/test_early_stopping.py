"""Early stopping (--early-stop PATIENCE): training ends after the epoch at which the test metric
has not improved for PATIENCE epochs, with a checkpoint, best.h5 at the best epoch, a line that
says why, status 0; every rank count stops where one process does; a run stopped by a signal and
resumed decides as an uninterrupted one; a resumed run that early stopping ended says it is done.

The runs: 240 training rows of 8x8 images, 60 test rows, global batch 16 (15 steps an epoch), in
float64. At a constant --lr 0.3 the test loss is best at epoch 3 and then wanders above it; at
--lr 0.1 with cosine decay it keeps falling, by less and less. The epoch each run must stop at is
computed from the metrics.jsonl of the same run trained without early stopping, by the rule as the
documentation states it (``expected_stop``), not by ddptrain's code.
"""

import json
import math
import os

import numpy as np
import pytest

import ddptrain
import helpers
from ddptrain import cli
from ddptrain.errors import UserError
from ddptrain.run import checkpoint as ckpt_io
from ddptrain.training.early_stopping import EarlyStopping
from helpers import in_process, metrics_records, model_spec

EPOCHS = 12
WANDERING = dict(lr=0.3, lr_schedule="constant")      # best test loss at epoch 3
SETTLING = dict(lr=0.1, lr_schedule="cosine")         # the test loss falls less and less
OPTIONS = dict(batch_size=16, dtype="float64", threads=1, keep=100, quiet=True)
TIMINGS = ("seconds", "samples_per_second")
SCHEDULES = {"wandering": WANDERING, "settling": SETTLING}
# the command line of the wandering run with --early-stop 3 (it stops after epoch 6)
ARGV = ["--model", model_spec(), "--batch-size", 16, "--dtype", "float64", "--threads", 1, "--lr",
        0.3, "--lr-schedule", "constant", "--epochs", EPOCHS, "--early-stop", 3]


def train(data, run_dir, **options):
    return ddptrain.train(model_spec(), data=data, run_dir=str(run_dir),
                          **{**OPTIONS, "epochs": EPOCHS, **options})


def epochs_of(run_dir):
    """The per-epoch records of metrics.jsonl, without the timings."""
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in metrics_records(run_dir)]


def expected_stop(records, metric, patience, min_delta):
    """``(epoch it stops after, best epoch)`` by the documented rule, or ``(None, best epoch)``
    if it trains every epoch: a value improves when it beats the best so far by more than
    min_delta (lower loss, higher accuracy), and PATIENCE epochs in a row without improvement
    stop the run (after the last epoch, the run ends anyway)."""
    sign = 1 if metric == "test_loss" else -1   # an accuracy, negated, is lower when better
    best, best_epoch = None, 0
    for record in records:
        value = sign * record[metric]
        if best is None or value < best - min_delta:
            best, best_epoch = value, record["epoch"]
        elif record["epoch"] - best_epoch >= patience and record["epoch"] < len(records):
            return record["epoch"], best_epoch
    return None, best_epoch


def command_line(argv, capsys):
    """``(status, stdout lines, stderr lines)`` of the command line ``argv``, in this process."""
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out.splitlines(), helpers.error_lines(err)


@pytest.fixture(scope="module")
def full(small_data, tmp_path_factory):
    """The records of 12 epochs without early stopping, for each learning rate schedule."""
    folder = tmp_path_factory.mktemp("full")
    runs = {}
    for name, schedule in SCHEDULES.items():
        train(small_data, folder / name, **schedule)
        runs[name] = epochs_of(folder / name)
    return runs


# (schedule, metric, patience, min delta, whether it must stop before the last epoch)
CASES = {
    "loss, patience 3": ("wandering", "test_loss", 3, 0.0, True),
    "loss, patience 5": ("wandering", "test_loss", 5, 0.0, True),
    "accuracy, patience 4": ("wandering", "test_accuracy", 4, 0.0, True),
    "loss falling, no min delta": ("settling", "test_loss", 2, 0.0, False),
    "loss falling, min delta 0.01": ("settling", "test_loss", 2, 0.01, True),
    "accuracy at 100%": ("settling", "test_accuracy", 3, 0.0, True),
}


@pytest.mark.parametrize("case", CASES)
def test_a_run_stops_after_the_epoch_the_rule_gives_on_the_uninterrupted_metrics(
        small_data, tmp_path, full, case):
    schedule, metric, patience, min_delta, stops = CASES[case]
    stop, best = expected_stop(full[schedule], metric, patience, min_delta)
    assert (stop is not None) == stops   # the case tests what it says

    result = train(small_data, tmp_path / "run", **SCHEDULES[schedule], early_stop=patience,
                   early_stop_metric=metric, early_stop_min_delta=min_delta)
    assert (result.exit_status, result.stopped_early_at, result.best_epoch) == (0, stop, best)
    assert result.stopped_early == stops and result.epochs == (stop or EPOCHS)
    # the same training, cut short: early stopping changes when it ends, nothing else
    assert epochs_of(tmp_path / "run") == full[schedule][:result.epochs]
    folder = tmp_path / "run" / "checkpoints"
    last = ckpt_io.newest_valid(folder)
    assert last.state["epoch"] == result.epochs and last.state["step"] == 15 * result.epochs
    assert last.state["early_stop"] == {"metric": metric, "min_delta": min_delta,
                                        "best": full[schedule][best - 1][metric],
                                        "best_epoch": best,
                                        "bad_epochs": result.epochs - best}
    # best.h5: the best epoch by the same metric, the one patience is counted from
    best_h5 = ckpt_io.load(folder / "best.h5")
    at_best = ckpt_io.load(ckpt_io.step_path(folder, 15 * best))
    assert best_h5.state["epoch"] == best
    for name in at_best.params:
        np.testing.assert_array_equal(best_h5.params[name], at_best.params[name])


def test_the_line_says_why_it_stopped_and_best_h5_holds_the_best_epoch(small_data, tmp_path,
                                                                       capsys):
    status, lines, errors = command_line(["--data", small_data, *ARGV, "--quiet", "--run-dir",
                                          tmp_path / "run"], capsys)
    assert (status, errors) == (0, [])
    assert ("early stopping: after 3 epochs in which the test loss has not improved on its best "
            "by more than 0 (one evaluation an epoch); best.h5 holds the best epoch by the test "
            "loss") in lines
    assert [line for line in lines if line.startswith("epoch ")][-1].startswith("epoch 6/12 done")
    best = metrics_records(tmp_path / "run")[2]["test_loss"]
    assert lines[-1].startswith(f"stopped early after epoch 6 of 12: the test loss has not "
                                f"improved on {best:.6g} (epoch 3) by more than 0 for 3 epochs, "
                                "--early-stop 3; checkpoint written, best.h5 holds epoch 3; test "
                                "accuracy ")
    folder = tmp_path / "run" / "checkpoints"
    assert ckpt_io.newest_valid(folder).path.endswith("step-00000090.h5")   # after epoch 6
    assert ckpt_io.load(folder / "best.h5").state["epoch"] == 3


@pytest.mark.parametrize("ranks", [2, 3])
def test_p_simulated_ranks_stop_after_the_epoch_one_process_stops_after(small_data, tmp_path,
                                                                       ranks):
    one = train(small_data, tmp_path / "one", **WANDERING, early_stop=3)
    many = train(small_data, tmp_path / "many", **WANDERING, early_stop=3, simulate_ranks=ranks)
    assert one.stopped_early_at == many.stopped_early_at == 6
    assert one.best_epoch == many.best_epoch == 3
    for mine, theirs in zip(many.metrics, one.metrics, strict=True):
        assert mine["test_accuracy"] == theirs["test_accuracy"]
        assert mine["test_loss"] == pytest.approx(theirs["test_loss"], rel=1e-9)



def test_a_run_stopped_by_a_signal_and_resumed_stops_where_the_uninterrupted_one_does(
        small_data, tmp_path):
    straight = train(small_data, tmp_path / "straight", **WANDERING, early_stop=3)
    # stopped in epoch 5 (after step 66), with epoch 4 already one without improvement
    stopped = train(small_data, tmp_path / "run", **WANDERING, early_stop=3,
                    callbacks=[helpers.SignalAtStep(65)])
    assert (stopped.exit_status, stopped.steps, stopped.stopped_early) == (3, 66, False)
    saved = ckpt_io.newest_valid(tmp_path / "run" / "checkpoints").state["early_stop"]
    assert (saved["best_epoch"], saved["bad_epochs"]) == (3, 1)
    resumed = train(small_data, tmp_path / "run", **WANDERING, early_stop=3, resume="auto")
    assert (resumed.exit_status, resumed.stopped_early_at, resumed.best_epoch) == (0, 6, 3)
    assert epochs_of(tmp_path / "run") == epochs_of(tmp_path / "straight")
    np.testing.assert_array_equal(helpers.final_params(tmp_path / "run"),
                                  helpers.final_params(tmp_path / "straight"))
    assert straight.stopped_early_at == 6


@pytest.fixture
def stopped_early(small_data, tmp_path):
    """A run folder whose run early stopping ended after epoch 6 (best: epoch 3)."""
    result = train(small_data, tmp_path / "run", **WANDERING, early_stop=3)
    assert result.stopped_early_at == 6
    return tmp_path / "run"


def folder_bytes(run_dir):
    return {path.name: path.read_bytes() for path in [run_dir / "metrics.jsonl",
                                                      *(run_dir / "checkpoints").iterdir()]}


def done_line(lines):
    """The lines after the start-up lines (the last of which describes early stopping)."""
    start = next(i for i, line in enumerate(lines) if line.startswith("early stopping: "))
    return lines[start + 1:]


def test_resuming_a_run_that_early_stopping_ended_says_it_is_done_and_trains_nothing(
        small_data, stopped_early, capsys):
    before = folder_bytes(stopped_early)
    status, lines, errors = command_line(["--data", small_data, *ARGV, "--run-dir",
                                          stopped_early, "--resume", "auto"], capsys)
    assert (status, errors) == (0, [])
    last = ckpt_io.newest_valid(stopped_early / "checkpoints")
    best = metrics_records(stopped_early)[2]["test_loss"]
    assert done_line(lines) == [
        f"resumed from {last.path}: the run is done: early stopping ended it after epoch 6 of 12: "
        f"the test loss has not improved on {best:.6g} (epoch 3) by more than 0 for 3 epochs, "
        "--early-stop 3; best.h5 holds epoch 3; nothing to train (a larger --early-stop, or "
        "none, trains on)"]
    assert folder_bytes(stopped_early) == before


def test_the_python_api_resumes_a_done_run_to_its_result_and_its_parameters(
        small_data, stopped_early):
    model = ddptrain.nn.Sequential.from_spec(model_spec(), dtype=np.float64, seed=9)
    result = ddptrain.train(model, data=small_data, run_dir=str(stopped_early), resume="auto",
                            **{**OPTIONS, "epochs": EPOCHS, **WANDERING, "early_stop": 3})
    assert (result.exit_status, result.stopped_early_at, result.best_epoch, result.steps,
            result.epochs) == (0, 6, 3, 90, 6)
    last = ckpt_io.newest_valid(stopped_early / "checkpoints")
    for name, array in model.named_params():
        np.testing.assert_array_equal(array, last.params[name])


def test_a_requeued_slurm_job_that_early_stopping_ended_does_not_train_again(
        small_data, stopped_early, capsys, monkeypatch):
    before = folder_bytes(stopped_early)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    status, lines, _ = command_line(["--data", small_data, *ARGV, "--run-dir", stopped_early],
                                    capsys)
    slurm, *lines = done_line(lines)   # the last start-up line: SLURM's
    assert slurm == "SLURM job 4242, restart 1 (resuming automatically)"
    assert status == 0 and len(lines) == 1 and "the run is done" in lines[0], lines
    assert folder_bytes(stopped_early) == before


def test_a_larger_patience_on_resuming_trains_on_as_if_it_had_been_given_from_the_start(
        small_data, stopped_early, tmp_path):
    straight = train(small_data, tmp_path / "straight", **WANDERING, early_stop=5)
    resumed = train(small_data, stopped_early, **WANDERING, early_stop=5, resume="auto")
    assert resumed.stopped_early_at == straight.stopped_early_at == 8
    assert epochs_of(stopped_early) == epochs_of(tmp_path / "straight")


def test_a_checkpoint_without_early_stopping_s_state_resumes_with_it_rebuilt_from_its_metrics(
        small_data, tmp_path):
    """A checkpoint written without --early-stop, as every checkpoint of ddptrain 0.3, has no
    state.early_stop: the state is rebuilt from the test losses of its records."""
    straight = train(small_data, tmp_path / "straight", **WANDERING, early_stop=3)
    train(small_data, tmp_path / "run", **WANDERING, epochs=5)   # epochs 4 and 5: no improvement
    old = ckpt_io.newest_valid(tmp_path / "run" / "checkpoints")
    assert "early_stop" not in old.state and old.state["epoch"] == 5
    resumed = train(small_data, tmp_path / "run", **WANDERING, early_stop=3, resume="auto")
    assert resumed.stopped_early_at == straight.stopped_early_at == 6
    assert epochs_of(tmp_path / "run") == epochs_of(tmp_path / "straight")


# ---------------------------------------------------------------- the rule and its state


def test_an_improvement_must_beat_the_best_by_more_than_the_minimum_change():
    loss = EarlyStopping(patience=2, min_delta=0.1)
    assert [loss.update({"epoch": e, "test_loss": v}) for e, v in
            enumerate([1.0, 0.95, 0.9, 0.85, 0.5], start=1)] == [True, False, False, True, True]
    accuracy = EarlyStopping(patience=2, metric="test_accuracy")
    assert [accuracy.update({"epoch": e, "test_accuracy": v}) for e, v in
            enumerate([0.5, 0.5, 0.6, 0.4], start=1)] == [True, False, True, False]


def test_patience_counts_the_epochs_without_improvement_since_the_best():
    rule = EarlyStopping(patience=2)
    dues = []
    for epoch, value in enumerate([1.0, 2.0, 0.5, 0.7, 0.6], start=1):
        rule.update({"epoch": epoch, "test_loss": value})
        dues.append(rule.due)
    assert dues == [False, False, False, False, True]
    assert (rule.best, rule.best_epoch, rule.bad_epochs) == (0.5, 3, 2)


def test_a_value_that_is_not_finite_never_improves():
    rule = EarlyStopping(patience=2)
    assert not rule.update({"epoch": 1, "test_loss": math.nan})
    assert not rule.update({"epoch": 2, "test_loss": math.inf})
    assert rule.due and rule.best is None
    assert rule.why_stopped() == "the test loss has not been finite for 2 epochs, --early-stop 2"


def test_a_saved_state_is_taken_for_the_same_settings_and_rebuilt_for_others():
    records = [{"epoch": e, "test_loss": v, "test_accuracy": 0.5} for e, v in
               enumerate([1.0, 0.9, 0.95], start=1)]
    saved = {"metric": "test_loss", "min_delta": 0.0, "best": 0.9, "best_epoch": 2,
             "bad_epochs": 7}   # not what the records give: shows which one was taken
    rule = EarlyStopping(patience=3)
    rule.restore(saved, records)
    assert (rule.best, rule.best_epoch, rule.bad_epochs) == (0.9, 2, 7)
    rule = EarlyStopping(patience=3, min_delta=0.2)
    rule.restore(saved, records)
    assert (rule.best, rule.best_epoch, rule.bad_epochs) == (1.0, 1, 2)
    rule = EarlyStopping(patience=3, metric="test_accuracy")
    rule.restore(None, records)
    assert (rule.best, rule.best_epoch, rule.bad_epochs) == (0.5, 1, 2)


# ---------------------------------------------------------------- options


@pytest.mark.parametrize("options, message", [
    (["--early-stop", "-1"], "--early-stop must not be negative, got -1"),
    (["--early-stop", "2.5"], "argument --early-stop: invalid int value: '2.5'"),
    (["--early-stop", "3000000000"], "--early-stop must be at most 2,147,483,647"),
    (["--early-stop", "2", "--early-stop-min-delta", "nan"],
     "--early-stop-min-delta must be a number, got nan"),
    (["--early-stop", "2", "--early-stop-min-delta", "inf"],
     "--early-stop-min-delta must be finite, got inf"),
    (["--early-stop", "2", "--early-stop-min-delta", "-0.1"],
     "--early-stop-min-delta must not be negative, got -0.1"),
    (["--early-stop", "2", "--early-stop-metric", "train_loss"],
     "argument --early-stop-metric: invalid choice: 'train_loss'"),
    (["--early-stop", "2", "--early-stop-metric", "test_accuracy", "--early-stop-min-delta", "1"],
     "--early-stop-min-delta 1 with --early-stop-metric test_accuracy: an accuracy (from 0 to 1) "
     "never improves by that much"),
    (["--early-stop-min-delta", "0.1"],
     "--early-stop-min-delta is early stopping's, which is off: give --early-stop PATIENCE too"),
    (["--early-stop", "0", "--early-stop-metric", "test_accuracy"],
     "--early-stop-metric is early stopping's, which is off"),
], ids=["negative", "fraction", "huge", "nan-delta", "inf-delta", "negative-delta",
        "unknown-metric", "accuracy-delta", "delta-alone", "metric-when-off"])
def test_early_stopping_options_that_cannot_work_are_refused_by_a_dry_run_in_one_line(
        small_data, tmp_path, capsys, options, message):
    status, lines = in_process(["--data", small_data, "--model", model_spec(), "--dry-run",
                                "--run-dir", tmp_path / "run", *options], capsys)
    assert status == 2 and len(lines) == 1 and message in lines[0], lines


@pytest.mark.parametrize("content, message", [
    ("early-stop = 2.5\n", "--early-stop must be int, got 2.5"),
    ("early-stop = 2\nearly-stop-metric = 'loss'\n",
     "--early-stop-metric must be one of test_loss, test_accuracy, got 'loss'"),
    ("early-stop = 2\nearly-stop-min-delta = 'small'\n",
     "--early-stop-min-delta must be float, got 'small'"),
])
def test_a_configuration_file_s_bad_early_stopping_keys_are_refused(small_data, tmp_path, capsys,
                                                                    content, message):
    (tmp_path / "run.toml").write_text(f"data = '{small_data}'\n{content}")
    status, lines = in_process(["--config", tmp_path / "run.toml", "--dry-run"], capsys)
    assert status == 2 and len(lines) == 1 and message in lines[0], lines


def test_early_stopping_is_set_in_a_configuration_file_and_announced(small_data, tmp_path, capsys):
    (tmp_path / "run.toml").write_text(f"data = '{small_data}'\nmodel = '{model_spec()}'\n"
                                       "[train]\nearly-stop = 4\nearly_stop_min_delta = 0.001\n"
                                       "early-stop-metric = 'test_accuracy'\n")
    status, lines, _ = command_line(["--config", tmp_path / "run.toml", "--dry-run", "--run-dir",
                                     tmp_path / "run"], capsys)
    assert status == 0
    assert any(line.startswith("early stopping: after 4 epochs in which the test accuracy has not "
                               "improved on its best by more than 0.001") for line in lines)


def test_the_python_api_refuses_what_the_command_line_refuses(small_data, tmp_path):
    with pytest.raises(UserError, match="^--early-stop must not be negative, got -2$"):
        train(small_data, tmp_path / "run", early_stop=-2)
    with pytest.raises(UserError, match="^ddptrain.train: --early-stop must be int, got 1.5$"):
        train(small_data, tmp_path / "run", early_stop=1.5)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- a real launcher


@pytest.mark.slow
def test_under_mpiexec_two_ranks_stop_early_and_resume_to_the_done_line(small_data, tmp_path):
    args = ["--data", small_data, *ARGV, "--quiet", "--run-dir", tmp_path / "run"]
    first = helpers.run(args, ranks=2, timeout=120)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("stopped early after epoch 6 of 12: ") == 1   # rank 0's line
    assert {"best.h5", "step-00000090.h5"} <= set(os.listdir(tmp_path / "run" / "checkpoints"))
    again = helpers.run([*args, "--resume", "auto"], ranks=2, timeout=120)
    assert again.returncode == 0, again.stderr
    lines = done_line(again.stdout.splitlines())
    assert len(lines) == 1 and "the run is done: early stopping ended it after epoch 6" in lines[0]
    assert [r["epoch"] for r in metrics_records(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["early_stop"] == 3
