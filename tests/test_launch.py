"""``ddptrain launch -n N``: mpiexec under a supervisor that passes a stop signal on only once every
rank can take it, so that a signal at any moment of a job stops it after a step with a checkpoint
(status 3): never lost, never a crash.

Why it exists: MPICH's mpiexec (Hydra) drops a signal that comes before it has started its ranks
(the job then trains to its end), and passes one that comes while the ranks start Python on to
them, whose defaults kill them (or, for SIGINT, raise KeyboardInterrupt in Python's own imports,
which can hang the job). Each test waits for the moment it aims at, seen from outside (mpiexec
started, the ranks started), before it signals.
"""

import os
import signal
import sys
import time

import pytest

import helpers
import launchers
from ddptrain.errors import EXIT_PREEMPTED
from ddptrain.run import checkpoint as ckpt_io
from helpers import final_params, model_spec

SMALL = ["--model", model_spec(), "--batch-size", "16", "--threads", "1", "--quiet"]
HELD = "held until every rank can take it"


@pytest.fixture
def launched():
    """Starts ``python -m ddptrain launch -n RANKS ARGS`` in the background; whatever of the job
    still runs when the test ends is killed (mpiexec runs in a process group of its own)."""
    jobs = []

    def launch(args, ranks=2):
        argv = [sys.executable, "-m", "ddptrain", "launch", "-n", str(ranks), *map(str, args)]
        jobs.append(helpers.Running(argv, env=helpers.clean_env(), cwd=helpers.ROOT))
        return jobs[-1]

    yield launch
    for job in jobs:
        if job.poll() is None:
            for pid in helpers.descendants(job.pid) + [job.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            job.communicate()


def mpiexec_started(job, timeout=30):
    """Until the launcher has started mpiexec (it has a child): its signal handlers are in place."""
    deadline = time.monotonic() + timeout
    while not helpers.descendants(job.pid):
        assert job.poll() is None and time.monotonic() < deadline, "mpiexec did not start"
        time.sleep(0.001)


def passed_on(name):
    """The signal the ranks get for ``name``: Open MPI's mpiexec would end the job itself on SIGTERM
    and SIGINT, so the launcher passes SIGUSR1 on instead."""
    return name if launchers.launcher().family != "openmpi" else "SIGUSR1"


def assert_stopped_with_a_checkpoint(job, run_dir, name):
    name = passed_on(name)
    out, err = job.communicate(timeout=120)
    assert job.returncode == EXIT_PREEMPTED, err
    assert f"stopped by {name} at step" in out and "Traceback" not in err, err
    step = int(out.split(f"stopped by {name} at step ")[1].split(";")[0])
    checkpoint = ckpt_io.step_path(run_dir / "checkpoints", step)
    assert ckpt_io.load(checkpoint).state["step"] == step
    return err


@pytest.mark.slow
@pytest.mark.mpiexec   # under Open MPI too: its mpiexec treats signals otherwise
@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1", "SIGINT"])
def test_a_stop_signal_while_mpiexec_starts_stops_the_run_after_a_step_with_a_checkpoint(
        small_data, tmp_path, launched, name):
    # the moment a plain mpiexec drops the signal: it has started no rank yet
    job = launched(["--data", small_data, *SMALL, "--epochs", "200", "--run-dir", tmp_path / "run"])
    mpiexec_started(job)
    os.kill(job.pid, getattr(signal, name))
    err = assert_stopped_with_a_checkpoint(job, tmp_path / "run", name)
    assert f"ddptrain launch: {name} {HELD}" in err


@pytest.mark.slow
@pytest.mark.mpiexec   # under Open MPI too: its mpiexec treats signals otherwise
@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_while_the_ranks_start_python_stops_the_run_after_a_step(
        small_data, tmp_path, launched, name):
    # the moment a plain mpiexec would pass it on to ranks that cannot take it yet
    job = launched(["--data", small_data, *SMALL, "--epochs", "200", "--run-dir", tmp_path / "run"])
    helpers.rank_pids(job.pid, 2, timeout=60)
    os.kill(job.pid, getattr(signal, name))
    assert_stopped_with_a_checkpoint(job, tmp_path / "run", name)


@pytest.mark.slow
@pytest.mark.mpiexec   # under Open MPI too: its mpiexec treats signals otherwise
def test_a_stop_signal_during_training_is_passed_on_at_once(small_data, tmp_path, launched):
    job = launched(["--data", small_data, "--model", model_spec(), "--batch-size", "16",
                    "--threads", "1", "--epochs", "200", "--log-every", "1",
                    "--run-dir", tmp_path / "run"])
    job.wait_for_line("epoch 1/200  step ")
    os.kill(job.pid, signal.SIGTERM)
    err = assert_stopped_with_a_checkpoint(job, tmp_path / "run", "SIGTERM")
    assert HELD not in err


@pytest.mark.slow
@pytest.mark.mpiexec   # under Open MPI too: its mpiexec treats signals otherwise
def test_a_signal_at_any_moment_ends_the_job_with_a_checkpoint_or_before_it_started_anything(
        small_data, tmp_path, launched):
    # From the launcher's first line on: status 3 and a checkpoint. Before it (Python starting,
    # a few hundredths of a second) the signal's default action ends the launcher, which has then
    # started nothing. Never a run that trains on (status 0), never a hang.
    for delay_ms in (0, 10, 20, 30, 45, 60, 90, 150, 300):
        run_dir = tmp_path / f"run-{delay_ms}"
        job = launched(["--data", small_data, *SMALL, "--epochs", "50", "--run-dir", run_dir])
        time.sleep(delay_ms / 1000)
        os.kill(job.pid, signal.SIGTERM)
        out, err = job.communicate(timeout=120)
        if job.returncode == -signal.SIGTERM:
            assert not run_dir.exists() and not helpers.descendants(job.pid), delay_ms
        else:
            assert job.returncode == EXIT_PREEMPTED, (delay_ms, err)
            assert f"stopped by {passed_on('SIGTERM')} at step 1;" in out, (delay_ms, out)


@pytest.mark.slow
@pytest.mark.mpiexec   # under Open MPI too: its mpiexec treats signals otherwise
def test_a_second_signal_passes_a_held_one_on_when_the_ranks_never_say_they_can_take_it(
        tmp_path, launched):
    script = tmp_path / "no_training.py"   # a script of the user's that never calls train()
    script.write_text("import time\ntime.sleep(120)\n")
    job = launched([script])
    helpers.rank_pids(job.pid, 2, timeout=60)
    os.kill(job.pid, signal.SIGTERM)
    job.wait_for_line(f"SIGTERM {HELD} (send it again to pass it on now)", stream="stderr")
    time.sleep(0.5)
    assert job.poll() is None   # held: the ranks never reported
    os.kill(job.pid, signal.SIGTERM)
    job.communicate(timeout=60)   # passed on: SIGTERM's default action ends the ranks
    assert job.returncode != 0


@pytest.mark.slow
@pytest.mark.mpiexec   # under Open MPI too: its mpiexec treats signals otherwise
def test_the_launched_job_trains_what_mpiexec_trains_and_ends_with_its_status(
        small_data, tmp_path, launched):
    args = ["--data", small_data, *SMALL, "--epochs", "2"]
    job = launched([*args, "--run-dir", tmp_path / "launched"])
    job.communicate(timeout=120)
    assert job.returncode == 0
    plain = helpers.run([*args, "--run-dir", tmp_path / "plain"], ranks=2)
    assert plain.returncode == 0, plain.stderr
    assert (final_params(tmp_path / "launched") == final_params(tmp_path / "plain")).all()

    refused = launched(["--data", small_data, *SMALL, "--epochs", "-1"])
    _, err = refused.communicate(timeout=120)
    assert refused.returncode == 2
    assert helpers.error_lines(err) == ["ddptrain: error: --epochs must be positive, got -1"]


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "2"], "launch: -n N, the number of ranks, is required"),
    (["-n", "0"], "launch -n 0: the number of ranks must be a whole number from 1 to 1048576"),
    (["-n", "two"], "launch -n two: the number of ranks must be a whole number from 1 to"),
    (["-n"], "launch: -n needs a value"),
    (["--mpiexec", "no-such-mpiexec", "-n", "2"], "launch --mpiexec no-such-mpiexec: no such"),
    (["--mpiexec-args", "-hosts 'a", "-n", "2"], "launch --mpiexec-args \"-hosts 'a\": No closing"),
])
def test_bad_launcher_options_are_refused_with_one_line_before_anything_starts(
        capsys, argv, message):
    status, lines = helpers.in_process(["launch", *argv], capsys)
    assert status == 2 and len(lines) == 1 and lines[0].startswith(f"ddptrain: error: {message}")


def test_the_ranks_run_ddptrain_with_the_options_or_a_script_with_its_arguments():
    from ddptrain import supervisor
    launch = supervisor.parse(["-n", "4", "--mpiexec", sys.executable, "--mpiexec-args",
                               "-hosts a,b", "--", "--epochs", "3"])
    assert launch.command() == [sys.executable, "-hosts", "a,b", "-n", "4", sys.executable, "-m",
                                "ddptrain", "--epochs", "3"]
    launch = supervisor.parse(["-n", "2", "--mpiexec", sys.executable, "mine.py", "-n", "5"])
    assert launch.command() == [sys.executable, "-n", "2", sys.executable, "mine.py", "-n", "5"]
