"""Options and configuration files: what cannot work is refused at the start, in one line, before
the run folder is made, rather than failing later (an infinite schedule, a model that exhausts the
memory an hour in); what can work runs, however unusual.
"""

import time

import pytest

from ddptrain import cli
from ddptrain.errors import EXIT_USAGE
from helpers import in_process, metrics_records, model_spec

SMALL = ["--model", model_spec(), "--batch-size", "16", "--threads", "1", "--quiet"]


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
], ids=["warmup-inf", "lr-inf", "momentum-inf", "weight-decay-inf", "step-gamma-inf", "huge-model",
        "threads", "simulate-ranks", "underscore"])
@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_options_that_cannot_work_are_refused_at_the_start_in_one_line(small_data, tmp_path, capsys,
                                                                       options, message, dry_run):
    started = time.monotonic()
    status, lines = in_process(["--data", small_data, *SMALL, "--run-dir", tmp_path / "run",
                                *options, *(["--dry-run"] if dry_run else [])], capsys)
    assert status == EXIT_USAGE and len(lines) == 1 and message in lines[0], lines
    assert time.monotonic() - started < 5 and not (tmp_path / "run").exists()


def test_a_batch_larger_than_the_data_is_one_batch_of_every_row(small_data, tmp_path, capsys):
    """The batch's buffer is sized by the rows there are, not by --batch-size (a MemoryError)."""
    status, _ = in_process(["--data", small_data, *SMALL, "--batch-size", "1000000000", "--epochs",
                            "2", "--run-dir", tmp_path / "run"], capsys)
    assert status == 0
    assert [r["step"] for r in metrics_records(tmp_path / "run")] == [1, 2]


def assert_configuration_refused(tmp_path, capsys, content, message):
    """A --config file of ``content`` (bytes) is refused, also by a dry run, in the one line
    ``message`` names it with, status 2."""
    (tmp_path / "run.toml").write_bytes(content)
    status, lines = in_process(["--config", tmp_path / "run.toml", "--dry-run"], capsys)
    assert status == EXIT_USAGE and lines == [f"ddptrain: error: {tmp_path / 'run.toml'}: "
                                              f"{message}"]


@pytest.mark.parametrize("content, message", [
    (b"lr = 0.1\n\xff\xfe = 1\n", "not valid TOML (it is not UTF-8 text)"),
    (b"train = 5\n", "'train' must be a table of options ([train]), not 5"),
    (b"train = [1, 2]\n", "'train' must be a table of options ([train]), not [1, 2]"),
    (b"batch-size = 32\nbatch_size = 64\n",
     "option 'batch_size' is set twice (as batch-size or batch_size, at the top or in [train])"),
    (b"epochs = 2\n[train]\nepochs = 3\n",
     "option 'epochs' is set twice (as epochs, at the top or in [train])"),
    (b"quiet = 'yes'\n", "--quiet must be true or false, got 'yes'"),
])
def test_a_bad_configuration_file_is_refused_in_one_line_that_names_it(tmp_path, capsys, content,
                                                                        message):
    assert_configuration_refused(tmp_path, capsys, content, message)


def test_quiet_and_dry_run_may_be_set_in_a_configuration_file(small_data, tmp_path, capsys):
    (tmp_path / "run.toml").write_text(f'data = "{small_data}"\nmodel = "{model_spec()}"\n'
                                       f'quiet = true\ndry-run = true\n')
    assert cli.main(["--config", str(tmp_path / "run.toml"), "--run-dir",
                     str(tmp_path / "run")]) == 0
    assert "dry run:" in capsys.readouterr().out and not (tmp_path / "run").exists()


HUGE = "99999999999999999999"   # 1e20: beyond a C long
TOO_LARGE = [*((name, HUGE) for name in (
    "epochs", "batch-size", "virtual-shards", "check-every", "log-every", "eval-batch",
    "step-size", "keep", "reference-batch", "accumulate", "checkpoint-every", "threads",
    "metrics-every", "simulate-ranks", "max-steps")), ("warmup-epochs", "1e308")]


@pytest.mark.parametrize("name, value", TOO_LARGE, ids=[name for name, _ in TOO_LARGE])
@pytest.mark.parametrize("source", ["command line", "config file"])
def test_a_number_too_large_for_an_option_is_refused_by_a_dry_run(small_data, tmp_path, capsys,
                                                                  name, value, source):
    """Each count is bounded where the options are checked: 1e20 rows a batch passed --dry-run and
    then met an OverflowError in the sampler (1e308 warmup epochs: in the schedule)."""
    option = ["--" + name, value]
    if source == "config file":   # the command line's options override the file's
        (tmp_path / "run.toml").write_text(f"{name} = {value}\n")
        option = ["--config", tmp_path / "run.toml"]
    small = SMALL[:2] + (["--quiet"] if name in ("batch-size", "threads") else SMALL[2:])
    status, lines = in_process(["--data", small_data, *small, "--run-dir", tmp_path / "run",
                                *option, "--dry-run"], capsys)
    assert status == EXIT_USAGE and len(lines) == 1, lines
    assert f"--{name} must be at most 2,147,483,647, got " in lines[0]


def test_more_micro_batches_than_rows_in_the_global_batch_are_refused(small_data, tmp_path,
                                                                      capsys):
    status, lines = in_process(["--data", small_data, *SMALL, "--accumulate", "17", "--dry-run"],
                               capsys)
    assert status == EXIT_USAGE and lines == [
        "ddptrain: error: --accumulate 17 with --batch-size 16: each micro-batch needs a row of "
        "the global batch"]


@pytest.mark.parametrize("content, message", [
    ("a = " + "[" * 100_000 + "]" * 100_000 + "\n", "not valid TOML (nested too deeply)"),
    ("# " + "x" * 2 ** 20 + "\n", "larger than 1024 KiB: not a configuration file"),
], ids=["nested", "huge"])
def test_a_deeply_nested_or_huge_configuration_file_is_one_line(tmp_path, capsys, content,
                                                                message):
    assert_configuration_refused(tmp_path, capsys, content.encode(), message)
