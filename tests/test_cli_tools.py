"""The command line as a user meets it: help, config files, dry runs, evaluate, info, plot,
progress."""

import io
import json
import os
import pty
import subprocess
import sys

import pytest

import helpers
from ddptrain import __version__, cli
from ddptrain.run import checkpoint
from ddptrain.run.progress import Progress
from helpers import model_spec
from launchers import launcher

SMALL = ["--model", model_spec(), "--batch-size", "32"]


@pytest.fixture(scope="module")
def trained_run(small_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    proc = helpers.run(["--data", small_data, *SMALL, "--epochs", "2", "--run-dir", run_dir,
                       "--metrics-every", "4"])
    assert proc.returncode == 0, proc.stderr
    return run_dir


# -- help and commands -------------------------------------------------------------------

@pytest.mark.slow
def test_help_lists_the_commands():
    proc = helpers.run(["--help"])
    assert proc.returncode == 0
    for command in ("train", "evaluate", "prepare", "plot", "info"):
        assert command in proc.stdout


@pytest.mark.slow
def test_train_help_groups_the_options_with_units_and_defaults():
    out = helpers.run(["train", "--help"]).stdout
    for group in ("data and model:", "optimisation", "outputs, checkpoints and resuming:",
                  "parallelism and debugging:"):
        assert group in out
    words = " ".join(out.split())   # the help as one line, however argparse wrapped it
    assert "GLOBAL batch in samples per step, shared by all ranks (default: 128)" in words
    assert "--simulate-ranks P" in out and "--config FILE.toml" in out


@pytest.mark.slow
def test_the_ddptrain_console_script_is_installed():
    script = helpers.ROOT / ".venv" / "bin" / "ddptrain"
    candidates = [script, helpers.Path(sys.executable).parent / "ddptrain"]
    found = next((c for c in candidates if c.exists()), None)
    assert found is not None, "pip install -e . should install the ddptrain console script"
    assert subprocess.run([str(found), "--help"], capture_output=True, text=True).returncode == 0


# -- configuration -----------------------------------------------------------------------

@pytest.mark.slow
def test_a_toml_config_sets_options_and_the_command_line_overrides_it(small_data, tmp_path):
    config_file = tmp_path / "run.toml"
    config_file.write_text(f'data = "{small_data}"\nmodel = "{model_spec()}"\nbatch-size = '
                           f'48\nepochs = 2\n[train]\nlr = 0.05\n')
    run_dir = tmp_path / "run"
    proc = helpers.run(["--config", config_file, "--epochs", "1", "--run-dir", run_dir])
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((run_dir / "config.json").read_text())
    # file, file, command line
    assert (saved["batch_size"], saved["lr"], saved["epochs"]) == (48, 0.05, 1)
    # printed at start
    assert '"batch_size": 48' in proc.stdout
    # and in every checkpoint
    assert checkpoint.newest_valid(run_dir / "checkpoints").config == saved


@pytest.mark.parametrize("content, message", [
    ("batch-size = 32\nbogus = 1\n", "unknown option 'bogus'"),
    ("batch-size = 'big'\n", "--batch-size must be int, got 'big'"),
    ("batch-size = \n", "not valid TOML"),
])
@pytest.mark.slow
def test_a_bad_config_file_is_one_line_naming_the_file(tmp_path, content, message):
    config_file = tmp_path / "run.toml"
    config_file.write_text(content)
    proc = helpers.run(["--config", config_file])
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"ddptrain: error: {config_file}: ") and message in proc.stderr
    assert proc.stderr.count("\n") == 1


@pytest.mark.slow
def test_dry_run_checks_everything_and_writes_nothing(small_data, tmp_path):
    proc = helpers.run(["--data", small_data, *SMALL, "--run-dir", tmp_path / "run", "--dry-run"])
    assert proc.returncode == 0 and "dry run:" in proc.stdout
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.mpiexec
def test_dry_run_refuses_a_rank_count_that_does_not_fit(small_data, tmp_path):
    proc = helpers.run(["--data", small_data, *SMALL, "--virtual-shards", "3", "--dry-run"],
                       ranks=2)
    assert proc.returncode == 2
    [line] = helpers.error_lines(proc.stderr)   # said once (and not by Open MPI's mpiexec after)
    assert "2 ranks cannot share 3 virtual shards" in line


