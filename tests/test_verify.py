"""``ddptrain verify`` and ``ddptrain.verify``: P ranks against one process, step by step, for your
own options and layers; and the two training options they rest on, --max-steps and
--record-hashes.

``ddptrain.verify`` runs the ranks as threads of this process (fast); the command line runs them as
processes, through ``ddptrain launch`` (slow, mpiexec).
"""

import contextlib
import io
import json

import numpy as np
import pytest

import ddptrain
from ddptrain import cli, nn
from ddptrain.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from ddptrain.nn.layer import Layer
from ddptrain.nn.model import Sequential
from ddptrain.run import checkpoint
from helpers import in_process, model_spec, run, template_arrays

SIDE = 8
MLP = "64-40-30-10"


@pytest.fixture(scope="module")
def arrays():
    return template_arrays(SIDE)


def mlp(spec=MLP, dtype="float32"):
    return Sequential.from_spec(spec, dtype=dtype, seed=1, input_shape=(SIDE, SIDE))


def verify(arrays, model=None, **options):
    settings = dict(ranks=(1, 2, 3), steps=4, batch_size=48, threads=1)
    settings.update(options)
    return ddptrain.verify(model if model is not None else mlp(), arrays, **settings)


# ---------------------------------------------------------------- layers that break the promise


class LocalMeanCentring(Layer):
    """``y = x - mean(x)`` over the rows the layer is given: under plain data parallelism, its
    rank's rows only (the mistake of a BatchNorm without a sum over the ranks)."""

    def _rows(self, n):
        return 0, n

    def forward(self, x):
        start, stop = self._rows(len(x))
        return x - x[start:stop].mean(axis=0)

    def backward(self, dout, need_input_grad=True):
        start, stop = self._rows(len(dout))
        dx = dout.copy()
        dx[start:stop] -= dout.sum(axis=0) / (stop - start)
        return dx


class OwnShareCentring(LocalMeanCentring):
    """The same mistake under --reproducible, where every rank is handed the whole batch: the layer
    says it splits columns, so it learns its rank from the column split, and centres by the mean of
    the share of the rows its rank would have held."""

    splits_columns = True

    def _rows(self, n):
        split = self.columns
        if split is None:
            return 0, n
        return n * split.rank // split.size, n * (split.rank + 1) // split.size


def with_layer(layer):
    return nn.Sequential([nn.Linear(SIDE * SIDE, 32), layer, nn.ReLU(), nn.Linear(32, 10)],
                         dtype=np.float32, seed=1)


# ---------------------------------------------------------------- ddptrain.verify


def test_with_reproducible_every_rank_count_gives_the_bits_of_one_process(arrays):
    result = verify(arrays, reproducible=True)
    assert result.ok and result.reproducible and result.steps == 4
    assert [c.ranks for c in result.comparisons] == [2, 3]
    for comparison in result.comparisons:
        assert comparison.bitwise_equal and comparison.first_difference is None
        assert comparison.max_difference == 0.0 and comparison.steps == 4


def test_the_model_given_is_not_trained(arrays):
    model = mlp()
    before = model.params.copy()
    verify(arrays, model, ranks=(2,), steps=2)
    assert np.array_equal(model.params, before)


def test_by_default_the_bits_differ_from_the_first_step_but_within_the_float32_tolerance(arrays):
    result = verify(arrays)
    assert result.ok and not result.reproducible and result.tolerance == 1e-4
    for comparison in result.comparisons:
        assert comparison.first_difference == 1
        assert 0 < comparison.max_difference <= 1e-4 and comparison.within_tolerance


def test_by_default_a_tolerance_tighter_than_the_rounding_fails(arrays):
    result = verify(arrays, tolerance=1e-12)
    assert not result.ok
    assert not any(c.within_tolerance for c in result.comparisons)
    assert result.lines()[-1].startswith("verify: FAILED")


def test_a_layer_that_uses_its_ranks_rows_only_is_caught_at_the_first_step(arrays):
    result = verify(arrays, with_layer(LocalMeanCentring()), ranks=(2,))
    assert not result.ok
    assert result[2].first_difference == 1 and not result[2].within_tolerance
    line = result.lines()[0]
    assert line.startswith("2 ranks: first differs from one process at step 1;")
    assert "(NOT within --tolerance 0.0001)" in line


def test_under_reproducible_a_layer_that_uses_its_ranks_share_of_the_rows_is_caught(arrays):
    result = verify(arrays, with_layer(OwnShareCentring()), ranks=(2, 3), reproducible=True)
    assert not result.ok
    assert [c.first_difference for c in result.comparisons] == [1, 1]


