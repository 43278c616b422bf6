"""Preemption, crashes, numerical faults and bad input: the job always ends within seconds, with a
documented status, a clear message, and its checkpoints intact.

Runs go through ``python -m ddptrain`` (under mpiexec where ranks matter). Faults that cannot be
provoked from outside are injected through ddptrain's callbacks by ``tests/inject.py``. Training
that must last long enough to be signalled sleeps DELAY seconds before each step.
"""

import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

import helpers
from ddptrain.errors import EXIT_FAILURE, EXIT_PREEMPTED, EXIT_USAGE
from ddptrain.run import checkpoint as ckpt_io
from helpers import error_lines, flip_a_byte_of, make_dataset, model_spec
from launchers import launcher

pytestmark = [pytest.mark.slow, pytest.mark.mpiexec]   # every test here starts ddptrain processes

DELAY = 0.05          # seconds per step in the runs that get signalled: 30 steps per epoch, 1.5 s
SECONDS_TO_STOP = 10  # what "within seconds" means here; measured: well under 1 s


def args(data, run_dir, *extra):
    return ["--data", data, "--model", model_spec(), "--batch-size", "16", "--epochs", "3",
            "--threads", "1", "--quiet", "--run-dir", run_dir, *extra]


def slow_args(data, run_dir):
    """Two epochs of 30 steps, a checkpoint every 5 steps: the first one shows that training is
    under way."""
    return args(data, run_dir, "--batch-size", "8", "--epochs", "2", "--checkpoint-every", "5",
                "--keep", "100")


@pytest.fixture
def background(started):
    """Start ddptrain in the background, each step DELAY seconds long; whatever still runs at the
    end is killed (``started``)."""
    def start(arguments, ranks=None, fault=None):
        return started(arguments, ranks=ranks,
                       faults=",".join(filter(None, [f"delay:seconds={DELAY}", fault])))

    return start


def finish(proc, since):
    """Wait for ``proc``; returns (stdout, stderr, seconds since ``since``)."""
    out, err = proc.communicate(timeout=60)
    return out, err, time.monotonic() - since


# ---------------------------------------------------------------- preemption


def test_a_signal_to_one_rank_mid_epoch_stops_every_rank_with_a_checkpoint_and_status_3(
        small_data, tmp_path, background):
    proc = background(slow_args(small_data, tmp_path / "run"), ranks=3)
    proc.wait_for_path(ckpt_io.step_path(tmp_path / "run" / "checkpoints", 5))
    os.kill(helpers.rank_pids(proc.pid, 3)[1], signal.SIGUSR1)
    signalled = time.monotonic()
    out, err, seconds = finish(proc, signalled)
    assert proc.returncode == EXIT_PREEMPTED, err
    assert seconds < SECONDS_TO_STOP
    newest = ckpt_io.newest_valid(tmp_path / "run" / "checkpoints")
    step = newest.state["step"]
    assert f"stopped by a signal on another rank at step {step}; checkpoint written" in out
    assert newest.state["epoch"] == 0 and 5 < newest.state["step_in_epoch"] < 30     # mid-epoch
    assert "error" not in err


@pytest.mark.parametrize("ranks, name", [(2, "SIGTERM"), (2, "SIGINT"), (2, "SIGUSR1"),
                                         (None, "SIGTERM")],
                         ids=["mpiexec-SIGTERM", "mpiexec-ctrl-c", "mpiexec-SIGUSR1",
                              "single-process-SIGTERM"])
def test_sigterm_or_ctrl_c_stops_the_job_with_a_checkpoint_and_status_3(
        small_data, tmp_path, background, ranks, name):
    if ranks and name not in launcher().stop_signals:
        pytest.skip(f"{launcher().name}'s mpiexec ends the job itself on {name} (SIGTERM to the "
                    f"ranks, SIGKILL 0.25 s later)")
    proc = background(slow_args(small_data, tmp_path / "run"), ranks=ranks)
    proc.wait_for_path(ckpt_io.step_path(tmp_path / "run" / "checkpoints", 5))
    os.kill(proc.pid, getattr(signal, name))          # mpiexec passes it on to every rank
    out, err, seconds = finish(proc, time.monotonic())
    assert proc.returncode == EXIT_PREEMPTED, err
    assert seconds < SECONDS_TO_STOP
    step = ckpt_io.newest_valid(tmp_path / "run" / "checkpoints").state["step"]
    assert f"stopped by {name} at step {step}; checkpoint written; resume with --resume auto" in out


