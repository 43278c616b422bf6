"""The run folder: one run at a time in it, and what a run leaves there can be trusted after any
end: each metrics record once, no stale lock after a kill, config.json untouched by a refused
resume, nothing half-written when the disk fills up, nothing written outside it through a link
planted in it.
"""

import fcntl
import os
import signal
import subprocess

import pytest

import helpers
from ddptrain.distributed.comm import SerialComm
from ddptrain.errors import EXIT_USAGE, UserError
from ddptrain.run import checkpoint as ckpt_io
from ddptrain.run.rank0 import RunFolder
from helpers import error_lines, in_process, metrics_records, model_spec

SMALL = ["--model", model_spec(), "--batch-size", "16", "--threads", "1", "--quiet"]


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_leaves_no_record_that_its_resumption_repeats(
        small_data, tmp_path):
    run = tmp_path / "run"
    killed = helpers.run(["--data", small_data, *SMALL, "--metrics-every", "2", "--run-dir", run],
                         ranks=2, faults="raise:rank=1:step=7")
    assert killed.returncode == 1 and len(metrics_records(run)) == 3   # steps 2, 4, 6
    again = helpers.run(["--data", small_data, *SMALL, "--metrics-every", "2", "--epochs", "1",
                         "--run-dir", run, "--resume", "auto"], ranks=2)
    assert again.returncode == 0, again.stderr
    assert [r["step"] for r in metrics_records(run)] == [2, 4, 6, 8, 10, 12, 14, 15]   # once each


@pytest.mark.slow
def test_a_second_run_on_a_folder_in_use_is_refused_and_the_first_is_undisturbed(
        small_data, tmp_path, started):
    run, go_on = tmp_path / "run", tmp_path / "go-on"
    # The first run waits before its first step until the second has been refused.
    first = started(["--data", small_data, *SMALL, "--epochs", "2", "--run-dir", run],
                    faults=f"wait:step=0:until={go_on}")
    first.wait_for_path(run / "metrics.jsonl")   # written once the run holds the folder
    second = helpers.run(["--data", small_data, *SMALL, "--epochs", "2", "--run-dir", run])
    assert second.returncode == EXIT_USAGE
    [line] = error_lines(second.stderr)
    assert line.startswith(f"ddptrain: error: the run folder {run} is in use by another run "
                           f"(pid {first.pid} on ")
    go_on.touch()
    first.communicate(timeout=60)
    assert first.returncode == 0 and [r["epoch"] for r in metrics_records(run)] == [1, 2]


@pytest.mark.slow
def test_a_run_killed_with_sigkill_leaves_no_stale_lock_on_its_folder(
        small_data, tmp_path, started):
    """The lock goes with the process that held it, however it ended: the next run takes the
    folder."""
    run = tmp_path / "run"
    assert helpers.run(["--data", small_data, *SMALL, "--epochs", "2", "--run-dir",
                        run]).returncode == 0
    killed = started(["--data", small_data, *SMALL, "--epochs", "3", "--run-dir", run, "--resume",
                      "auto"], faults=f"wait:until={tmp_path / 'never'}")   # until it is killed
    killed.wait_for_line("resumed from")   # printed once it holds the folder's lock
    os.killpg(killed.pid, signal.SIGKILL)
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    after = helpers.run(["--data", small_data, *SMALL, "--epochs", "3", "--run-dir", run,
                         "--resume", "auto"])
    assert after.returncode == 0, after.stderr


