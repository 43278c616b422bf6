"""SLURM: slurm/train.sbatch and slurm/sweep.sbatch submitted to a real cluster, and ddptrain's
SLURM handling.

The cluster tests start a one-node cluster (munged, slurmctld, slurmd) with
``scripts/slurm-cluster.sh``, which installs SLURM with apt the first time,
and stop it at the end (a cluster that was already running is used and left
running). They skip only where SLURM cannot be installed: not root, or no
apt-get; CI runs as root, so there they run. ``DDPTRAIN_NO_SLURM=1`` skips
them on purpose. The tests before them need no cluster.

Every job runs this interpreter (``DDPTRAIN_PYTHON``) on a small synthetic
data file, so a job takes seconds; a requeued job starts again about 6 s
after its requeue (the cluster's ``cred_expire``, 5 s).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from ddptrain import __version__
from ddptrain.distributed.launcher import (
    environ_without_launcher,
    launched_by_mpi,
    rank_and_size,
    srun_task,
)
from ddptrain.distributed.slurm import check_srun_world, default_run_dir, slurm_restart_count
from ddptrain.errors import UserError
from ddptrain.run import checkpoint as ckpt_io
from helpers import ROOT, clean_env, make_dataset, run
from launchers import launcher as launcher_under_test

pytestmark = pytest.mark.mpiexec   # what MPI launchers do differently: run under each

TRAIN = ROOT / "slurm" / "train.sbatch"
SWEEP = ROOT / "slurm" / "sweep.sbatch"
CLUSTER_SCRIPT = ROOT / "scripts" / "slurm-cluster.sh"
COLLECT = ROOT / "scripts" / "collect_sweep.py"
SMALL_ARGS = ["--model", "64-16-10", "--epochs", "3", "--batch-size", "16", "--quiet"]
# The preemption runs: 1,500 steps an epoch, about 0.1 s an epoch; SIGUSR1 arrives after the first.
LONG_EPOCHS = 30
LONG_ARGS = ["--model", "64-16-10", "--epochs", str(LONG_EPOCHS), "--batch-size", "16", "--quiet"]
OPEN_MPI_MPIRUN_NOTE = "=== note: Open MPI's mpirun starts this node's ranks outside any job step"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE"}


# ---- without a cluster ---------------------------------------------------------------------------


def test_run_folder_is_named_after_the_job():
    assert default_run_dir({"SLURM_JOB_ID": "812"}) == "runs/slurm-812"
    # an array task: named as sbatch's %A_%a, not after the task's own job id
    assert default_run_dir({"SLURM_JOB_ID": "815", "SLURM_ARRAY_JOB_ID": "812",
                            "SLURM_ARRAY_TASK_ID": "3"}) == "runs/slurm-812_3"
    assert re.fullmatch(r"runs/run-\d{8}-\d{6}", default_run_dir({}))
    assert slurm_restart_count({}) == 0
    assert slurm_restart_count({"SLURM_RESTART_COUNT": "2"}) == 2


# What the ranks' environments hold (measured with Slurm 22.05 and the PyPI MPICH wheel).
SRUN_RANK_1 = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "2",
               "SLURM_STEP_NUM_TASKS": "2", "PMI_RANK": "1", "PMI_SIZE": "2", "PMI_FD": "13"}
MPIRUN_IN_ALLOCATION_RANK_1 = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "2", "SLURM_PROCID": "0",
                               "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1", "PMI_RANK": "1",
                               "PMI_SIZE": "2", "MPI_LOCALNRANKS": "2"}
BATCH_SHELL = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}


# The same with Open MPI 5.0.11's wheel (measured): under srun --mpi=pmix, and under its mpiexec.
SRUN_PMIX_RANK_1 = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1",
                    "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "PMIX_RANK": "1"}
OPEN_MPI_MPIEXEC_RANK_1 = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                           "OMPI_COMM_WORLD_LOCAL_RANK": "1", "PMIX_RANK": "1",
                           "PRTE_LAUNCHED": "1", "OPAL_PREFIX": "/venv", "HOME": "/root"}


def test_srun_tasks_are_told_apart_from_mpirun_ranks():
    assert srun_task(SRUN_RANK_1) == (1, 2)
    assert srun_task(SRUN_PMIX_RANK_1) == (1, 2)
    assert srun_task(MPIRUN_IN_ALLOCATION_RANK_1) is None   # its SLURM step is mpirun's proxies
    assert srun_task(BATCH_SHELL) is None                   # not started by srun
    assert srun_task({}) is None


def test_open_mpis_ranks_are_known_by_its_variables_and_a_job_started_from_one_has_none():
    for environ in (SRUN_PMIX_RANK_1, OPEN_MPI_MPIEXEC_RANK_1):
        assert launched_by_mpi(environ)
    assert rank_and_size(OPEN_MPI_MPIEXEC_RANK_1) == (1, 2)
    assert srun_task(OPEN_MPI_MPIEXEC_RANK_1) is None
    # PRTE_LAUNCHED=1 would make an mpiexec started from a rank take itself for a daemon
    assert environ_without_launcher(OPEN_MPI_MPIEXEC_RANK_1) == {"HOME": "/root"}


def fake_world(rank, size, claims=None):
    """A communicator stand-in whose allgather returns ``claims`` (every rank's (rank, procid,
    ntasks))."""
    return SimpleNamespace(rank=rank, size=size, allgather=lambda mine: claims or [mine])


def test_a_world_that_is_not_the_srun_step_is_refused():
    # the common mistake: srun without a PMI the MPI library speaks gives N worlds of size 1
    with pytest.raises(UserError,
                       match=r"srun started 4 tasks .* 4 separate worlds of size 1.*--mpi=pmi2"):
        check_srun_world(fake_world(0, 1), (2, 4))
    # ranks that are not the tasks srun numbered
    claims = [(0, 1, 2), (1, 0, 2)]
    with pytest.raises(UserError, match="do not match the SLURM tasks"):
        check_srun_world(fake_world(0, 2, claims), (1, 2))
    with pytest.raises(UserError, match="the MPI world has 2 ranks"):
        check_srun_world(fake_world(0, 2, [(0, 0, 4), (1, 1, 4)]), (0, 4))
    # right: task r is rank r of a world of the step's size; or no srun at all
    check_srun_world(fake_world(1, 2, [(0, 0, 2), (1, 1, 2)]), (1, 2))
    check_srun_world(fake_world(0, 1), (0, 1))
    check_srun_world(fake_world(0, 1), None)


@pytest.mark.slow
def test_a_requeued_job_resumes_by_itself(small_data, tmp_path):
    """SLURM_RESTART_COUNT > 0: ddptrain continues from the job's newest checkpoint without
    --resume."""
    job = {"SLURM_JOB_ID": "4242"}
    first = run(["--data", small_data, "--model", "64-16-10", "--epochs", "2", "--batch-size", "16",
                 "--quiet"], env=job, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "run folder runs/slurm-4242" in first.stdout and "resumed" not in first.stdout
    again = run(["--data", small_data, "--model", "64-16-10", "--epochs", "3", "--batch-size", "16",
                 "--quiet"], env={**job, "SLURM_RESTART_COUNT": "1"}, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "SLURM job 4242, restart 1" in again.stdout
    assert ("resumed from runs/slurm-4242/checkpoints/step-00000030.h5: epoch 3, "
            "step 30") in again.stdout
    assert "after 3 epochs" in again.stdout


@pytest.mark.slow
def test_collect_sweep_makes_one_table(tmp_path):
    for task, (lr, accuracies) in enumerate([(0.3, [0.5, 0.6]), (0.01, [0.2, 0.3]), (0.1, [0.7])]):
        folder = tmp_path / "runs" / f"slurm-90_{task}"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"lr": lr, "epochs": 2}))
        lines = [json.dumps({"epoch": e + 1, "train_loss": 1.0, "test_loss": 1.5,
                             "test_accuracy": a, "seconds": 0.5}) for e, a in enumerate(accuracies)]
        # cut short
        (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"epoch": 2, "train_lo')
    result = subprocess.run([sys.executable, str(COLLECT), "--job", "90", "--runs",
                             str(tmp_path / "runs"), "--csv", str(tmp_path / "sweep.csv")],
                            capture_output=True, text=True)
    assert result.returncode == 1, result.stderr    # one run has not finished its epochs
    rows = [line for line in result.stdout.splitlines() if line.startswith("| slurm-")]
    assert [row.split("|")[2].strip() for row in rows] == ["0.01", "0.1", "0.3"]   # sorted by rate
    assert "slurm-90_0 *" in rows[2] and "60.00%" in rows[2] and "finished" in rows[2]
    assert "1/2" in rows[1] and "incomplete" in rows[1]
    assert (tmp_path / "sweep.csv").read_text().startswith("run,lr,epochs,")
    nothing = subprocess.run([sys.executable, str(COLLECT), "--job", "91", "--runs",
                              str(tmp_path / "runs")], capture_output=True, text=True)
    assert nothing.returncode == 2 and "no run folders" in nothing.stderr


@pytest.mark.slow
def test_batch_scripts_parse_and_want_sbatch():
    for script in (TRAIN, SWEEP, CLUSTER_SCRIPT):
        subprocess.run(["bash", "-n", str(script)], check=True)
    outside = subprocess.run(["bash", str(TRAIN)], capture_output=True, text=True, env=clean_env())
    assert outside.returncode == 2 and "submit me with sbatch" in outside.stderr


# ---- on a real cluster
# -----------------------------------------------------------------------------


def open_mpi():
    return launcher_under_test().family == "openmpi"


def why_no_slurm():
    """The reason the cluster tests cannot run here, or None."""
    if os.environ.get("DDPTRAIN_NO_SLURM"):
        return "DDPTRAIN_NO_SLURM is set"
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return ("the SLURM tests need root (slurmd runs as root, SLURM is installed with apt); CI "
                "runs them as root")
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    have_slurm = all(shutil.which(p, path=path) for p in ("slurmctld", "slurmd", "sbatch",
                                                          "munged"))
    if not have_slurm and not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get to install it (Debian/Ubuntu)"
    return None


class Cluster:
    """Submit jobs to the test cluster and watch them."""

    def __init__(self, env):
        self.env = env
        self.jobs = []

    def command(self, *argv, check=True, timeout=60):
        return subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=timeout,
                              check=check)

    def sbatch(self, script, args, cwd, options=(), env=None):
        """Submit ``script`` with ddptrain options ``args`` from ``cwd``; returns the job id
        (str)."""
        result = subprocess.run(["sbatch", "--parsable", *options, str(script), *map(str, args)],
                                cwd=cwd, capture_output=True, text=True,
                                env={**self.env, **(env or {})}, timeout=60)
        assert result.returncode == 0, f"sbatch failed: {result.stderr}"
        job = result.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def show(self, job):
        """``scontrol show job`` as one dict per job (an array gives one per task)."""
        result = self.command("scontrol", "show", "job", "-o", job)
        return [dict(re.findall(r"(\w+)=(\S*)",
                                line)) for line in result.stdout.splitlines() if line.strip()]

    def wait(self, job, timeout, count=1, restarted=False, out=None):
        """Wait until the job (all ``count`` tasks of an array) reached a final state; returns
        show().

        ``restarted``: a final state counts once some task was restarted, or after
        5 s more of it (then the caller's assertions say what happened).
        """
        deadline, done_since = time.monotonic() + timeout, None
        while True:
            records = self.show(job)
            done = len(records) >= count and all(r.get("JobState") in FINAL_STATES for r in records)
            done_since = (done_since or time.monotonic()) if done else None
            if done and (not restarted or any(int(r.get("Restarts", 0)) > 0 for r in records)
                         or time.monotonic() - done_since > 5):
                return records
            if time.monotonic() > deadline:
                pytest.fail(f"job {job} did not finish in {timeout} s: {records}\n{report(out)}")
            time.sleep(0.25)

    def wait_for_text(self, path, text, job, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists() and text in path.read_text(errors="replace"):
                return
            if any(r.get("JobState") in FINAL_STATES for r in self.show(job)):
                break
            time.sleep(0.1)
        pytest.fail(f"job {job} never printed {text!r}: {self.show(job)}\n{report(path)}")

    def cancel_leftovers(self):
        for job in self.jobs:
            self.command("scancel", job, check=False)


def report(out):
    """The job's output file, for assertion messages."""
    if out is None or not Path(out).exists():
        return f"(no output file {out})"
    return f"--- {out} ---\n{Path(out).read_text(errors='replace')[-6000:]}"


def job_tasks_started(job):
    """Whether a process started by srun for a step of ``job`` exists (read from /proc, as root)."""
    wanted = f"SLURM_JOB_ID={job}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if wanted in environ and any(item.startswith(b"SLURM_STEP_ID=") for item in environ) \
                and any(item.startswith((b"PMI_RANK=", b"PMIX_RANK=")) for item in environ):
            return True
    return False


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


@pytest.fixture(scope="module")
def cluster():
    """The test cluster: started (and installed) if it is not running, stopped by the last test
    session using it.

    A cluster that was running before any test session started it (someone's
    own) is used and left running. Each session using a cluster the tests
    started leaves its PID in BASE/test-sessions; the last one out stops it.
    """
    reason = why_no_slurm()
    if reason:
        pytest.skip(reason)
    script_env = clean_env()
    script_env["PATH"] = script_env.get("PATH", "") + ":/usr/sbin:/sbin"
    conf = subprocess.run(["bash", str(CLUSTER_SCRIPT), "env"], env=script_env, capture_output=True,
                          text=True, check=True).stdout.strip().split("=", 1)[1]
    sessions = Path(conf).parent.parent / "test-sessions"
    status = subprocess.run(["bash", str(CLUSTER_SCRIPT), "status"], env=script_env,
                            capture_output=True)
    if status.returncode != 0:
        started = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start"], env=script_env,
                                 capture_output=True, text=True, timeout=900)
        assert started.returncode == 0, (f"could not start the SLURM cluster:\n"
                                         f"{started.stderr[-4000:]}")
        sessions.mkdir(parents=True, exist_ok=True)
        (sessions / "started-by-tests").touch()
    mine = sessions / str(os.getpid())
    if (sessions / "started-by-tests").exists():
        mine.touch()
    # Open MPI's mpirun refuses to run as root unless told twice (the jobs run as their submitter,
    # root here), and to bind the 4 ranks of a job to the 2 cores of the node that claims 4 CPUs
    # (scripts/slurm-cluster.sh); Hydra, and Open MPI's ranks under srun, ask neither.
    open_mpi = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                "PRTE_MCA_hwloc_default_binding_policy": "none"}
    jobs = Cluster({**script_env, **open_mpi, "SLURM_CONF": conf,
                    "DDPTRAIN_PYTHON": sys.executable, "DDPTRAIN_SLURM_DIR": str(ROOT / "slurm")})
    try:
        yield jobs
    finally:
        jobs.cancel_leftovers()
        mine.unlink(missing_ok=True)
        found = sessions.glob("[0-9]*") if sessions.is_dir() else []
        others = [f for f in found if pid_alive(int(f.name))]
        if (sessions / "started-by-tests").exists() and not others:
            (sessions / "started-by-tests").unlink(missing_ok=True)
            subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop"], env=script_env,
                           capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def long_data(tmp_path_factory):
    """24,000 + 600 rows of 8x8 images: 1,500 steps an epoch at --batch-size 16."""
    return make_dataset(tmp_path_factory.mktemp("slurm-data") / "long.h5", n_train=24000,
                        n_test=600)