def test_more_signals_during_the_shutdown_neither_hang_nor_change_the_status(
        small_data, tmp_path, background):
    proc = background(slow_args(small_data, tmp_path / "run"), ranks=2)
    proc.wait_for_path(ckpt_io.step_path(tmp_path / "run" / "checkpoints", 5))
    pids = helpers.rank_pids(proc.pid, 2).values()
    started = time.monotonic()
    while proc.poll() is None and time.monotonic() - started < SECONDS_TO_STOP:
        # SIGTERM to every rank every few ms until it ends
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(0.003)
    out, err, seconds = finish(proc, started)
    assert proc.returncode == EXIT_PREEMPTED, err
    assert seconds < SECONDS_TO_STOP
    assert ckpt_io.newest_valid(tmp_path / "run" / "checkpoints") is not None


# ---------------------------------------------------------------- no hangs


@pytest.mark.parametrize("runner", [[], ["-m", "mpi4py"]], ids=["python", "python -m mpi4py"])
def test_an_exception_on_rank_1_of_3_ends_the_job_within_seconds_naming_the_rank_once(
        small_data, tmp_path, runner):
    command = [*helpers.mpiexec(3), sys.executable, *runner, helpers.INJECT,
               "raise:rank=1:step=3", *args(small_data, tmp_path / "run")]
    started = time.monotonic()
    proc = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=60,
                          cwd=helpers.ROOT, env=helpers.clean_env())
    seconds = time.monotonic() - started
    assert proc.returncode == EXIT_FAILURE, proc.stderr
    assert seconds < 20                                 # start-up included; measured: about 1 s
    assert proc.stderr.count("ddptrain: error on rank 1 of 3: InjectedFault: injected on rank 1 "
                             "before step 3") == 1
    assert proc.stderr.count("ddptrain: error") == 1   # the ranks left waiting print nothing
    assert "[rank 1] Traceback" in proc.stderr


def test_a_rank_killed_by_sigkill_ends_the_job(small_data, tmp_path, background):
    proc = background(slow_args(small_data, tmp_path / "run"), ranks=3)
    proc.wait_for_path(ckpt_io.step_path(tmp_path / "run" / "checkpoints", 5))
    os.kill(helpers.rank_pids(proc.pid, 3)[1], signal.SIGKILL)
    out, err, seconds = finish(proc, time.monotonic())
    # mpiexec kills the other ranks, and says why: Hydra exits 9, Open MPI's 128 + 9
    assert proc.returncode == launcher().killed_status(signal.SIGKILL)
    assert launcher().killed_report in out + err and "signal 9" in out + err
    assert seconds < SECONDS_TO_STOP
    assert ckpt_io.newest_valid(tmp_path / "run" / "checkpoints").state["step"] >= 5


# ---------------------------------------------------------------- numerical faults


def test_a_nan_stops_training_naming_the_step_and_keeps_the_last_good_checkpoint(
        small_data, tmp_path):
    proc = helpers.run(args(small_data, tmp_path / "run"), ranks=2, timeout=60,
                       faults="nan:step=20:rank=1")
    assert proc.returncode == EXIT_FAILURE
    [line] = error_lines(proc.stderr)
    assert line.startswith("ddptrain: error: NumericalError: NaN or Inf in the loss or gradients "
                           "at step 20 ")
    assert "The checkpoints written before are kept (the newest: step 15)" in line
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(os.listdir(folder)) == ["best.h5", "step-00000015.h5"]
    last_good = ckpt_io.newest_valid(folder)            # what --resume auto would take
    assert last_good.state["step"] == 15
    assert all(np.isfinite(a).all() for a in last_good.params.values())


# ---------------------------------------------------------------- bad input, and a failed write


def test_a_nan_before_any_checkpoint_says_that_none_was_written(small_data, tmp_path):
    proc = helpers.run(args(small_data, tmp_path / "run"), timeout=60, faults="nan:step=3")
    assert proc.returncode == EXIT_FAILURE
    [line] = error_lines(proc.stderr)    # no numpy warnings before it either
    assert "at step 3 " in line and line.endswith("No checkpoint was written: start again with a "
                                                  "lower --lr")
    assert os.listdir(tmp_path / "run" / "checkpoints") == []


