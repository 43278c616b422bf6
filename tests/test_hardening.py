"""What an adversarial test found (issue 17), each as a regression test: damaged files, signals that arrive
early or twice, two runs on one folder, options whose cost only shows later, configuration files, messages.

The bit flips across whole files are in test_fuzz.py; here are the cases the issue names.
"""

import fcntl
import os
import signal
import subprocess
import time

import h5py
import helpers
import numpy as np
import pytest
from helpers import error_lines, flip_byte_at, metrics_records, model_spec

from ddptrain import cli
from ddptrain.data import format as data
from ddptrain.data import readable
from ddptrain.errors import EXIT_PREEMPTED, EXIT_USAGE, DataError
from ddptrain.run import checkpoint as ckpt_io

SMALL = ["--model", model_spec(), "--batch-size", "16", "--threads", "1", "--quiet"]


def in_process(argv, capsys):
    """``(status, stderr lines)`` of the command line run in this process."""
    status = cli.main([str(a) for a in argv])
    return status, error_lines(capsys.readouterr().err)


def old_format_file(path):
    """A data file as ddptrain 0.1 wrote it: HDF5's oldest format, text attributes in the global heap."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.attrs["format"], f.attrs["format_version"], f.attrs["source"] = "ddptrain-mnist", 1, "synthetic test data"
        for split, n in (("train", 240), ("test", 60)):
            f.create_dataset(f"{split}/images", data=rng.integers(0, 256, (n, 8, 8), dtype=np.uint8),
                             chunks=(min(n, 1024), 8, 8))
            f.create_dataset(f"{split}/labels", data=rng.integers(0, 10, n, dtype=np.uint8))
    return path


def hanging_file(path):
    """``old_format_file`` with bit 7 of the size of the first object in its global heap flipped: HDF5
    loops forever reading the attributes (the global heap collection's first object size is 24 bytes
    after its "GCOL" signature, in the HDF5 file format specification)."""
    old_format_file(path)
    flip_byte_at(path, path.read_bytes().index(b"GCOL") + 24, mask=0x80)
    return path


# ---------------------------------------------------------------- 1-3. damaged checkpoints and data files


@pytest.mark.slow
def test_resume_auto_skips_a_checkpoint_whose_datatype_was_flipped_and_prunes_no_valid_one(small_data, tmp_path):
    """Defect 1: float32 became uint32 in the newest checkpoint; the older ones must survive its pruning."""
    run = tmp_path / "run"
    assert helpers.run(["--data", small_data, *SMALL, "--epochs", "2", "--run-dir", run]).returncode == 0
    newest = ckpt_io.step_path(run / "checkpoints", 30)
    content = newest.read_bytes()
    flip_byte_at(newest, content.index(bytes([0x11, 0x20, 0x1f, 0x00, 0x04]), ckpt_io.HEADER_SIZE), mask=0x01)
    proc = helpers.run(["--data", small_data, *SMALL, "--epochs", "3", "--keep", "1", "--run-dir", run,
                        "--resume", "auto"])
    assert proc.returncode == 0, proc.stderr
    assert "step-00000030.h5: checksum mismatch" in proc.stderr and "resumed from" in proc.stdout
    assert sorted(os.listdir(run / "checkpoints")) == ["best.h5", "step-00000030.h5.corrupt", "step-00000045.h5"]


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [None, 2])
def test_a_data_file_that_hangs_hdf5_ends_every_rank_with_one_line(tmp_path, ranks):
    """Defect 2: one flipped bit that makes HDF5 spin forever reading attributes."""
    bad = hanging_file(tmp_path / "hangs.h5")
    started = time.monotonic()
    proc = helpers.run(["--data", bad, *SMALL, "--run-dir", tmp_path / "run"], ranks=ranks, timeout=60)
    assert time.monotonic() - started < data.CHECK_SECONDS + 15
    assert proc.returncode == EXIT_USAGE
    assert error_lines(proc.stderr) == [f"ddptrain: error: {bad}: damaged: HDF5 did not finish reading its "
                                        f"metadata within {data.CHECK_SECONDS} s"]


@pytest.mark.slow
def test_a_file_that_hangs_hdf5_is_cut_short_in_a_child_process(tmp_path):
    bad = hanging_file(tmp_path / "hangs.h5")
    with pytest.raises(DataError, match="hangs.h5: damaged: HDF5 did not finish reading its metadata within 1 s"):
        readable.check_readable(bad, seconds=1)
    readable.check_readable(old_format_file(tmp_path / "fine.h5"), seconds=5)   # the same format, undamaged: read


def test_a_fifo_given_as_data_is_refused_at_once(tmp_path, capsys):
    os.mkfifo(tmp_path / "fifo.h5")   # opening it for reading would block until a writer comes
    status, lines = in_process(["--data", tmp_path / "fifo.h5", *SMALL, "--run-dir", tmp_path / "run"], capsys)
    assert status == EXIT_USAGE
    assert lines == [f"ddptrain: error: {tmp_path / 'fifo.h5'}: not a regular file (a FIFO, a socket or a device), "
                     f"not a data file"]


def test_a_data_file_that_cannot_be_read_says_so_not_that_it_is_not_hdf5(small_data, monkeypatch):
    """Defect 11: permission denied was reported as "not an HDF5 file (or truncated)". (As root, which
    reads everything, the refusal is simulated; it is the message under test.)"""
    monkeypatch.setattr(data.os, "access", lambda path, mode: False)
    with pytest.raises(DataError, match=r"small.h5: cannot read it \(permission denied\)$"):
        data.inspect(small_data)


def test_a_flipped_bit_in_a_parameter_s_name_is_refused_before_hdf5_reads_the_file(small_data, tmp_path, capsys):
    """Defect 3: a TypeError traceback from a damaged name."""
    assert in_process(["--data", small_data, *SMALL, "--epochs", "1", "--run-dir", tmp_path / "run"], capsys)[0] == 0
    checkpoint = ckpt_io.step_path(tmp_path / "run" / "checkpoints", 15)
    flip_byte_at(checkpoint, checkpoint.read_bytes().index(b"linear1.weight", ckpt_io.HEADER_SIZE), mask=0x80)
    status, lines = in_process(["evaluate", checkpoint, "--data", small_data], capsys)
    assert status == EXIT_USAGE and lines == [f"ddptrain: error: {checkpoint}: checksum mismatch, the checkpoint "
                                              f"is corrupt"]


def _rewritten(checkpoint, name, **changes):
    """``checkpoint`` (a path) saved again as ``name`` beside it with ``changes``, with a valid digest: what a
    forger, not damage, makes."""
    import dataclasses
    rewritten = checkpoint.with_name(name)
    ckpt_io.save(rewritten, dataclasses.replace(ckpt_io.load(checkpoint), **changes))
    return rewritten


def test_a_checkpoint_whose_description_asks_for_more_than_its_arrays_is_refused_before_allocating(
        small_data, tmp_path, capsys):
    """A digest proves the bytes are whole, not that they are honest: a description of a huge layer with
    the arrays of a small one must not make evaluate allocate the huge one."""
    from ddptrain.nn.conv import Conv2d
    from ddptrain.nn.layers import Flatten, Linear
    assert in_process(["--data", small_data, *SMALL, "--epochs", "1", "--run-dir", tmp_path / "run"], capsys)[0] == 0
    checkpoint = ckpt_io.step_path(tmp_path / "run" / "checkpoints", 15)
    huge = [Conv2d(1, 4_000_000_000, 3), Flatten(), Linear(64, 10)]   # 36 billion weights
    forged = _rewritten(checkpoint, "forged.h5", model=[{"name": None, "type": type(layer).__name__,
                                                        "args": layer.config()} for layer in huge])
    status, lines = in_process(["evaluate", forged, "--data", small_data], capsys)
    assert status == EXIT_USAGE and len(lines) == 1
    assert lines[0].startswith(f"ddptrain: error: {forged}: its model description does not match its arrays "
                               f"(it has no parameter conv2d1.bias)"), lines


def test_evaluate_refuses_a_model_whose_activations_would_not_fit_in_memory(small_data, tmp_path, capsys,
                                                                           monkeypatch):
    """Few parameters, huge activations: 20,000 channels of 8x8 pixels for 60 test rows. Checked like a
    training run's options (limits.py), with the memory said to be 1 GiB."""
    from ddptrain.nn.conv import Conv2d
    from ddptrain.nn.layers import Flatten, Linear
    from ddptrain.nn.model import Sequential
    from ddptrain.nn.pooling import AvgPool2d
    from ddptrain.run import limits
    assert in_process(["--data", small_data, *SMALL, "--epochs", "1", "--run-dir", tmp_path / "run"], capsys)[0] == 0
    checkpoint = ckpt_io.step_path(tmp_path / "run" / "checkpoints", 15)
    wide = Sequential([Conv2d(1, 20_000, 1), AvgPool2d(8), Flatten(), Linear(20_000, 10)], dtype=np.float32)
    forged = _rewritten(checkpoint, "wide.h5", model=wide.describe(), params=dict(wide.named_params()),
                        model_summary=wide.summary())
    monkeypatch.setattr(limits, "available_memory", lambda: limits.GIB)
    status, lines = in_process(["evaluate", forged, "--data", small_data], capsys)
    assert status == EXIT_USAGE and len(lines) == 1
    assert "needs about" in lines[0] and "and it has 1.0 GiB available" in lines[0], lines