@pytest.mark.slow
def test_dry_run_refuses_a_model_that_does_not_fit_the_data(small_data):
    proc = helpers.run(["--data", small_data, "--model", "784-10", "--dry-run"])
    assert proc.returncode == 2 and "does not fit" in proc.stderr


# -- evaluate, info, plot ------------------------------------------------------------------

@pytest.mark.slow
def test_evaluate_reports_accuracy_per_class_and_the_confusion_matrix(trained_run, small_data):
    final = checkpoint.step_checkpoints(trained_run / "checkpoints")[0]
    proc = helpers.run(["evaluate", final, "--data", small_data])
    assert proc.returncode == 0, proc.stderr
    records = (trained_run / "metrics.jsonl").read_text().splitlines()
    last_epoch = [json.loads(line) for line in records if '"kind": "step"' not in line][-1]
    assert f"test accuracy {100 * last_epoch['test_accuracy']:.2f}%" in proc.stdout
    assert "per-class accuracy:\nclass  name   accuracy    rows\n    0  0     " in proc.stdout
    assert "true\\pred" in proc.stdout
    matrix = [line.split()[1:] for line in proc.stdout.split("true\\pred")[1].splitlines()[1:]]
    # every test row, once
    assert len(matrix) == 10 and sum(int(v) for row in matrix for v in row) == 60


@pytest.mark.slow
def test_evaluate_under_mpi_gives_the_same_numbers(trained_run, small_data):
    final = checkpoint.step_checkpoints(trained_run / "checkpoints")[0]
    one = helpers.run(["evaluate", final, "--data", small_data])
    two = helpers.run(["evaluate", final, "--data", small_data], ranks=2)
    assert two.returncode == 0, two.stderr
    # all but the line naming the ranks
    assert one.stdout.split("\n", 1)[1] == two.stdout.split("\n", 1)[1]


@pytest.mark.slow
def test_evaluate_refuses_a_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    proc = helpers.run(["evaluate", bad])
    assert proc.returncode == 2 and str(bad) in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.slow
@pytest.mark.mpiexec
def test_info_names_versions_the_mpi_library_blas_threads_and_the_data(small_data):
    proc = helpers.run(["info", "--data", small_data], ranks=2)
    assert proc.returncode == 0, proc.stderr
    for text in ("numpy", "h5py", "mpi4py", launcher().library, "world size 2", "openblas",
                 "thread", "products     ",
                 "240 training and 60 test images of 8x8 (64 values), 10 classes "
                 "(0, 1, 2, 3, 4, 5, 6, 7, 8, 9)"):
        assert text.lower() in proc.stdout.lower(), text
    versions = [line for line in proc.stdout.splitlines() if line.startswith("ddptrain ")]
    assert versions == [f"ddptrain     {__version__}"]   # printed by rank 0 alone
    for blas in (line for line in proc.stdout.splitlines() if line.startswith("BLAS ")):
        # each library names its kernel: OpenBLAS's, or MKL's instruction set
        assert "(?," not in blas, blas


@pytest.mark.slow
def test_plot_writes_a_png_of_the_curves(trained_run, tmp_path):
    output = tmp_path / "curves.png"
    proc = helpers.run(["plot", trained_run, "--output", output])
    assert proc.returncode == 0, proc.stderr
    content = output.read_bytes()
    assert content.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = int.from_bytes(content[16:20], "big"), int.from_bytes(content[20:24], "big")
    assert (width, height) == (1100, 420) and len(content) > 20_000


@pytest.mark.slow
def test_plot_without_matplotlib_says_how_to_install_it(trained_run, tmp_path):
    blocker = tmp_path / "blocker" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('matplotlib is not installed "
                                         "(simulated)')\n")
    proc = helpers.run(["plot", trained_run], env={"PYTHONPATH": str(blocker.parent)})
    assert proc.returncode == 2
    assert "pip install 'ddptrain[plot]'" in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.slow
def test_plot_of_a_folder_without_metrics_is_one_line(tmp_path):
    proc = helpers.run(["plot", tmp_path])
    assert proc.returncode == 2 and "metrics.jsonl: no such file" in proc.stderr


