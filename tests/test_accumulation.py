"""--accumulate K: micro-batches summed on each rank, one Allreduce a step, the training of no
accumulation."""

import numpy as np
import pytest

from ddptrain import cli
from ddptrain.distributed.comm import SerialComm
from ddptrain.distributed.exchange import Allreduce
from ddptrain.nn.layers import Linear
from ddptrain.nn.losses import SoftmaxCrossEntropy
from ddptrain.nn.model import Sequential
from ddptrain.optim.optimizers import SGD
from ddptrain.training.step import TrainStep, micro_batch_bounds
from helpers import final_params, metrics_records, relative_error

# 240 rows in global batches of 29: shares of 9 or 10 rows on 3 ranks, and a last batch of 8 (2 or 3
# each).
MODEL = "64-16-drop0.2-12-10"   # dropout: its masks follow the rows' positions in the global batch


def train(small_data, run_dir, *options):
    return cli.main(["--data", small_data, "--model", MODEL, "--dtype", "float64", "--batch-size",
                     "29", "--epochs", "2", "--lr", "0.1", "--momentum", "0.9", "--quiet",
                     "--run-dir", str(run_dir), *map(str, options)])


@pytest.fixture(scope="module")
def reference(small_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("accumulate") / "reference"
    assert train(small_data, run_dir) == 0
    return final_params(run_dir), metrics_records(run_dir)


@pytest.mark.parametrize("ranks", [1, 3])
@pytest.mark.parametrize("k", [1, 2, 4, 16])   # 16: more micro-batches than a rank has rows
def test_k_micro_batches_on_p_ranks_train_the_parameters_of_one_process_without_them(
        small_data, tmp_path, reference, ranks, k):
    options = ["--accumulate", k] + (["--simulate-ranks", ranks] if ranks > 1 else [])
    assert train(small_data, tmp_path / "run", *options) == 0
    params, records = final_params(tmp_path / "run"), metrics_records(tmp_path / "run")
    assert relative_error(params, reference[0]) < 1e-12
    for mine, theirs in zip(records, reference[1]):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-12)
        assert mine["train_accuracy"] == theirs["train_accuracy"]
        assert mine["test_accuracy"] == theirs["test_accuracy"]


def test_micro_batches_are_nearly_equal_slices_and_may_be_empty():
    assert micro_batch_bounds(10, 4) == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert micro_batch_bounds(2, 4) == [(0, 0), (0, 1), (1, 1), (1, 2)]


class CountingComm(SerialComm):
    def __init__(self):
        super().__init__()
        self.allreduces = 0

    def allreduce_(self, array):
        self.allreduces += 1
        return super().allreduce_(array)


def test_a_step_reduces_once_and_holds_the_activations_of_one_micro_batch():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 20)), rng.integers(0, 5, 64)
    model = Sequential.from_spec("20-256-5", dtype=np.float64)
    comm = CountingComm()
    TrainStep(model, SoftmaxCrossEntropy(), SGD(), Allreduce(comm),
              micro_batches=4)(x, y, 64, lr=0.1)
    assert comm.allreduces == 2   # the gradient once, and the step's four totals
    hidden = next(layer for layer in model.layers if isinstance(layer, Linear))
    # The largest activation array, the hidden layer's output, holds 16 rows, not 64: peak
    # activation memory is a micro-batch's.
    assert hidden._scratch._arrays["out"].shape == (16, 256)


def test_accumulation_with_batch_normalisation_is_refused_with_one_line(
        small_data, tmp_path, capsys):
    assert cli.main(["--data", small_data, "--model", "64-16-bn-10", "--accumulate", "2",
                     "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--accumulate 2 with batch normalisation (64-16-bn-10)" in err
    assert not (tmp_path / "r").exists()


def test_debug_confirms_the_accumulated_gradient(small_data, tmp_path, capsys):
    assert cli.main(["--data", small_data, "--model", MODEL, "--batch-size", "29", "--epochs", "1",
                     "--debug", "--accumulate", "3", "--simulate-ranks", "3", "--run-dir",
                     str(tmp_path / "r")]) == 0
    assert "the allreduced gradient agrees with finite differences" in capsys.readouterr().out