# ---------------------------------------------------------------- 4-5. signals early, and twice


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SIGUSR1", "SIGTERM", "SIGINT"])
@pytest.mark.parametrize("delay", [0.1, 0.2, 0.35])
def test_a_signal_while_the_program_starts_stops_the_run_after_its_first_steps(small_data, tmp_path, name, delay):
    """Defect 4: in the first ~0.25 s (imports) signals killed the process. From ddptrain's first line on,
    one is remembered, and the run stops with a checkpoint, status 3."""
    proc = helpers.start(["--data", small_data, *SMALL, "--epochs", "200", "--run-dir", tmp_path / "run"])
    time.sleep(delay)
    os.kill(proc.pid, getattr(signal, name))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, err
    assert f"stopped by {name} at step" in out and "Traceback" not in err and err == ""
    step = int(out.split(f"stopped by {name} at step ")[1].split(";")[0])
    assert ckpt_io.load(ckpt_io.step_path(tmp_path / "run" / "checkpoints", step)).state["step"] == step


@pytest.mark.slow
def test_ctrl_c_to_mpiexec_while_the_ranks_start_stops_every_rank_with_status_3(small_data, tmp_path):
    proc = helpers.start(["--data", small_data, *SMALL, "--epochs", "200", "--run-dir", tmp_path / "run"], ranks=2)
    time.sleep(0.3)   # Hydra has started the ranks; they are importing numpy, h5py and mpi4py
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, out + err
    assert "stopped by SIGINT at step" in out and "Traceback" not in err