class FeatureCentring(Layer):
    """``y = x - mean(x)`` over each row's features, wrongly declared ``elementwise``: under
    --reproducible a Linear below it then reads only the columns its rank computed of the gradient
    that passed through it, and the others' zeros have been mixed into them."""

    elementwise = True

    def forward(self, x):
        return x - x.mean(axis=1, keepdims=True)

    def backward(self, dout, need_input_grad=True):
        return dout - dout.mean(axis=1, keepdims=True)


def test_under_reproducible_a_layer_wrongly_declared_elementwise_is_caught(arrays):
    # 300 and 140 columns: several blocks, so each rank keeps its own columns of the gradient
    model = nn.Sequential([nn.Linear(SIDE * SIDE, 300), FeatureCentring(), nn.Linear(300, 140),
                           nn.ReLU(), nn.Linear(140, 10)], dtype=np.float32, seed=1)
    result = verify(arrays, model, ranks=(2, 3), reproducible=True)
    assert not result.ok
    assert [c.first_difference for c in result.comparisons] == [1, 1]


def test_under_reproducible_a_local_batch_mean_is_that_of_the_whole_batch(arrays):
    """The mode hands every layer that does not split columns the whole global batch on every rank,
    so a mean over the rows it is given is the same on any number of ranks: nothing to catch."""
    result = verify(arrays, with_layer(LocalMeanCentring()), ranks=(2, 3), reproducible=True)
    assert result.ok and all(c.bitwise_equal for c in result.comparisons)


@pytest.mark.parametrize("options, message", [
    (dict(ranks=(0, 2)), "--ranks: 0 is not a number of ranks"),
    (dict(ranks=(5,)), "--ranks 5: 5 ranks cannot share 24 virtual shards evenly"),
    (dict(ranks=("2",)), "--ranks: '2' is not a number of ranks"),
    (dict(steps=0), "--steps must be a positive integer, got 0"),
    (dict(tolerance=-1.0), "--tolerance must be a finite number not below 0"),
    (dict(run_dir="x"), "ddptrain.verify sets run_dir itself"),
    (dict(simulate_ranks=2), "ddptrain.verify sets simulate_ranks itself"),
    (dict(lr=-1.0), "--lr must not be negative"),
])
def test_what_cannot_be_verified_is_refused_in_one_line(arrays, options, message):
    with pytest.raises(ddptrain.UserError, match="^" + message.replace("(", r"\(")):
        verify(arrays, **options)


# ---------------------------------------------------------------- --max-steps and --record-hashes


def train(arrays, run_dir, **options):
    settings = dict(batch_size=48, epochs=3, threads=1, quiet=True, run_dir=str(run_dir))
    settings.update(options)
    with contextlib.redirect_stdout(io.StringIO()):
        return ddptrain.train(mlp(), arrays, **settings)


def hashes(run_dir):
    return [json.loads(line) for line in (run_dir / "hashes.jsonl").read_text().splitlines()]


def test_max_steps_ends_the_run_after_n_steps_with_a_checkpoint_and_status_0(arrays, tmp_path):
    # 5 steps an epoch: the run ends within its second epoch
    result = train(arrays, tmp_path / "run", max_steps=7)
    assert result.exit_status == EXIT_OK and result.steps == 7 and result.stopped_by is None
    assert result.epochs == 1   # the second epoch ended before its evaluation
    assert checkpoint.newest_valid(tmp_path / "run" / "checkpoints").state["step"] == 7


def test_max_steps_at_the_end_of_an_epoch_ends_it_as_usual(arrays, tmp_path):
    result = train(arrays, tmp_path / "run", max_steps=5)
    assert result.steps == 5 and result.epochs == 1 and result.test_accuracy is not None


def test_record_hashes_writes_a_line_per_step_with_the_step_a_sha256_and_the_loss(arrays,
                                                                                 tmp_path):
    train(arrays, tmp_path / "run", max_steps=7, record_hashes=True)
    lines = hashes(tmp_path / "run")
    assert [line["step"] for line in lines] == list(range(1, 8))
    assert all(len(line["sha256"]) == 64 and np.isfinite(line["loss"]) for line in lines)
    assert len({line["sha256"] for line in lines}) == 7   # the parameters change every step


def test_a_run_resumed_past_its_max_steps_records_the_hashes_of_the_uninterrupted_run(arrays,
                                                                                      tmp_path):
    train(arrays, tmp_path / "whole", max_steps=12, record_hashes=True)
    train(arrays, tmp_path / "parts", max_steps=7, record_hashes=True)
    train(arrays, tmp_path / "parts", max_steps=12, record_hashes=True, resume="auto")
    assert hashes(tmp_path / "parts") == hashes(tmp_path / "whole")