def test_a_failed_checkpoint_write_stops_every_rank_and_keeps_the_previous_checkpoint(
        small_data, tmp_path):
    proc = helpers.run(args(small_data, tmp_path / "run"), ranks=2, timeout=60,
                       faults="checkpoint-write:step=30")   # full disk, before the rename
    assert proc.returncode == EXIT_USAGE
    [line] = error_lines(proc.stderr)
    folder = tmp_path / "run" / "checkpoints"
    assert line == (f"ddptrain: error: could not write checkpoint {folder / 'step-00000030.h5'} "
                    f"(the previous ones are intact): No space left on device (injected by the "
                    f"test)")
    # no temporary file either
    assert sorted(os.listdir(folder)) == ["best.h5", "step-00000015.h5"]
    assert ckpt_io.load(folder / "step-00000015.h5").state["step"] == 15     # checksum verified
    assert ckpt_io.load(folder / "best.h5").state["step"] == 15


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A data file, and the epoch-1 checkpoints of a 64-16-10 and of a 64-8-10 model trained on
    it."""
    folder = tmp_path_factory.mktemp("trained")
    data = make_dataset(folder / "data.h5")
    for model in ("64-16-10", "64-8-10"):
        proc = helpers.run(args(data, folder / model, "--epochs", "1", "--model", model),
                           timeout=60)
        assert proc.returncode == 0, proc.stderr
    return folder


def bad_data(tmp_path, change):
    path = shutil.copy(make_dataset(tmp_path / "good.h5"), tmp_path / "bad.h5")
    change(path)
    return path


def edit(change):
    def apply(path):
        with h5py.File(path, "a") as f:
            change(f)
    return apply


def replace(name, value):
    def change(f):
        del f[name]
        f[name] = value
    return edit(change)


def truncate(path):
    os.truncate(path, os.path.getsize(path) // 2)


def garbage(path):
    with open(path, "wb") as f:
        f.write(os.urandom(4096))


def copy_checkpoint(trained, tmp_path, model="64-16-10", change=None):
    path = shutil.copy(trained / model / "checkpoints" / "step-00000015.h5", tmp_path / "given.h5")
    if change:
        change(path)
    return path


def labels_with(value):
    labels = np.zeros(60, np.uint8)
    labels[7] = value
    return labels


# (what is wrong, extra arguments given tmp_path and the trained fixture, what the one line says)
BAD_INPUTS = [
    ("data file missing", lambda t, r: ["--data", t / "absent.h5"], "absent.h5: no such file"),
    ("data file corrupt", lambda t, r: ["--data", bad_data(t, garbage)],
     "bad.h5: not an HDF5 file"),
    ("data file truncated", lambda t, r: ["--data", bad_data(t, truncate)], "truncated"),
    ("dataset missing",
     lambda t, r: ["--data", bad_data(t, edit(lambda f: f.__delitem__("test/labels")))],
     "bad.h5: dataset 'test/labels' is missing"),
    ("images of the wrong shape",
     lambda t, r: ["--data", bad_data(t, replace("train/images", np.zeros((240, 64), np.uint8)))],
     "bad.h5: 'train/images' must be uint8 (N, H, W) or (N, C, H, W), found 2-D uint8 of shape "
     "(240, 64)"),
    ("label out of range",
     lambda t, r: ["--data", bad_data(t, replace("test/labels", labels_with(10)))],
     "bad.h5: label 10 in 'test/labels' is outside 0..9"),
    ("checkpoint corrupt", lambda t, r: ["--resume", copy_checkpoint(r, t, change=flip_a_byte_of)],
     "given.h5: checksum mismatch, the checkpoint is corrupt"),
    ("checkpoint truncated", lambda t, r: ["--resume", copy_checkpoint(r, t, change=truncate)],
     "given.h5: truncated or extended checkpoint"),
    ("checkpoint of another model",
     lambda t, r: ["--resume", copy_checkpoint(r, t, model="64-8-10")],
     "given.h5: checkpoint is for model 64-8-10, not 64-16-10 (parameter linear1.bias is 8 there, "
     "16 here)"),
    ("checkpoint missing", lambda t, r: ["--resume", t / "absent.h5"],
     "absent.h5: no such checkpoint"),
    ("checkpoint is not one", lambda t, r: ["--resume", r / "data.h5"],
     "data.h5: not a ddptrain checkpoint"),
    ("run folder unwritable",
     lambda t, r: ["--run-dir", shutil.copy(r / "data.h5", t / "a-file") / "run"],
     "cannot write to the run folder"),
    ("negative batch size", lambda t, r: ["--batch-size", "-16"],
     "--batch-size must be positive, got -16"),
    ("unknown model spec", lambda t, r: ["--model", "64-x-10"],
     "--model '64-x-10': 'x' (token 2) is not a layer size"),
    ("model that does not fit the data", lambda t, r: ["--model", "784-16-10"],
     "--model 784-16-10 does not fit"),
    ("keep zero checkpoints", lambda t, r: ["--keep", "0"], "--keep must be positive, got 0"),
    ("negative checkpoint cadence", lambda t, r: ["--checkpoint-every", "-5"],
     "--checkpoint-every must not be negative, got -5"),
]


@pytest.mark.parametrize("make_args, message", [case[1:] for case in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_refused_with_one_line_and_status_2(trained, tmp_path, make_args, message):
    extra = make_args(tmp_path, trained)
    given = [p for p in extra if os.path.isfile(str(p))]
    before = {str(p): open(p, "rb").read() for p in given}
    proc = helpers.run(args(trained / "data.h5", tmp_path / "run", *extra), timeout=60)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    [line] = error_lines(proc.stderr)
    assert line.startswith("ddptrain: error: ") and message in line
    # nothing given is changed or removed
    assert {p: open(p, "rb").read() for p in before} == before


def test_a_global_batch_smaller_than_the_ranks_is_refused_once_with_status_2(small_data, tmp_path):
    proc = helpers.run(args(small_data, tmp_path / "run", "--batch-size", "2"), ranks=3, timeout=60)
    assert proc.returncode == EXIT_USAGE
    assert error_lines(proc.stderr) == ["ddptrain: error: --batch-size 2 is smaller than the "
                                        "number of ranks (3): every rank needs at least one sample "
                                        "per step"]


SLOW_RANK_0 = """
import sys, time
from ddptrain.errors import UserError
from ddptrain.run.ending import end_rank
from ddptrain.distributed.launcher import rank_and_size
rank = rank_and_size()[0]
if rank == 0:
    time.sleep(1.0)   # rank 0 is the last to meet the error