@pytest.mark.slow
def test_ctrl_c_twice_to_mpiexec_force_aborts_but_loses_nothing(small_data, tmp_path):
    """Defect 5, documented: Hydra's second Ctrl-C kills the ranks at once (status 255), perhaps before the
    stop checkpoint; every checkpoint in the folder still loads and --resume auto finishes the run."""
    run = tmp_path / "run"
    proc = helpers.start(["--data", small_data, *SMALL, "--batch-size", "8", "--epochs", "3", "--checkpoint-every",
                          "5", "--run-dir", run], ranks=2, faults="delay:seconds=0.05")
    deadline = time.monotonic() + 60
    while not ckpt_io.step_path(run / "checkpoints", 5).exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(0.005)
    os.kill(proc.pid, signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode in (EXIT_PREEMPTED, 255)
    for path in ckpt_io.step_checkpoints(run / "checkpoints"):
        ckpt_io.load(path)   # none half-written
    again = helpers.run(["--data", small_data, *SMALL, "--batch-size", "8", "--epochs", "3", "--run-dir", run,
                         "--resume", "auto"], ranks=2)
    assert again.returncode == 0, again.stderr
    assert [r["epoch"] for r in metrics_records(run)] == [1, 2, 3]
    assert not [name for name in os.listdir(run / "checkpoints") if ".tmp" in name]


# ---------------------------------------------------------------- 7. options whose cost only showed later


@pytest.mark.parametrize("options, message", [
    (["--warmup-epochs", "inf"], "--warmup-epochs must be finite, got inf"),
    (["--lr", "inf"], "--lr must be finite, got inf"),
    (["--momentum", "inf"], "--momentum must be finite and not negative, got inf"),
    (["--weight-decay", "inf"], "--weight-decay must be finite and not negative, got inf"),
    (["--step-gamma", "inf"], "--step-gamma must be finite, got inf"),
    (["--model", "64-100000000-10"], "--model 64-100000000-10 with --batch-size 16 needs about"),
    (["--threads", "100000"], "--threads 100000: a rank here may use"),
    (["--simulate-ranks", "1000"], "1000 ranks cannot share 24 virtual shards evenly"),
    (["--model", "64-6_4-10"], "'6_4' (token 2) is not a layer size"),
], ids=["warmup-inf", "lr-inf", "momentum-inf", "weight-decay-inf", "step-gamma-inf", "huge-model", "threads",
        "simulate-ranks", "underscore"])
@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_options_that_cannot_work_are_refused_at_start_with_one_line(small_data, tmp_path, capsys, options, message,
                                                                     dry_run):
    started = time.monotonic()
    status, lines = in_process(["--data", small_data, *SMALL, "--run-dir", tmp_path / "run", *options,
                                *(["--dry-run"] if dry_run else [])], capsys)
    assert status == EXIT_USAGE and len(lines) == 1 and message in lines[0], lines
    assert time.monotonic() - started < 5 and not (tmp_path / "run").exists()


def test_a_batch_larger_than_the_data_is_one_batch_of_every_row(small_data, tmp_path, capsys):
    """Defect 7: the batch buffer was sized by --batch-size (MemoryError), not by the rows there are."""
    status, _ = in_process(["--data", small_data, *SMALL, "--batch-size", "1000000000", "--epochs", "2",
                            "--run-dir", tmp_path / "run"], capsys)
    assert status == 0
    assert [r["step"] for r in metrics_records(tmp_path / "run")] == [1, 2]


# ---------------------------------------------------------------- 8. configuration files


@pytest.mark.parametrize("content, message", [
    (b"lr = 0.1\n\xff\xfe = 1\n", "not valid TOML (it is not UTF-8 text)"),
    (b"train = 5\n", "'train' must be a table of options ([train]), not 5"),
    (b"train = [1, 2]\n", "'train' must be a table of options ([train]), not [1, 2]"),
    (b"batch-size = 32\nbatch_size = 64\n", "option 'batch_size' is set twice (as batch-size or batch_size, at "
                                          "the top or in [train])"),
    (b"epochs = 2\n[train]\nepochs = 3\n", "option 'epochs' is set twice (as epochs, at the top or in [train])"),
    (b"quiet = 'yes'\n", "--quiet must be true or false, got 'yes'"),
])
def test_a_bad_configuration_file_is_one_line(tmp_path, capsys, content, message):
    (tmp_path / "run.toml").write_bytes(content)
    status, lines = in_process(["--config", tmp_path / "run.toml", "--dry-run"], capsys)
    assert status == EXIT_USAGE and lines == [f"ddptrain: error: {tmp_path / 'run.toml'}: {message}"]


def test_quiet_and_dry_run_may_be_set_in_a_configuration_file(small_data, tmp_path, capsys):
    (tmp_path / "run.toml").write_text(f'data = "{small_data}"\nmodel = "{model_spec()}"\nquiet = true\n'
                                       f'dry-run = true\n')
    assert cli.main(["--config", str(tmp_path / "run.toml"), "--run-dir", str(tmp_path / "run")]) == 0
    assert "dry run:" in capsys.readouterr().out and not (tmp_path / "run").exists()


# ---------------------------------------------------------------- 9-10. records, best.h5, two runs at once


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_leaves_no_record_to_repeat(small_data, tmp_path):
    run = tmp_path / "run"
    killed = helpers.run(["--data", small_data, *SMALL, "--metrics-every", "2", "--run-dir", run], ranks=2,
                         faults="raise:rank=1:step=7")
    assert killed.returncode == 1 and len(metrics_records(run)) == 3   # steps 2, 4, 6
    again = helpers.run(["--data", small_data, *SMALL, "--metrics-every", "2", "--epochs", "1", "--run-dir", run,
                         "--resume", "auto"], ranks=2)
    assert again.returncode == 0, again.stderr
    assert [r["step"] for r in metrics_records(run)] == [2, 4, 6, 8, 10, 12, 14, 15]   # once each


def test_resume_auto_with_every_step_checkpoint_damaged_resumes_from_best(small_data, tmp_path, capsys):
    """Defect 9: best.h5 was never considered, and the fresh start overwrote it."""
    run = tmp_path / "run"
    assert in_process(["--data", small_data, *SMALL, "--epochs", "2", "--keep", "1", "--run-dir", run], capsys)[0] == 0
    best = ckpt_io.load(run / "checkpoints" / "best.h5")
    flip_byte_at(ckpt_io.step_path(run / "checkpoints", 30), 600)
    status, lines = in_process(["--data", small_data, *SMALL, "--epochs", "3", "--run-dir", run, "--resume", "auto"],
                               capsys)
    assert status == 0
    assert f"resuming from best.h5 (step {best.state['step']})" in " ".join(lines)
    assert [r["epoch"] for r in metrics_records(run)] == [1, 2, 3]
    assert ckpt_io.load(run / "checkpoints" / "best.h5").state["best_accuracy"] >= best.state["best_accuracy"]


@pytest.mark.slow
def test_a_second_run_on_a_folder_in_use_is_refused_and_the_first_is_undisturbed(small_data, tmp_path):
    """Defect 10: two runs on one folder broke each other; a killed run must leave no stale lock."""
    run = tmp_path / "run"
    first = helpers.start(["--data", small_data, *SMALL, "--epochs", "2", "--run-dir", run],
                          faults="delay:seconds=0.02")
    deadline = time.monotonic() + 30
    while not (run / "metrics.jsonl").exists():
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.01)
    second = helpers.run(["--data", small_data, *SMALL, "--epochs", "2", "--run-dir", run])
    assert second.returncode == EXIT_USAGE
    [line] = error_lines(second.stderr)
    assert line.startswith(f"ddptrain: error: the run folder {run} is in use by another run (pid {first.pid} on ")
    first.communicate(timeout=60)
    assert first.returncode == 0 and [r["epoch"] for r in metrics_records(run)] == [1, 2]

    killed = helpers.start(["--data", small_data, *SMALL, "--epochs", "3", "--run-dir", run, "--resume", "auto"],
                           faults="delay:seconds=0.05")
    time.sleep(1.0)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.communicate()
    after = helpers.run(["--data", small_data, *SMALL, "--epochs", "3", "--run-dir", run, "--resume", "auto"])
    assert after.returncode == 0, after.stderr   # the lock went with the killed process


