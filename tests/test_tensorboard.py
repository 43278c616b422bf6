"""--tensorboard: metrics.jsonl's records as TensorBoard events, read back with TensorBoard's own
reader (``EventAccumulator``) and held against metrics.jsonl.

Every record is a scalar at its step, and nothing else is; no step shows twice, after a signal, a
kill and a resume too; each parameter has a histogram at the end of each epoch; the configuration
is config.json's text; rank 0 alone writes the events and alone imports tensorboardX; without
tensorboardX, a run stops in one line before it writes anything.

The runs: 240 training rows in global batches of 16 (15 steps an epoch), with a step record every
10 steps (--tensorboard's default) unless said otherwise.
"""

import errno
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ddptrain
import helpers
from ddptrain import cli
from ddptrain.errors import EXIT_PREEMPTED, EXIT_USAGE
from ddptrain.run import checkpoint as ckpt_io
from ddptrain.run.config import load_toml, make_config
from ddptrain.run.rank0 import event_files
from helpers import error_lines, in_process, metrics_records, model_spec

SMALL = ["--model", model_spec(), "--batch-size", "16", "--threads", "1", "--quiet"]
STEP_SCALARS = ("train_loss", "train_accuracy", "lr", "grad_norm", "samples_per_second")
EPOCH_SCALARS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "seconds",
                 "samples_per_second")
TIMINGS = ("seconds", "samples_per_second")
NO_TENSORBOARDX = ("ddptrain: error: --tensorboard needs tensorboardX, which cannot be imported "
                   "here (")


def read_events(run_dir, purge=True):
    """RUN_DIR/tensorboard as TensorBoard reads it; ``purge=False``: with the events that a resumed
    run's SessionLog START tells TensorBoard to drop."""
    everything = {"scalars": 0, "histograms": 0, "tensors": 0}   # 0: keep all, sample none
    return EventAccumulator(str(run_dir / "tensorboard"), size_guidance=everything,
                            purge_orphaned_data=purge).Reload()


def scalars(events):
    """``{tag: [(step, value), ...]}``, in the order TensorBoard read them."""
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def as_events(records):
    """What the scalars must be: each number of each record of metrics.jsonl at the record's step,
    tagged ``<kind>/<key>``, in float32 as TensorBoard stores it."""
    expected = {}
    for record in records:
        kind = record.get("kind", "epoch")
        for key in STEP_SCALARS if kind == "step" else EPOCH_SCALARS:
            expected.setdefault(f"{kind}/{key}", []).append((record["step"],
                                                             float(np.float32(record[key]))))
    return expected


def without_timings(series):
    return {tag: points for tag, points in series.items() if tag.split("/")[1] not in TIMINGS}


@pytest.fixture(scope="module")
def trained_args(small_data):
    """The options of two epochs with --tensorboard in ``run_dir``."""
    return lambda run_dir: ["--data", small_data, *SMALL, "--epochs", "2", "--tensorboard",
                            "--run-dir", str(run_dir)]


@pytest.fixture(scope="module")
def trained(trained_args, tmp_path_factory):
    """Two epochs with --tensorboard, in this process."""
    run = tmp_path_factory.mktemp("tensorboard") / "run"
    assert cli.main(trained_args(run)) == 0
    return run


def test_every_record_of_metrics_jsonl_is_a_scalar_at_its_step_and_nothing_else_is(trained):
    records = metrics_records(trained)
    assert [(r.get("kind", "epoch"), r["step"]) for r in records] == [
        ("step", 10), ("epoch", 15), ("step", 20), ("step", 30), ("epoch", 30)]
    assert scalars(read_events(trained)) == as_events(records)
    assert len(event_files(trained / "tensorboard")) == 1


def test_each_parameter_has_a_histogram_at_the_end_of_each_epoch(trained):
    events = read_events(trained)
    final = ckpt_io.newest_valid(trained / "checkpoints")
    assert sorted(events.Tags()["histograms"]) == sorted(f"parameters/{n}" for n in final.params)
    for name, values in final.params.items():
        histograms = events.Histograms(f"parameters/{name}")
        assert [h.step for h in histograms] == [15, 30]
        last = histograms[-1].histogram_value   # of the parameters the final checkpoint holds
        assert (last.num, last.min, last.max) == (values.size, values.min(), values.max())
        assert sum(last.bucket) == values.size


def test_the_configuration_is_config_json_as_text_at_the_first_step(trained):
    [text] = read_events(trained).Tensors("config/text_summary")
    shown = text.tensor_proto.string_val[0].decode()
    assert text.step == 0
    # indented: TensorBoard's text dashboard (markdown) shows a block of code as it is
    assert all(line.startswith("    ") for line in shown.splitlines())
    assert json.loads(shown) == json.loads((trained / "config.json").read_text())