def final_params(run_dir):
    """(step, {name: array}) of the newest step checkpoint in ``run_dir``."""
    newest = ckpt_io.step_checkpoints(Path(run_dir) / "checkpoints")[0]
    with h5py.File(newest, "r") as f:
        return newest.name, {name: f["params"][name][()] for name in f["params"]}


def assert_same_params(a, b):
    assert a[0] == b[0], f"final checkpoints of different steps: {a[0]} and {b[0]}"
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        assert np.array_equal(a[1][name], b[1][name]), f"parameter {name} differs"


def metrics_epochs(run_dir):
    records = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["epoch"] for line in records]


@pytest.mark.slow
@pytest.mark.parametrize("ntasks, launcher", [(2, "srun"), (4, "srun"), (4, "mpirun")])
def test_train_job_completes(cluster, small_data, tmp_path, ntasks, launcher):
    job = cluster.sbatch(TRAIN, ["--data", small_data, *SMALL_ARGS], cwd=tmp_path,
                         options=[f"--ntasks={ntasks}"], env={"DDPTRAIN_LAUNCHER": launcher})
    out = tmp_path / f"slurm-{job}.out"
    [record] = cluster.wait(job, timeout=90, out=out)
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), report(out)
    text = out.read_text()
    # one MPI world of ntasks ranks
    assert f"ddptrain {__version__}: {ntasks} ranks" in text, report(out)
    assert f"SLURM job {job}" in text and "finished: test accuracy" in text, report(out)
    # why a preemption cannot checkpoint there (test_preempted_job_checkpoints_requeues_and_resumes)
    assert (OPEN_MPI_MPIRUN_NOTE in text) == (launcher == "mpirun" and open_mpi()), report(out)
    run_dir = tmp_path / "runs" / f"slurm-{job}"
    assert metrics_epochs(run_dir) == [1, 2, 3]     # written once, by rank 0
    assert json.loads((run_dir / "config.json").read_text())["epochs"] == 3
    names = sorted(os.listdir(run_dir / "checkpoints"))
    assert "best.h5" in names and "step-00000045.h5" in names, names
    ckpt_io.load(run_dir / "checkpoints" / "step-00000045.h5")   # complete and verified