def test_dry_run_reports_a_folder_in_use(small_data, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    with open(tmp_path / "run" / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        status, lines = in_process(["--data", small_data, *SMALL, "--run-dir", tmp_path / "run",
                                    "--dry-run"], capsys)
    assert status == EXIT_USAGE and "is in use by another run" in lines[0]


def test_a_refused_resume_leaves_config_json_as_it_was(small_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert in_process(["--data", small_data, *SMALL, "--epochs", "1", "--run-dir", run],
                      capsys)[0] == 0
    before = (run / "config.json").read_text()
    status, lines = in_process(["--data", small_data, *SMALL, "--batch-size", "24", "--run-dir",
                                run, "--resume", "auto"], capsys)
    assert status == EXIT_USAGE
    assert "checkpoint was trained with --batch-size 16, not 24" in lines[-1]
    assert (run / "config.json").read_text() == before


@pytest.mark.slow   # mount and umount
@pytest.mark.skipif(os.geteuid() != 0,
                    reason="mounting a small file system needs root (CI runs as root)")
def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(small_data, tmp_path, capsys):
    """HDF5's own write errors must not print tracebacks or crash the process, nor leave a temporary
    file behind. The one error line names the step checkpoint that could not be written."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(disk)], check=True)
    try:
        status, lines = in_process(["--data", small_data, *SMALL, "--model", "64-160-10",
                                    "--epochs", "4", "--keep", "9", "--run-dir", disk / "run"],
                                   capsys)
        assert status == EXIT_USAGE
        *warnings, error = lines   # best.h5 may fail first: a warning, and the run goes on
        assert error.endswith("(the previous ones are intact): No space left on device")
        best = disk / "run" / "checkpoints" / "best.h5"
        assert all(w.startswith(f"warning: could not write {best}: ") for w in warnings)
        left = sorted(os.listdir(disk / "run" / "checkpoints"))
        # no temporary file
        assert left and all(name.startswith(("step-", "best")) for name in left)
        for name in left:
            ckpt_io.load(disk / "run" / "checkpoints" / name)
        assert not [n for n in os.listdir(disk / "run") if ".tmp" in n]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# ---------------------------------------------------------------- symbolic links planted in it


@pytest.fixture
def victim(tmp_path):
    """A file outside the run folder, which a link planted in it points to."""
    path = tmp_path / "victim"
    path.write_text("precious\n")
    return path


@pytest.mark.parametrize("name", [".lock", "config.json", "metrics.jsonl", "checkpoints",
                                  "checkpoints/step-00000015.h5", "checkpoints/best.h5"])
def test_a_run_folder_with_a_symbolic_link_among_its_files_is_refused_and_nothing_is_written(
        small_data, tmp_path, victim, capsys, name):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    if name == "checkpoints":
        (run / "checkpoints").rmdir()
        victim = tmp_path / "victim-folder"
        victim.mkdir()
    (run / name).symlink_to(victim)
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    status, lines = in_process(["--data", small_data, *SMALL, "--epochs", "1", "--run-dir", run],
                               capsys)
    assert status == EXIT_USAGE
    assert lines == [f"ddptrain: error: {run / name} is a symbolic link (to {victim}): a run "
                     "writes its own files in its folder and follows no link out of it; remove "
                     "the link, or give another --run-dir"]
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
    if victim.is_dir():
        assert os.listdir(victim) == []
    else:
        assert victim.read_text() == "precious\n"


def test_dry_run_refuses_a_run_folder_with_a_symbolic_link_too(small_data, tmp_path, victim,
                                                                capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").symlink_to(victim)
    status, lines = in_process(["--data", small_data, *SMALL, "--run-dir", tmp_path / "run",
                                "--dry-run"], capsys)
    assert status == EXIT_USAGE and "is a symbolic link" in lines[-1]
    assert victim.read_text() == "precious\n"


def test_links_at_the_temporary_names_of_this_and_the_next_pids_are_not_written_through(
        small_data, tmp_path, victim, capsys):
    """The names of config.json's and metrics.jsonl's temporary files cannot be guessed: a run
    goes ahead beside links planted at the names they had (``.NAME.tmp-<pid>``)."""
    run = tmp_path / "run"
    run.mkdir()
    pid = os.getpid()
    planted = [run / f".{name}.tmp-{p}" for name in ("config.json", "metrics.jsonl")
               for p in range(pid, pid + 100)]
    for link in planted:
        link.symlink_to(victim)
    status, lines = in_process(["--data", small_data, *SMALL, "--epochs", "1", "--run-dir", run],
                               capsys)
    assert status == 0, lines
    assert victim.read_text() == "precious\n"
    assert all(link.is_symlink() for link in planted)
    assert not (run / "config.json").is_symlink() and not (run / "metrics.jsonl").is_symlink()
    assert [r["epoch"] for r in metrics_records(run)] == [1]


def test_a_record_is_not_appended_through_a_link_planted_during_a_run(tmp_path, victim):
    folder = RunFolder(SerialComm(), tmp_path / "run")
    folder.take()
    try:
        (tmp_path / "run" / "metrics.jsonl").symlink_to(victim)
        with pytest.raises(UserError, match="cannot append to .*metrics.jsonl"):
            folder.append_metrics({"epoch": 1})
    finally:
        folder.release()
    assert victim.read_text() == "precious\n"
