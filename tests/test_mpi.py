"""Data parallelism under a real MPI launcher: the tests in tests/mpi, and the CLI with 4 ranks."""

import json
import subprocess
import sys

import pytest

import helpers
from ddptrain.run import checkpoint
from helpers import model_spec

pytestmark = [pytest.mark.slow, pytest.mark.mpiexec]   # every test here starts processes


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_the_distributed_tests_pass_under_mpiexec(ranks):
    """Runs tests/mpi/ (P ranks reproduce one process, and more) with P ranks."""
    argv = [*helpers.mpiexec(ranks), sys.executable, "-m", "pytest", "--with-mpi", "-q",
            "-p", "no:cacheprovider", "tests/mpi"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=helpers.ROOT,
                          env=helpers.clean_env())
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    # every rank ran every test
    assert proc.stdout.count(" passed") == ranks and " failed" not in proc.stdout


def test_mpirun_with_4_ranks_trains_and_rank_0_alone_writes_metrics_and_checkpoints(
        small_data, tmp_path):
    run_dir = tmp_path / "run"
    proc = helpers.run(["--data", small_data, "--model", model_spec(), "--epochs", "2",
                        "--batch-size", "32", "--run-dir", run_dir], ranks=4, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "4 ranks" in proc.stdout and "global batch 32 = 8 per rank" in proc.stdout
    assert proc.stdout.count("epoch 2/2 done") == 1       # printed by rank 0 only
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]         # written once, not once per rank
    assert records[1]["train_loss"] < records[0]["train_loss"]
    final = checkpoint.newest_valid(run_dir / "checkpoints")
    assert final.state["epoch"] == 2 and final.config["batch_size"] == 32
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "checkpoints", "config.json",
                                                         "metrics.jsonl"]
