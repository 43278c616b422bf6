"""--shard-optimizer (ZeRO stage 1): each rank keeps 1/P of the optimiser state, and trains what the
unsharded optimiser trains; its checkpoints resume on any number of ranks, sharded or not."""

import numpy as np
import pytest

from ddptrain import cli
from ddptrain.distributed.comm import SerialComm
from ddptrain.distributed.exchange import ReduceScatter
from ddptrain.distributed.sharding import ShardedOptimizer, shard_bounds
from ddptrain.optim.optimizers import SGD, AdamW
from ddptrain.run import checkpoint as ckpt_io
from helpers import final_params, metrics_records, model_spec, on_simulated_ranks, relative_error

OPTIMIZERS = {"sgd": ["--optimizer", "sgd", "--momentum", "0.9"],
              "adamw": ["--optimizer", "adamw", "--lr", "0.01", "--weight-decay", "0.01"]}


def train(small_data, run_dir, *options, epochs=2):
    return cli.main(["--data", small_data, "--model", model_spec(), "--dtype", "float64",
                     "--batch-size", "29", "--epochs", str(epochs), "--lr-schedule", "constant",
                     "--quiet", "--run-dir", str(run_dir), *map(str, options)])


def test_the_slices_cover_the_parameters_unevenly_when_p_does_not_divide_them():
    assert shard_bounds(10, 3) == [0, 3, 6, 10]
    assert shard_bounds(2, 4) == [0, 0, 1, 1, 2]   # more ranks than values: some slices are empty


def test_aligned_slices_start_at_multiples_of_the_alignment_as_evenly_as_it_allows():
    """--reproducible: a rank's slice of the gradient is whole chunks of the norm's recipe."""
    assert shard_bounds(100, 3, align=16) == [0, 32, 64, 100]
    assert shard_bounds(100, 4, align=16) == [0, 16, 48, 64, 100]
    assert shard_bounds(10, 2, align=16) == [0, 0, 10]   # one chunk: the last rank's


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_sharded_on_p_ranks_trains_the_parameters_of_the_unsharded_optimiser(
        small_data, tmp_path, optimizer, ranks):
    assert train(small_data, tmp_path / "plain", *OPTIMIZERS[optimizer], "--simulate-ranks",
                 ranks) == 0
    assert train(small_data, tmp_path / "sharded", *OPTIMIZERS[optimizer], "--simulate-ranks",
                 ranks, "--shard-optimizer") == 0
    assert relative_error(final_params(tmp_path / "sharded"),
                          final_params(tmp_path / "plain")) < 1e-12
    assert [r["test_accuracy"] for r in metrics_records(tmp_path / "sharded")] == \
        [r["test_accuracy"] for r in metrics_records(tmp_path / "plain")]


def test_in_one_process_sharded_and_unsharded_are_bitwise_equal(small_data, tmp_path):
    assert train(small_data, tmp_path / "plain", *OPTIMIZERS["adamw"]) == 0
    assert train(small_data, tmp_path / "sharded", *OPTIMIZERS["adamw"], "--shard-optimizer") == 0
    np.testing.assert_array_equal(final_params(tmp_path / "sharded"),
                                  final_params(tmp_path / "plain"))


def test_each_rank_holds_a_third_of_the_state_and_the_checkpoint_all_of_it(small_data, tmp_path):
    n = 1000
    grads = np.random.default_rng(0).standard_normal(n)

    def state_bytes(optimizer):
        """Bytes of optimiser state this rank holds."""
        return sum(value.nbytes for value in optimizer.optimizer.state_dict().values()
                   if isinstance(value, np.ndarray))

    def step_on_rank(comm):
        exchange = ReduceScatter(comm, n)
        optimizer = exchange.sharded_optimizer(AdamW())
        params = np.zeros(n)
        # what every rank would hold after an Allreduce of equal shares
        reduced = grads * comm.size
        optimizer.step(params, reduced.copy(), 0.01)
        exchange.publish_(params)   # every rank's updated slice, on every rank
        return state_bytes(optimizer), optimizer.state_dict(), params

    results = on_simulated_ranks(3, step_on_rank)
    # m and v of a slice
    assert [memory for memory, *_ in results] == [2 * 333 * 8, 2 * 333 * 8, 2 * 334 * 8]
    whole = AdamW()
    unsharded_params = np.zeros(n)
    whole.step(unsharded_params, grads * 3, 0.01)
    for _, state, params in results:
        np.testing.assert_array_equal(params, unsharded_params)
        np.testing.assert_array_equal(state["exp_avg"], whole.state_dict()["exp_avg"])
        np.testing.assert_array_equal(state["exp_avg_sq"], whole.state_dict()["exp_avg_sq"])


@pytest.mark.parametrize("then",
                         [["--simulate-ranks", 2], ["--simulate-ranks", 4, "--shard-optimizer"],
                          []], ids=["2-ranks-unsharded", "4-ranks-sharded", "one-process"])
def test_a_sharded_checkpoint_resumes_on_another_number_of_ranks_sharded_or_not(
        small_data, tmp_path, then):
    options = OPTIMIZERS["adamw"]
    assert train(small_data, tmp_path / "whole", *options, "--simulate-ranks", 3,
                 "--shard-optimizer") == 0
    assert train(small_data, tmp_path / "resumed", *options, "--simulate-ranks", 3,
                 "--shard-optimizer", epochs=1) == 0
    saved = ckpt_io.newest_valid(tmp_path / "resumed" / "checkpoints")
    n = sum(a.size for a in saved.params.values())
    # the whole state
    assert saved.optimizer["type"] == "AdamW" and saved.optimizer["exp_avg"].shape == (n,)
    assert train(small_data, tmp_path / "resumed", *options, *then, "--resume", "auto") == 0
    assert relative_error(final_params(tmp_path / "resumed"),
                          final_params(tmp_path / "whole")) < 1e-12


def test_debug_checks_the_gradient_of_a_sharded_run(small_data, tmp_path, capsys):
    assert train(small_data, tmp_path / "r", "--debug", "--simulate-ranks", 3, "--shard-optimizer",
                 epochs=1) == 0
    assert "the allreduced gradient agrees with finite differences" in capsys.readouterr().out


def test_sharding_an_optimiser_without_state_is_refused_with_one_line(small_data, tmp_path, capsys):
    assert train(small_data, tmp_path / "r", "--momentum", "0", "--shard-optimizer") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--shard-optimizer: SGD without --momentum keeps no state to shard" in err


def test_one_process_sharding_is_the_plain_optimiser():
    optimizer = ShardedOptimizer(SGD(momentum=0.9), SerialComm(), 5)
    params, grads = np.ones(5), np.arange(5.0)
    optimizer.step(params, grads, 0.1)
    np.testing.assert_array_equal(params, 1 - 0.1 * np.arange(5.0))
    assert optimizer.name == "SGD" and optimizer.steps == 1