def test_tensorboard_asks_for_a_step_record_every_10_steps_unless_metrics_every_is_given(
        tmp_path):
    assert make_config({"tensorboard": True}).metrics_every == 10
    assert make_config({"tensorboard": True, "metrics_every": 3}).metrics_every == 3
    assert make_config({"tensorboard": True, "metrics_every": 0}).metrics_every == 0
    assert make_config({}).metrics_every == 0
    (tmp_path / "run.toml").write_text("tensorboard = true\n")
    assert load_toml(tmp_path / "run.toml") == {"tensorboard": True}


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]], ids=["run", "dry-run"])
def test_without_tensorboardx_a_run_stops_in_one_line_before_writing_anything(
        small_data, tmp_path, capsys, monkeypatch, dry_run):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)   # an import of it fails
    status, lines = in_process(["--data", small_data, *SMALL, "--tensorboard", "--run-dir",
                                tmp_path / "run", *dry_run], capsys)
    assert status == EXIT_USAGE and len(lines) == 1, lines
    assert lines[0].startswith(NO_TENSORBOARDX) and "pip install -e '.[tensorboard]'" in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_dry_run_with_tensorboard_writes_nothing(small_data, tmp_path, capsys):
    status, lines = in_process(["--data", small_data, *SMALL, "--tensorboard", "--dry-run",
                                "--run-dir", tmp_path / "run"], capsys)
    assert (status, lines) == (0, []) and not (tmp_path / "run").exists()


def test_a_tensorboard_folder_that_is_a_link_out_of_the_run_folder_is_refused(
        small_data, tmp_path, capsys):
    elsewhere, run = tmp_path / "elsewhere", tmp_path / "run"
    elsewhere.mkdir()
    run.mkdir()
    (run / "tensorboard").symlink_to(elsewhere)
    status, lines = in_process(["--data", small_data, *SMALL, "--tensorboard", "--run-dir", run],
                               capsys)
    assert status == EXIT_USAGE and len(lines) == 1, lines
    assert f"{run / 'tensorboard'} is a symbolic link (to {elsewhere})" in lines[0]
    assert list(elsewhere.iterdir()) == []


def test_a_failed_write_is_one_warning_and_the_run_goes_on_without_events(
        small_data, tmp_path, capsys, monkeypatch):
    from tensorboardX.event_file_writer import EventsWriter
    write_event, written = EventsWriter.write_event, []

    def until_the_disk_is_full(self, event):
        if len(written) == 20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(event)
        return write_event(self, event)

    monkeypatch.setattr(EventsWriter, "write_event", until_the_disk_is_full)
    run = tmp_path / "run"
    status, lines = in_process(["--data", small_data, *SMALL, "--epochs", "2", "--tensorboard",
                                "--run-dir", run], capsys)
    assert status == 0
    assert lines == [f"warning: could not write TensorBoard's events in {run / 'tensorboard'}: "
                     "No space left on device; the run goes on without them (metrics.jsonl "
                     "holds every record)"]
    records = metrics_records(run)
    assert [r["epoch"] for r in records if "kind" not in r] == [1, 2]
    expected = as_events(records)
    for tag, points in scalars(read_events(run)).items():   # those written before: right ones
        assert points == expected[tag][:len(points)]


def test_the_python_api_writes_them_from_rank_0_of_simulated_ranks(small_data, tmp_path):
    run = tmp_path / "run"
    result = ddptrain.train(model_spec(), data=small_data, epochs=1, batch_size=16,
                            tensorboard=True, simulate_ranks=2, threads=1, run_dir=str(run),
                            quiet=True)
    assert result.exit_status == 0 and len(event_files(run / "tensorboard")) == 1
    assert scalars(read_events(run)) == as_events(metrics_records(run))


