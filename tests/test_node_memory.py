"""The gradient exchange through a node's shared memory (``--exchange shared-memory``, the default):
the ranks of a node share one copy of the parameters, sum each other's gradients there, and each
updates its slice; it trains what MPI's Allreduce trains. Here on simulated ranks (threads, which
share memory as the ranks of a node do); tests/mpi runs the same on MPI ranks,
tests/test_multi_node.py across hosts."""

import numpy as np
import pytest

import ddptrain
from ddptrain import cli
from ddptrain.distributed import node_memory
from ddptrain.distributed.exchange import choose_node_memory
from ddptrain.distributed.node_memory import NodeMemory
from ddptrain.distributed.sharding import shard_bounds
from ddptrain.nn.model import Sequential
from ddptrain.run.config import Config
from helpers import final_params, metrics_records, model_spec, on_simulated_ranks, relative_error


def train(small_data, run_dir, *options, epochs=2):
    return cli.main(["--data", small_data, "--model", model_spec(), "--dtype", "float64",
                     "--batch-size", "29", "--epochs", str(epochs), "--lr-schedule", "constant",
                     "--quiet", "--run-dir", str(run_dir), *map(str, options)])


def placed_models(ranks, spec="20-16-5"):
    """On ``ranks`` simulated ranks: each builds the same model and places it in the node's
    memory."""
    def work(comm):
        model = Sequential.from_spec(spec, dtype=np.float64, seed=1)
        shared = NodeMemory(comm, model.params.size, model.dtype)
        shared.place(model)
        return model, shared
    return on_simulated_ranks(ranks, work)


def test_the_ranks_of_a_node_share_one_copy_of_the_parameters_and_keep_their_own_gradients():
    placed = placed_models(3)
    reference = Sequential.from_spec("20-16-5", dtype=np.float64, seed=1)
    for model, _ in placed:
        np.testing.assert_array_equal(model.params, reference.params)   # the values they had
        assert np.shares_memory(model.params, placed[0][0].params)
        first = next(layer for layer in model.layers if layer.params)
        # the layers' views follow
        assert np.shares_memory(first.params["weight"], placed[0][0].params)
        assert np.shares_memory(first.grads["weight"], model.grads)
    assert not np.shares_memory(placed[1][0].grads, placed[2][0].grads)


@pytest.mark.parametrize("ranks", [2, 3, 5])
def test_each_rank_receives_the_sum_of_every_rank_s_gradient_in_its_own_slice(ranks):
    def work(comm):
        model = Sequential.from_spec("3-4-3", dtype=np.float64, seed=0)   # 31 values: uneven slices
        shared = NodeMemory(comm, model.params.size, model.dtype)
        shared.place(model)
        model.grads[...] = np.arange(model.grads.size) * 10.0 ** comm.rank
        bounds = shard_bounds(model.grads.size, comm.size)
        mine = shared.reduce_scatter_(model.grads, bounds).copy()
        return mine, model.grads.copy(), bounds

    results = on_simulated_ranks(ranks, work)
    for rank, (mine, grads, bounds) in enumerate(results):
        lo, hi = bounds[rank], bounds[rank + 1]
        total = np.arange(grads.size) * sum(10.0 ** r for r in range(ranks))
        np.testing.assert_array_equal(mine, total[lo:hi])
        # in place, in its slot
        np.testing.assert_array_equal(grads[lo:hi], total[lo:hi])
        # rest untouched
        np.testing.assert_array_equal(grads[:lo], (np.arange(grads.size) * 10.0 ** rank)[:lo])


def test_gathering_the_gradient_gives_every_rank_every_reduced_slice():
    def work(comm):
        model = Sequential.from_spec("3-4-3", dtype=np.float64, seed=0)
        shared = NodeMemory(comm, model.params.size, model.dtype)
        shared.place(model)
        model.grads[...] = comm.rank + 1.0
        bounds = shard_bounds(model.grads.size, comm.size)
        shared.reduce_scatter_(model.grads, bounds)
        shared.gather_gradient_(model.grads, bounds)
        return model.grads.copy()

    for grads in on_simulated_ranks(3, work):
        np.testing.assert_array_equal(grads, np.full(31, 6.0))