@pytest.mark.parametrize("value, message", [
    ("0", "--max-steps must be a positive integer, got 0"),
    ("-3", "--max-steps must be a positive integer, got -3"),
    ("1.5", "argument --max-steps: invalid int value: '1.5'"),
])
def test_max_steps_must_be_a_positive_integer(small_data, capsys, value, message):
    status, lines = in_process(["--data", small_data, "--model", model_spec(), "--max-steps",
                                value, "--dry-run"], capsys)
    assert status == EXIT_USAGE and len(lines) == 1 and message in lines[0], lines


# ---------------------------------------------------------------- the command line

SMALL = ["--model", model_spec(), "--batch-size", "32", "--threads", "1"]


@pytest.mark.parametrize("ranks, message", [
    ("1,two", "--ranks must be numbers of ranks separated by commas (1,2,4), got '1,two'"),
    ("0,2", "--ranks: 0 is not a number of ranks (at least 1)"),
    ("1,5", "--ranks 5: 5 ranks cannot share 24 virtual shards evenly"),
    ("1,64", "--ranks 64: 64 ranks cannot share 24 virtual shards evenly"),
])
def test_bad_ranks_are_one_line_and_nothing_runs(small_data, capsys, ranks, message):
    status, lines = in_process(["verify", "--ranks", ranks, "--steps", "3", "--data", small_data,
                                *SMALL], capsys)
    assert status == EXIT_USAGE and len(lines) == 1 and message in lines[0], lines


@pytest.mark.parametrize("option", [["--run-dir", "x"], ["--max-steps", "3"], ["--resume", "auto"],
                                    ["--simulate-ranks", "2"], ["--record-hashes"]])
def test_the_options_verify_sets_itself_are_refused(small_data, capsys, option):
    status, lines = in_process(["verify", "--ranks", "2", "--data", small_data, *SMALL, *option],
                               capsys)
    assert status == EXIT_USAGE and len(lines) == 1 and "is verify's to set" in lines[0], lines


def test_a_bad_training_option_is_refused_before_any_run(small_data, capsys):
    status, lines = in_process(["verify", "--ranks", "2", "--data", small_data, *SMALL, "--lr",
                                "-1"], capsys)
    assert status == EXIT_USAGE and lines == ["ddptrain: error: --lr must not be negative, got "
                                              "-1.0"]


def test_dry_run_prints_the_commands_it_would_run(small_data, capsys):
    status = cli.main(["verify", "--ranks", "1,2,4", "--steps", "3", "--dry-run", "--mpiexec",
                       "true", "--data", small_data, *SMALL, "--reproducible"])
    out = capsys.readouterr().out
    assert status == EXIT_OK, out
    commands = [line for line in out.splitlines() if "ranks-" in line]
    assert len(commands) == 3 and "dry run:" in out
    one, two, four = commands
    assert one.startswith("1 rank: ") and "-m ddptrain train --data" in one and "launch" not in one
    assert "-m ddptrain launch -n 2 --mpiexec true -- train --data" in two
    assert four.startswith("4 ranks: ") and "launch -n 4" in four
    for line in commands:
        assert "--max-steps 3 --record-hashes" in line and "--reproducible" in line


def verify_cli(small_data, *options):
    return run(["verify", "--ranks", "1,2", "--steps", "3", "--data", small_data, *SMALL,
                *options])


@pytest.mark.slow
@pytest.mark.mpiexec
def test_verify_with_reproducible_on_1_and_2_ranks_says_bitwise_equal_and_exits_0(small_data):
    proc = verify_cli(small_data, "--reproducible")
    assert proc.returncode == 0, proc.stderr
    assert "2 ranks: bitwise equal to one process at every step (3 steps)" in proc.stdout
    assert "verify: OK: every rank count gives the bits of one process" in proc.stdout


@pytest.mark.slow
@pytest.mark.mpiexec
def test_verify_by_default_passes_within_the_tolerance_and_fails_beyond_it(small_data):
    proc = verify_cli(small_data)
    assert proc.returncode == 0, proc.stderr
    assert "2 ranks: first differs from one process at step 1;" in proc.stdout
    assert "(within --tolerance 0.0001)" in proc.stdout
    proc = verify_cli(small_data, "--tolerance", "1e-12")
    assert proc.returncode == EXIT_FAILURE, proc.stderr
    assert "NOT within --tolerance 1e-12" in proc.stdout and "verify: FAILED" in proc.stdout


@pytest.mark.slow
def test_a_failed_run_is_one_line_naming_its_rank_count(small_data):
    proc = verify_cli(small_data, "--mpiexec", "false")   # an "mpiexec" that fails at once
    assert proc.returncode == EXIT_FAILURE
    assert proc.stderr.splitlines() == ["ddptrain: error: verify: the run on 2 ranks failed "
                                        "(status 1): no output"]
