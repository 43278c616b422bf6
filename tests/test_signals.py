"""Stop signals that come early, while the program starts, or twice: the run still stops after a
step, with a checkpoint and status 3, and nothing it wrote is lost. (Signals in the middle of a run
are in test_failures.py.)

Each test waits for the moment it aims at, as seen from outside, before it signals: a library the
process has loaded (its imports are under way), a line it printed, a file it wrote. A fixed sleep
aims at a moment that a loaded machine moves.
"""

import os
import signal

import pytest

import ddptrain
import helpers
from ddptrain.errors import EXIT_PREEMPTED
from ddptrain.run import checkpoint as ckpt_io
from helpers import metrics_records, model_spec
from launchers import launcher

pytestmark = [pytest.mark.slow, pytest.mark.mpiexec]   # every test here starts ddptrain processes

SMALL = ["--model", model_spec(), "--batch-size", "16", "--threads", "1", "--quiet"]

# Moments of the start-up, in order, each as a wait until the process is there. ddptrain's first
# line (ddptrain/__main__.py) runs before numpy is imported, and from it on a stop signal is
# remembered; the imports take a few tenths of a second, in which Python's defaults would kill the
# process (SIGTERM, SIGUSR1) or raise KeyboardInterrupt in an import (SIGINT).
START_UP = {
    "importing numpy": lambda run: helpers.wait_until_mapped(run.pid, "_multiarray_umath"),
    "importing h5py": lambda run: helpers.wait_until_mapped(run.pid, "libhdf5"),
    # the start-up line: the options, the data file and the model check out, training is being set
    # up
    "setting up": lambda run: run.wait_for_line(f"ddptrain {ddptrain.__version__}: "),
}


@pytest.mark.parametrize("name", ["SIGUSR1", "SIGTERM", "SIGINT"])
@pytest.mark.parametrize("moment", START_UP)
def test_a_stop_signal_at_any_moment_of_the_start_up_stops_the_run_after_a_step_with_a_checkpoint(
        small_data, tmp_path, started, name, moment):
    run = started(["--data", small_data, *SMALL, "--epochs", "200", "--run-dir", tmp_path / "run"])
    START_UP[moment](run)
    os.kill(run.pid, getattr(signal, name))
    out, err = run.communicate(timeout=60)
    assert run.returncode == EXIT_PREEMPTED, err
    assert f"stopped by {name} at step" in out and "Traceback" not in err and err == ""
    step = int(out.split(f"stopped by {name} at step ")[1].split(";")[0])
    assert ckpt_io.load(ckpt_io.step_path(tmp_path / "run" / "checkpoints",
                                          step)).state["step"] == step


def skip_unless_mpiexec_passes_on(name):
    if name not in launcher().stop_signals:
        pytest.skip(f"{launcher().name}'s mpiexec ends the job itself on {name} (SIGTERM to the "
                    f"ranks, SIGKILL 0.25 s later)")


@pytest.mark.parametrize("name", ["SIGINT", "SIGUSR1"])
def test_a_stop_signal_to_mpiexec_while_the_ranks_import_their_modules_stops_every_rank_with_3(
        small_data, tmp_path, started, name):
    """Ctrl-C (Hydra passes it on), or SIGUSR1 (Hydra and Open MPI do)."""
    skip_unless_mpiexec_passes_on(name)
    job = started(["--data", small_data, *SMALL, "--epochs", "200", "--run-dir", tmp_path / "run"],
                  ranks=2)
    for rank in helpers.rank_pids(job.pid, 2).values():
        # past ddptrain's first line, importing
        helpers.wait_until_mapped(rank, "_multiarray_umath")
    os.kill(job.pid, getattr(signal, name))   # mpiexec passes it on to every rank
    out, err = job.communicate(timeout=60)
    assert job.returncode == EXIT_PREEMPTED, out + err
    assert f"stopped by {name} at step" in out and "Traceback" not in err


def test_a_ctrl_c_that_kills_the_ranks_loses_no_checkpoint(small_data, tmp_path, started):
    """Hydra's second Ctrl-C kills the ranks at once (status 255), as Open MPI's first does (within
    half a second: it passes no Ctrl-C on), perhaps before the stop checkpoint: every checkpoint in
    the folder still loads, and --resume auto finishes the run."""
    run = tmp_path / "run"
    job = started(["--data", small_data, *SMALL, "--batch-size", "8", "--epochs", "3",
                   "--checkpoint-every", "5", "--run-dir", run], ranks=2,
                  faults="delay:seconds=0.05")
    job.wait_for_path(ckpt_io.step_path(run / "checkpoints", 5))   # training is under way
    os.kill(job.pid, signal.SIGINT)
    if "SIGINT" in launcher().stop_signals:
        job.wait_for_line("Press Ctrl-C again to force abort")   # Hydra passed the first one on
        os.kill(job.pid, signal.SIGINT)
    out, err = job.communicate(timeout=60)
    # Whichever status (launchers.py), the run did not go on to its end.
    assert job.returncode in launcher().forced_stop_statuses, err[-2000:]
    assert "finished: test accuracy" not in out
    for path in ckpt_io.step_checkpoints(run / "checkpoints"):
        ckpt_io.load(path)   # none half-written
    again = helpers.run(["--data", small_data, *SMALL, "--batch-size", "8", "--epochs", "3",
                         "--run-dir", run, "--resume", "auto"], ranks=2)
    assert again.returncode == 0, again.stderr
    assert [r["epoch"] for r in metrics_records(run)] == [1, 2, 3]
    assert not [name for name in os.listdir(run / "checkpoints") if ".tmp" in name]


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1", "SIGINT"])
@pytest.mark.parametrize("ranks", [None, 2], ids=["one-process", "two-ranks"])
def test_a_stop_signal_after_the_run_finished_leaves_its_status_0(small_data, tmp_path, started,
                                                                   name, ranks):
    """The run is over once it prints 'finished:': a signal then (a scheduler's SIGTERM at the end
    of the job, say) must not turn its status 0 into a kill; to mpiexec, which passes it on to the
    ranks, or to the one process."""
    if ranks:
        skip_unless_mpiexec_passes_on(name)
    run = started(["--data", small_data, *SMALL, "--epochs", "1", "--run-dir", tmp_path / "run"],
                  ranks=ranks)
    run.wait_for_line("finished: test accuracy")
    try:
        os.kill(run.pid, getattr(signal, name))
    except ProcessLookupError:
        pass   # it ended first: what the test asks of it, too
    out, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    assert "Traceback" not in err
