"""``--stall-timeout``: a rank left waiting in a collective for a stopped rank ends the job with one
line naming that rank (status 1), instead of waiting forever; off by default, and silent in a run
that does not stall."""

import os
import signal
import time

import pytest

import helpers
from ddptrain.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from ddptrain.run import checkpoint as ckpt_io
from helpers import in_process, make_dataset, model_spec

pytestmark = pytest.mark.mpiexec   # what MPI launchers do differently: run under each

DELAY = 0.05   # seconds per step: 30 steps per epoch, 1.5 s


def args(data, run_dir, *extra):
    return ["--data", data, "--model", model_spec(), "--batch-size", "8", "--epochs", "2",
            "--threads", "1", "--quiet", "--checkpoint-every", "5", "--keep", "100",
            "--run-dir", run_dir, *extra]


@pytest.mark.parametrize("value, message", [
    ("-1", "--stall-timeout must not be negative, got -1.0"),
    ("inf", "--stall-timeout must be finite, got inf"),
    ("nan", "--stall-timeout must be a number, got nan"),
])
def test_a_negative_or_infinite_stall_timeout_is_refused_in_one_line(tmp_path, capsys, value,
                                                                     message):
    data = make_dataset(tmp_path / "small.h5")
    status, lines = in_process([*args(data, tmp_path / "run"), "--stall-timeout", value,
                                "--dry-run"], capsys)
    assert status == EXIT_USAGE and len(lines) == 1 and message in lines[0], lines


@pytest.mark.slow
def test_a_stopped_rank_ends_the_job_within_seconds_with_one_line_naming_it(tmp_path, started):
    data = make_dataset(tmp_path / "small.h5")
    proc = started(args(data, tmp_path / "run", "--stall-timeout", "3"), ranks=2,
                   faults=f"delay:seconds={DELAY}")
    proc.wait_for_path(ckpt_io.step_path(tmp_path / "run" / "checkpoints", 5))
    stopped = helpers.rank_pids(proc.pid, 2)[1]
    os.kill(stopped, signal.SIGSTOP)
    try:
        since = time.monotonic()
        out, err = proc.communicate(timeout=30)
        seconds = time.monotonic() - since
    finally:
        try:
            os.kill(stopped, signal.SIGCONT)
            os.kill(stopped, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == EXIT_FAILURE, out + err
    assert 3 <= seconds < 10
    lines = [line for line in err.splitlines() if "ddptrain: error" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("ddptrain: error: rank 0 waited ")
    assert "in a collective that rank(s) 1 never reached (a stopped or hung process? " \
           "--stall-timeout 3)" in lines[0]


@pytest.mark.slow
def test_a_run_with_a_stall_timeout_and_no_stall_finishes_normally(tmp_path):
    # 60 steps of DELAY s: the run lasts three times the timeout, its end and checkpoints included
    data = make_dataset(tmp_path / "small.h5")
    proc = helpers.run(args(data, tmp_path / "run", "--stall-timeout", "1"), ranks=2, timeout=120,
                       faults=f"delay:seconds={DELAY}")
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "finished" in proc.stdout and "error" not in proc.stderr