def test_a_released_model_keeps_private_copies_of_its_parameters():
    def work(comm):
        model = Sequential.from_spec("3-4-3", dtype=np.float64, seed=0)
        shared = NodeMemory(comm, model.params.size, model.dtype)
        shared.place(model)
        before = model.params.copy()
        shared.release(model)
        return model, before

    (first, before), (second, _) = on_simulated_ranks(2, work)
    np.testing.assert_array_equal(first.params, before)
    assert not np.shares_memory(first.params, second.params)
    first.params[0] += 1   # writable, and only its own
    assert second.params[0] == before[0]


@pytest.mark.parametrize("optimizer",
                         [["--optimizer", "sgd", "--momentum", "0.9", "--weight-decay", "1e-3"],
                          ["--optimizer", "adamw", "--lr", "0.01", "--weight-decay", "0.01"]],
                         ids=["sgd", "adamw"])
@pytest.mark.parametrize("ranks", [3, 4])
def test_on_p_ranks_the_shared_memory_exchange_trains_the_parameters_of_one_process(
        small_data, tmp_path, ranks, optimizer):
    assert train(small_data, tmp_path / "one", *optimizer) == 0
    assert train(small_data, tmp_path / "shared", *optimizer, "--simulate-ranks", ranks,
                 "--exchange", "shared-memory", "--clip-grad-norm", "5") == 0
    assert train(small_data, tmp_path / "clipped", *optimizer, "--clip-grad-norm", "5") == 0
    assert relative_error(final_params(tmp_path / "shared"),
                          final_params(tmp_path / "clipped")) < 1e-9
    assert [r["test_accuracy"] for r in metrics_records(tmp_path / "shared")] == \
        [r["test_accuracy"] for r in metrics_records(tmp_path / "clipped")]


def test_with_two_ranks_both_exchanges_train_bitwise_the_same_parameters(small_data, tmp_path):
    """Two ranks' gradients are added in the same order both ways (a + b == b + a exactly)."""
    assert train(small_data, tmp_path / "shared", "--simulate-ranks", 2, "--exchange",
                 "shared-memory") == 0
    assert train(small_data, tmp_path / "mpi", "--simulate-ranks", 2, "--exchange",
                 "allreduce") == 0
    np.testing.assert_array_equal(final_params(tmp_path / "shared"), final_params(tmp_path / "mpi"))


def test_a_run_resumes_with_the_other_exchange_as_if_never_interrupted(small_data, tmp_path):
    assert train(small_data, tmp_path / "whole", "--simulate-ranks", 2) == 0
    assert train(small_data, tmp_path / "halves", "--simulate-ranks", 2, epochs=1) == 0
    assert train(small_data, tmp_path / "halves", "--simulate-ranks", 2, "--exchange", "allreduce",
                 "--resume", "auto") == 0
    np.testing.assert_array_equal(final_params(tmp_path / "halves"),
                                  final_params(tmp_path / "whole"))


def test_the_start_up_says_how_the_gradient_is_exchanged(small_data, tmp_path, capsys):
    assert cli.main(["--data", small_data, "--model", model_spec(), "--epochs", "1",
                     "--simulate-ranks", "2", "--run-dir", str(tmp_path / "a")]) == 0
    assert ("gradients: summed in shared memory by the 2 ranks of this node; each rank updates 1/2 "
            "of the shared parameters") in capsys.readouterr().out
    assert cli.main(["--data", small_data, "--model", model_spec(), "--epochs", "1",
                     "--simulate-ranks", "2", "--exchange", "allreduce", "--run-dir",
                     str(tmp_path / "b")]) == 0
    assert "gradients: MPI Allreduce\n" in capsys.readouterr().out


def test_debug_runs_through_allreduce_since_it_perturbs_each_rank_s_parameters(
        small_data, tmp_path, capsys):
    assert train(small_data, tmp_path / "r", "--debug", "--simulate-ranks", 2, epochs=1) == 0
    config = Config(debug=True, dtype="float64")
    assert choose_node_memory(_Size(2), config, 10) == (False, "--debug exchanges through MPI")