@pytest.mark.slow
def test_srun_without_pmi_is_refused(cluster, small_data, tmp_path):
    result = cluster.command("srun", "--ntasks=2", "--mpi=none", "--chdir", str(tmp_path),
                             sys.executable, "-m", "ddptrain", "--data", small_data, *SMALL_ARGS,
                             "--run-dir", "lonely", check=False)
    assert result.returncode != 0
    assert "srun started 2 tasks" in result.stderr, result.stderr
    assert "separate worlds of size 1" in result.stderr, result.stderr
    assert result.stderr.count("ddptrain: error") == 1          # said once, by task 0
    assert not (tmp_path / "lonely").exists()


@pytest.fixture(scope="module")
def reference(cluster, long_data, tmp_path_factory):
    """The final checkpoint of an uninterrupted 2-task run of the preemption tests' job."""
    cwd = tmp_path_factory.mktemp("reference")
    job = cluster.sbatch(TRAIN, ["--data", long_data, *LONG_ARGS], cwd=cwd, options=["--ntasks=2"])
    [record] = cluster.wait(job, timeout=180, out=cwd / f"slurm-{job}.out")
    assert record["JobState"] == "COMPLETED", report(cwd / f"slurm-{job}.out")
    return final_params(cwd / "runs" / f"slurm-{job}")


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_preempted_job_checkpoints_requeues_and_resumes(cluster, long_data, tmp_path, request,
                                                        launcher):
    if launcher == "mpirun" and open_mpi():
        pytest.skip("Open MPI's mpirun starts the ranks of its node outside any job step, where "
                    "SLURM's step signals never arrive (train.sbatch says so)")
    job = cluster.sbatch(TRAIN, ["--data", long_data, *LONG_ARGS], cwd=tmp_path,
                         options=["--ntasks=2"], env={"DDPTRAIN_LAUNCHER": launcher})
    out = tmp_path / f"slurm-{job}.out"
    cluster.wait_for_text(out, f"epoch 1/{LONG_EPOCHS} done", job, timeout=90)
    # what --signal=USR1@120 does before the time limit
    cluster.command("scancel", "--signal=USR1", job)
    reference = request.getfixturevalue("reference")       # runs while the job waits to start again
    [record] = cluster.wait(job, timeout=180, restarted=True, out=out)

    final_state = (record["JobState"], record["Restarts"], record["ExitCode"])
    assert final_state == ("COMPLETED", "1", "0:0"), report(out)
    text = out.read_text()
    assert re.search(r"stopped by SIGUSR1 at step \d+; checkpoint written", text), report(out)
    assert f"requeuing job {job};" in text and f"job {job} restart 1 on" in text, report(out)
    assert f"SLURM job {job}, restart 1 (resuming automatically)" in text, report(out)
    resumed = re.search(rf"resumed from runs/slurm-{job}/checkpoints/step-(\d+)\.h5", text)
    assert resumed and 0 < int(resumed.group(1)) < LONG_EPOCHS * 1500, report(out)
    assert text.count("finished: test accuracy") == 1
    # one output file for both runs
    assert sorted(os.listdir(tmp_path)) == ["runs", f"slurm-{job}.out"]
    run_dir = tmp_path / "runs" / f"slurm-{job}"
    assert metrics_epochs(run_dir) == list(range(1, LONG_EPOCHS + 1))
    # bitwise: the preemption changed nothing
    assert_same_params(final_params(run_dir), reference)