error = UserError("the same on every rank")
error.all_ranks = True
status = end_rank(str(error), error, None)
with open(f"{sys.argv[1]}.{rank}", "w") as done:   # when this rank went on to its exit
    done.write(repr(time.monotonic()))
sys.exit(status)
"""


def test_an_error_every_rank_meets_is_printed_by_rank_0_before_any_rank_exits(tmp_path):
    """Open MPI's mpiexec ends the job at the first non-zero exit: a rank quicker than rank 0 would
    take rank 0's line with it."""
    proc = subprocess.run([*helpers.mpiexec(2), sys.executable, "-c", SLOW_RANK_0,
                           tmp_path / "exit"], capture_output=True, text=True, timeout=60,
                          env=helpers.clean_env(), cwd=helpers.ROOT)
    assert proc.returncode == EXIT_USAGE
    assert error_lines(proc.stderr) == ["ddptrain: error: the same on every rank"]
    rank_0, rank_1 = (float((tmp_path / f"exit.{rank}").read_text()) for rank in (0, 1))
    assert rank_1 >= rank_0 - 0.5   # rank 1 waited for rank 0's second of sleep


def test_a_failed_write_of_best_is_one_warning_and_the_run_and_its_resumption_go_on(
        small_data, tmp_path):
    """A disk with room for the step checkpoints but not for best.h5: the warning names best.h5,
    the step checkpoints are pruned to --keep, and the run resumes on that disk."""
    run, folder = tmp_path / "run", tmp_path / "run" / "checkpoints"
    proc = helpers.run(args(small_data, run, "--keep", "1"), ranks=2, timeout=60,
                       faults="best-write")
    assert proc.returncode == 0, proc.stderr
    lines = error_lines(proc.stderr)
    assert lines and all(line.startswith(f"warning: could not write {folder / 'best.h5'}: No space "
                                         "left on device (injected by the test); it is left as "
                                         "it was, and step-") for line in lines)
    assert sorted(os.listdir(folder)) == ["step-00000045.h5"]
    again = helpers.run(args(small_data, run, "--keep", "1", "--epochs", "4", "--resume", "auto"),
                        ranks=2, timeout=60, faults="best-write")
    assert again.returncode == 0, again.stderr
    assert sorted(os.listdir(folder)) == ["step-00000060.h5"]


def test_a_job_that_aborts_leaves_no_shared_memory_segment_behind(small_data, tmp_path):
    """An abort skips MPI's own clean-up: the aborting rank removes the names of the node's
    shared-memory segments (MPICH's, and the shared-memory exchange's windows) it maps, or /dev/shm,
    which is memory, would keep a segment per failed job."""
    before = helpers.mpi_segments()
    done = helpers.run(args(small_data, tmp_path / "run"), ranks=2, faults="raise:rank=1:step=3")
    assert done.returncode == EXIT_FAILURE, done.stderr
    assert helpers.mpi_segments() - before == set()