def test_dry_run_reports_a_folder_in_use(small_data, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    with open(tmp_path / "run" / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        status, lines = in_process(["--data", small_data, *SMALL, "--run-dir", tmp_path / "run", "--dry-run"], capsys)
    assert status == EXIT_USAGE and "is in use by another run" in lines[0]


# ---------------------------------------------------------------- 11-12. messages, and what a refusal leaves


def test_a_refused_resume_leaves_config_json_as_it_was(small_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert in_process(["--data", small_data, *SMALL, "--epochs", "1", "--run-dir", run], capsys)[0] == 0
    before = (run / "config.json").read_text()
    status, lines = in_process(["--data", small_data, *SMALL, "--batch-size", "24", "--run-dir", run,
                                "--resume", "auto"], capsys)
    assert status == EXIT_USAGE and "checkpoint was trained with --batch-size 16, not 24" in lines[-1]
    assert (run / "config.json").read_text() == before


@pytest.mark.slow   # mount and umount
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small file system needs root (CI runs as root)")
def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(small_data, tmp_path, capsys):
    """Defect 11-12: HDF5's own write errors printed tracebacks and crashed the process; a temporary file
    was left behind."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(disk)], check=True)
    try:
        status, lines = in_process(["--data", small_data, *SMALL, "--model", "64-160-10", "--epochs", "4",
                                    "--keep", "9", "--run-dir", disk / "run"], capsys)
        assert status == EXIT_USAGE
        assert len(lines) == 1 and lines[0].endswith("(the previous ones are intact): No space left on device")
        left = sorted(os.listdir(disk / "run" / "checkpoints"))
        assert left and all(name.startswith(("step-", "best")) for name in left)   # no temporary file
        for name in left:
            ckpt_io.load(disk / "run" / "checkpoints" / name)
        assert not [n for n in os.listdir(disk / "run") if ".tmp" in n]
    finally:
        subprocess.run(["umount", str(disk)], check=True)