@pytest.mark.slow
def test_sigusr1_during_start_up_still_requeues(cluster, small_data, tmp_path):
    """A SIGUSR1 that reaches the ranks before training (and its handler) started: requeued all the
    same."""
    job = cluster.sbatch(TRAIN, ["--data", small_data, *SMALL_ARGS], cwd=tmp_path,
                         options=["--ntasks=2"])
    out = tmp_path / f"slurm-{job}.out"
    deadline = time.monotonic() + 60
    # Until a task process of the job's step exists: before that, SLURM has no task to signal
    # and drops the signal (the job would then finish unsignalled).
    while not job_tasks_started(job):
        assert time.monotonic() < deadline, f"job {job} never started its tasks\n{report(out)}"
        time.sleep(0.01)
    cluster.command("scancel", "--signal=USR1", job)
    [record] = cluster.wait(job, timeout=120, restarted=True, out=out)
    final_state = (record["JobState"], record["Restarts"], record["ExitCode"])
    assert final_state == ("COMPLETED", "1", "0:0"), report(out)
    text = out.read_text()
    assert f"requeuing job {job};" in text and "finished: test accuracy" in text, report(out)
    assert metrics_epochs(tmp_path / "runs" / f"slurm-{job}") == [1, 2, 3]


@pytest.mark.slow
def test_sweep_array_trains_every_rate_and_collects_a_table(cluster, small_data, tmp_path):
    array = cluster.sbatch(SWEEP, ["--data", small_data, *SMALL_ARGS], cwd=tmp_path)
    records = cluster.wait(array, timeout=120, count=4)
    assert sorted(r["ArrayTaskId"] for r in records) == ["0", "1", "2", "3"]
    for r in records:
        out = tmp_path / f"slurm-{array}_{r['ArrayTaskId']}.out"
        assert (r["JobState"], r["ExitCode"]) == ("COMPLETED", "0:0"), report(out)
        assert f"ddptrain {__version__}: 2 ranks" in out.read_text(), report(out)
    rates = {int(folder.name.split("_")[1]): json.loads((folder / "config.json").read_text())["lr"]
             for folder in (tmp_path / "runs").glob(f"slurm-{array}_*")}
    assert rates == {0: 0.01, 1: 0.03, 2: 0.1, 3: 0.3}
    table = subprocess.run([sys.executable, str(COLLECT), "--job", array, "--runs",
                            str(tmp_path / "runs")], capture_output=True, text=True)
    assert table.returncode == 0, table.stdout + table.stderr
    rows = [line for line in table.stdout.splitlines() if line.startswith(f"| slurm-{array}_")]
    assert [row.split("|")[2].strip() for row in rows] == ["0.01", "0.03", "0.1",
                                                           "0.3"], table.stdout
    assert all("3/3" in row and "finished" in row for row in rows)
    assert sum("*" in row for row in rows) == 1
    print(table.stdout)


