"""distributed/gather.py: every rank's part of an array on every rank, through MPI or through the
node's shared memory, on simulated ranks (threads of this process, whose shared blocks are one
array)."""

import threading

import numpy as np
import pytest

from ddptrain.distributed.gather import MessageGather, NodeGather
from ddptrain.errors import UserError
from helpers import on_simulated_ranks

WAYS = {"messages": MessageGather, "node memory": lambda comm: NodeGather(comm.split_by_node()[0])}


@pytest.mark.parametrize("way", sorted(WAYS))
def test_every_rank_gets_every_ranks_part_in_gather_after_gather(way):
    """Parts of unequal sizes, two names, sizes that grow: each gather holds every rank's part."""

    def work(comm):
        gather, results = WAYS[way](comm), []
        for size, name in ((3, "a"), (5, "b"), (3, "a"), (9, "a"), (2, "b")):
            bounds = np.cumsum([0] + [size + rank for rank in range(comm.size)])
            array = gather.buffer(name, int(bounds[-1]), np.float32)
            array[bounds[comm.rank]:bounds[comm.rank + 1]] = comm.rank + 10 * size
            gather.allgather_(array, bounds)
            results.append(array.copy())
        gather.close()
        return results

    expected = [np.concatenate([np.full(size + rank, rank + 10 * size) for rank in range(3)])
                for size in (3, 5, 3, 9, 2)]
    for results in on_simulated_ranks(3, work):
        for got, want in zip(results, expected):
            np.testing.assert_array_equal(got, want)


def test_a_node_gather_leaves_the_last_gather_alone_while_the_next_one_is_written():
    """A rank through one barrier writes the next gather while a slower one may still read the last:
    the two use different memory, and the one after reuses the first's."""

    def work(comm):
        gather = WAYS["node memory"](comm)
        first = gather.buffer("rows", 4, np.float64)
        first[comm.rank] = 1
        gather.allgather_(first, None)
        second = gather.buffer("rows", 4, np.float64)
        third = gather.buffer("rows", 4, np.float64)
        kept = first.copy()
        gather.close()
        return (np.shares_memory(first, second), np.shares_memory(first, third), kept)

    for apart, reused, kept in on_simulated_ranks(2, work):
        assert not apart and reused
        np.testing.assert_array_equal(kept, [1, 1, 0, 0])   # both ranks' writes, seen by each


def test_a_node_gather_gathers_only_the_buffer_it_gave_last():
    gather = NodeGather(on_simulated_ranks(1, lambda comm: comm)[0])
    gather.buffer("rows", 4, np.float32)
    with pytest.raises(ValueError, match="the last buffer it gave"):
        gather.allgather_(np.zeros(4, np.float32), [0, 4])


def test_a_node_gather_refuses_on_every_rank_where_the_node_memory_is_short(monkeypatch):
    """A full /dev/shm would end a rank with SIGBUS when it touched the pages: every rank of the
    node says so in one line instead, together (none is left waiting in the collective), though
    only rank 1 found it short."""
    from ddptrain.distributed import node_memory
    seen = threading.local()
    monkeypatch.setattr(node_memory, "shared_memory_free",
                        lambda: 1000 if getattr(seen, "short", False) else None)

    def work(comm):
        seen.short = comm.rank == 1
        with pytest.raises(UserError, match=r"/dev/shm has less than 20 KiB free .* use "
                                            r"--exchange allreduce"):
            WAYS["node memory"](comm).buffer("rows", 4096, np.float32)
        return True

    assert on_simulated_ranks(2, work) == [True, True]