# -- progress and metrics ---------------------------------------------------------------------

@pytest.mark.slow
def test_step_records_are_added_to_metrics_jsonl_when_asked(trained_run):
    records = [
        json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("kind") == "step"]
    assert [r["step"] for r in steps] == [4, 8, 12, 16]
    assert [r["epoch"] for r in records if r.get("kind") != "step"] == [1, 2]


@pytest.mark.slow
def test_progress_lines_every_n_steps_when_the_output_is_not_a_terminal(small_data, tmp_path):
    proc = helpers.run(["--data", small_data, *SMALL, "--epochs", "1", "--log-every", "3",
                       "--run-dir", tmp_path / "run"])
    lines = [line for line in proc.stdout.splitlines() if line.startswith("epoch 1/1  step")]
    assert [line.split()[3] for line in lines] == ["3/8", "6/8", "8/8"]
    assert all("samples/s" in line and "left" in line and "\r" not in line for line in lines)


@pytest.mark.slow
def test_quiet_prints_no_progress_lines(small_data, tmp_path):
    proc = helpers.run(["--data", small_data, *SMALL, "--epochs", "1", "--log-every", "1",
                        "--quiet", "--run-dir", tmp_path / "run"])
    assert proc.returncode == 0
    assert "step 1/8" not in proc.stdout and "epoch 1/1 done" in proc.stdout


def test_on_a_terminal_progress_is_a_bar_redrawn_in_place():
    stream = io.StringIO()
    progress = Progress(log_every=100, stream=stream, interactive=True)
    for step in range(1, 9):
        progress._last_draw = 0.0   # as if enough time had passed to redraw
        progress.update(epoch=1, epochs=2, step_in_epoch=step, steps_in_epoch=8, global_step=step,
                        total_steps=16, loss=0.5, accuracy=0.9, lr=0.1, samples_per_second=1000,
                        seconds_per_step=0.5)
    progress.clear()
    out = stream.getvalue()
    assert out.count("\r\033[K") == 9 and "\n" not in out
    assert "[############............] 4/8" in out and "[########################] 8/8" in out
    assert "0:04 left" in out   # 8 steps left at 0.5 s each


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_from_open_mpis_mpirun_gets_lines_not_a_bar(monkeypatch):
    """Open MPI's mpirun gives the ranks a terminal even when its own output goes to a file."""
    assert Progress(log_every=100, stream=Terminal()).interactive
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert not Progress(log_every=100, stream=Terminal()).interactive


@pytest.mark.slow
@pytest.mark.mpiexec
def test_under_mpiexec_progress_is_lines_whatever_the_ranks_output_is(small_data, tmp_path):
    proc = helpers.run(["--data", small_data, *SMALL, "--epochs", "1", "--log-every", "3",
                        "--run-dir", tmp_path / "run"], ranks=2)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stdout and "\033[K" not in proc.stdout
    assert "epoch 1/1  step 3/" in proc.stdout


def test_config_file_values_are_type_checked_in_process(tmp_path):
    config_file = tmp_path / "run.toml"
    config_file.write_text("nesterov = 1\n")
    assert cli.main(["--config", str(config_file), "--dry-run"]) == 2


@pytest.mark.slow
def test_on_a_real_terminal_training_shows_a_progress_bar(small_data, tmp_path):
    """stdout is a pseudo-terminal, as when a user runs ddptrain in a shell."""
    main, secondary = pty.openpty()
    proc = subprocess.Popen(helpers.command(["--data", small_data, *SMALL, "--epochs", "1",
                                             "--run-dir", tmp_path / "run"]), stdout=secondary,
                            stderr=subprocess.PIPE, env=helpers.clean_env(), cwd=helpers.ROOT)
    os.close(secondary)
    output = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:   # the terminal closed: the process ended
            break
        if not chunk:
            break
        output += chunk
    assert proc.wait(timeout=60) == 0
    text = output.decode()
    assert "\r\x1b[Kepoch 1/1 [" in text and "] 8/8  loss" in text and "left" in text
    assert "epoch 1/1  step" not in text   # no plain log lines on a terminal