@pytest.mark.parametrize("other", ["--overlap-allreduce", "--shard-optimizer", "--debug"])
def test_shared_memory_with_an_option_that_exchanges_through_mpi_is_refused_in_one_line(
        small_data, tmp_path, capsys, other):
    assert train(small_data, tmp_path / "r", "--exchange", "shared-memory", other,
                 "--simulate-ranks", 2) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert (f"--exchange shared-memory with {other}: {other} exchanges the gradient "
            f"through MPI") in err


def test_an_unknown_exchange_is_refused_by_name(small_data, tmp_path, capsys):
    assert train(small_data, tmp_path / "r", "--exchange", "carrier-pigeon") == 2
    assert "--exchange: invalid choice: 'carrier-pigeon'" in capsys.readouterr().err


def test_without_room_in_shared_memory_auto_falls_back_to_allreduce_and_a_request_for_it_is_refused(
        small_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(node_memory, "shared_memory_free", lambda: 1024)   # 1 KiB free in /dev/shm
    assert cli.main(["--data", small_data, "--model", model_spec(), "--epochs", "1",
                     "--simulate-ranks", "2", "--run-dir", str(tmp_path / "auto")]) == 0
    assert "gradients: MPI Allreduce (/dev/shm has less than" in capsys.readouterr().out
    assert train(small_data, tmp_path / "asked", "--simulate-ranks", 2, "--exchange",
                 "shared-memory") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--exchange shared-memory: /dev/shm has less than" in err
    assert "use --exchange allreduce" in err


def test_one_process_and_one_rank_per_node_need_no_shared_memory():
    assert choose_node_memory(_Size(1), Config(), 10) == (False, "one rank")
    assert choose_node_memory(_Size(2, node_size=1), Config(), 10) == (False, "one rank per node")
    assert choose_node_memory(_Size(2), Config(exchange="allreduce"), 10) == (False, "asked for")


def test_nodes_with_different_rank_counts_fall_back_to_allreduce():
    assert choose_node_memory(_Size(3, layouts=[2, 2, 1]), Config(), 10) == \
        (False, "the nodes hold different numbers of ranks (2, 2, 1)")


def test_the_api_model_trained_through_shared_memory_outlives_the_run(small_data, tmp_path):
    model = Sequential.from_spec(model_spec(), dtype=np.float64, seed=0)
    result = ddptrain.train(model, small_data, epochs=1, simulate_ranks=2, quiet=True,
                            run_dir=str(tmp_path / "r"))
    assert result.exit_status == 0
    # its own array, not the node's
    assert model.params.base is None and model.params.flags.writeable
    trained = np.concatenate([array.ravel() for _, array in sorted(model.named_params())])
    np.testing.assert_array_equal(trained, final_params(tmp_path / "r"))   # what the run trained


class _Size:
    """A stand-in communicator of ``size`` ranks whose nodes hold ``node_size`` ranks each (or
    ``layouts``)."""

    def __init__(self, size, node_size=None, layouts=None):
        self.size, self.rank = size, 0
        self._layouts = layouts or [node_size or size] * size

    def split_by_node(self):
        return _Node(self._layouts[0]), _Node(len(self._layouts))

    def allgather(self, value):
        return [(size, value[1]) for size in self._layouts]


class _Node:
    def __init__(self, size):
        self.size, self.rank = size, 0

    def free(self):
        pass


def test_shared_memory_that_cannot_be_had_is_one_line_naming_the_way_out(
        small_data, tmp_path, capsys, monkeypatch):
    from ddptrain.distributed.simulate import ThreadComm

    def refuse(self, count, dtype):
        raise OSError("No space left on device")
    monkeypatch.setattr(ThreadComm, "allocate_shared", refuse)
    assert train(small_data, tmp_path / "r", "--simulate-ranks", 2) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    # the parameters and 2 gradients of 1,210 float64 values: 28 KiB
    assert ("--exchange shared-memory: could not get 28 KiB of shared memory on this node "
            "(OSError: No space left on device); use --exchange allreduce") in err