def test_resumed_from_an_earlier_checkpoint_the_events_after_it_are_replaced(
        trained, trained_args, tmp_path, capsys):
    """The finished run resumed from its epoch-1 checkpoint (step 15): its events of steps 16 to 30
    are on disk, and the resumed run's, of the same steps, replace them; so do those of step 15
    itself (the epoch's record and histograms), and the configuration of the new start."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    epoch_1 = ckpt_io.step_path(run / "checkpoints", 15)
    status, lines = in_process([*trained_args(run), "--resume", epoch_1], capsys)
    assert (status, lines) == (0, [])
    written = read_events(run, purge=False)
    steps = [step for step, _ in scalars(written)["step/train_loss"]]
    assert steps == [10, 20, 30, 20, 30]   # the finished run's, then the resumed run's
    assert [h.step for h in written.Histograms("parameters/linear1.weight")] == [15, 30, 15, 30]
    events = read_events(run)
    assert scalars(events) == as_events(metrics_records(run))
    assert [h.step for h in events.Histograms("parameters/linear1.weight")] == [15, 30]
    assert [text.step for text in events.Tensors("config/text_summary")] == [0, 15]


# -- stopped, killed and resumed; several ranks ----------------------------------------------------


@pytest.mark.slow
def test_a_run_stopped_by_a_signal_and_resumed_has_the_events_of_an_uninterrupted_run(
        small_data, tmp_path):
    train = ["--data", small_data, *SMALL, "--epochs", "3", "--tensorboard", "--metrics-every", "5"]
    whole, run = tmp_path / "whole", tmp_path / "run"
    assert helpers.run([*train, "--run-dir", whole]).returncode == 0
    # SIGUSR1 before step 20: the run stops after it, with a checkpoint at step 21
    stopped = helpers.run([*train, "--run-dir", run], faults="signal:step=20:SIGUSR1")
    assert stopped.returncode == EXIT_PREEMPTED, stopped.stderr
    resumed = helpers.run([*train, "--run-dir", run, "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr

    events = read_events(run)
    assert scalars(events) == as_events(metrics_records(run))
    assert without_timings(scalars(events)) == without_timings(scalars(read_events(whole)))
    assert [h.step for h in events.Histograms("parameters/linear1.weight")] == [15, 30, 45]
    # the configuration of each start: at step 0, and at the step the run resumed from
    assert [text.step for text in events.Tensors("config/text_summary")] == [0, 21]
    assert len(event_files(run / "tensorboard")) == 2


@pytest.mark.slow
def test_a_killed_run_resumed_shows_each_step_once_with_the_resumed_run_s_values(
        small_data, tmp_path):
    """Killed after step 27 (rank 1 fails: the job is aborted), the run had flushed its events up
    to its newest checkpoint, at step 24, before writing it. The resumed run writes those of step
    24 again, and TensorBoard shows them once: the purge at the start of its event file drops the
    killed run's."""
    train = ["--data", small_data, *SMALL, "--epochs", "3", "--tensorboard", "--metrics-every", "2",
             "--checkpoint-every", "8", "--run-dir", tmp_path / "run"]
    run = tmp_path / "run"
    killed = helpers.run(train, ranks=2, faults="raise:rank=1:step=27")
    assert killed.returncode != 0
    assert ckpt_io.newest_valid(run / "checkpoints").state["step"] == 24
    assert scalars(read_events(run))["step/train_loss"][-1][0] >= 24   # on disk: the checkpoint's
    resumed = helpers.run([*train, "--resume", "auto"], ranks=2)
    assert resumed.returncode == 0, resumed.stderr

    written = [step for step, _ in scalars(read_events(run, purge=False))["step/train_loss"]]
    assert written.count(24) == 2 and written.count(22) == 1
    events = read_events(run)
    assert scalars(events) == as_events(metrics_records(run))
    assert [h.step for h in events.Histograms("parameters/linear1.weight")] == [15, 30, 45]


@pytest.mark.slow
def test_two_ranks_write_one_event_file_with_the_values_of_one_process(small_data, tmp_path):
    """Through ``ddptrain.train``, with rank 1 unable to import tensorboardX
    (``tests/tensorboard_job.py``): it never tries."""
    job = [sys.executable, str(helpers.ROOT / "tests" / "tensorboard_job.py"), small_data]
    for argv, run in ((job, "one"), ([*helpers.mpiexec(2), *job], "two")):
        proc = subprocess.run([*argv, str(tmp_path / run)], capture_output=True, text=True,
                              timeout=120, env=helpers.clean_env())
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (scalars(read_events(tmp_path / run)) for run in ("one", "two"))
    assert len(event_files(tmp_path / "two" / "tensorboard")) == 1
    assert two == as_events(metrics_records(tmp_path / "two"))
    assert without_timings(one).keys() == without_timings(two).keys()
    for tag, points in without_timings(one).items():
        assert [step for step, _ in two[tag]] == [step for step, _ in points]
        assert [value for _, value in two[tag]] == pytest.approx([v for _, v in points], rel=1e-6)


@pytest.mark.slow
def test_without_tensorboardx_the_command_exits_with_status_2_and_one_line(small_data, tmp_path):
    blocked = ("import sys; sys.modules['tensorboardX'] = None; "
               "from ddptrain.__main__ import main; sys.exit(main())")
    proc = subprocess.run([sys.executable, "-c", blocked, "--data", small_data, *SMALL,
                           "--tensorboard", "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120, env=helpers.clean_env())
    assert proc.returncode == EXIT_USAGE
    [line] = error_lines(proc.stderr)
    assert line.startswith(NO_TENSORBOARDX)
    assert not (tmp_path / "run").exists()