@pytest.mark.slow
def test_preempted_array_task_requeues_alone(cluster, long_data, tmp_path):
    """Task 1 of a two-task array is preempted; only it restarts, and it ends where task 0 (same
    rate) does."""
    array = cluster.sbatch(SWEEP, ["--data", long_data, *LONG_ARGS], cwd=tmp_path,
                           options=["--array=0-1", "--ntasks=1"],   # a rank each: 2 cores, 2 tasks
                           env={"DDPTRAIN_SWEEP_LRS": "0.1 0.1"})
    out = tmp_path / f"slurm-{array}_1.out"
    cluster.wait_for_text(out, f"epoch 1/{LONG_EPOCHS} done", array, timeout=90)
    cluster.command("scancel", "--signal=USR1", f"{array}_1")
    records = {r["ArrayTaskId"]: r for r in cluster.wait(array, timeout=180, count=2,
                                                         restarted=True, out=out)}
    assert (records["1"]["JobState"], records["1"]["Restarts"]) == ("COMPLETED", "1"), report(out)
    assert (records["0"]["JobState"], records["0"]["Restarts"]) == ("COMPLETED", "0"), \
        report(tmp_path / f"slurm-{array}_0.out")
    text = out.read_text()
    assert f"requeuing job {array}_1;" in text, report(out)
    assert f"resumed from runs/slurm-{array}_1/checkpoints/" in text, report(out)
    assert_same_params(final_params(tmp_path / "runs" / f"slurm-{array}_1"),
                       final_params(tmp_path / "runs" / f"slurm-{array}_0"))
