"""Simulated ranks: P ranks as P threads of one process (``--simulate-ranks P``).

Each thread runs exactly the code an MPI rank runs (``runner.run_training``)
with a ``ThreadComm``: its own shard, its own model replica, and collectives
through shared memory. The result equals ``mpirun -n P`` up to the order of
floating-point additions, and the whole distributed run can be stepped
through with pdb (``python -m pdb -m ddptrain --simulate-ranks 4``). Rank 0
runs in the main thread, so signals (Ctrl-C) reach it as in one process.
"""

from __future__ import annotations

import threading

import numpy as np

from ddptrain.distributed.comm import DONE, SerialComm, SharedBlock


def run_simulated(size, rank_main):
    """Run ``rank_main(comm)`` on ``size`` simulated ranks; rank 0's result, or the first rank's
    error."""
    comms = ThreadComm.create(size)
    errors = [None] * size

    def run_rank(comm):
        try:
            return rank_main(comm)
        except BaseException as error:      # noqa: BLE001 - re-raised in the main thread below
            errors[comm.rank] = error
            comm.break_collectives()        # wake every rank waiting in a collective
            return None

    threads = [threading.Thread(target=run_rank, args=(comm,), name=f"rank {comm.rank}",
                                daemon=True) for comm in comms[1:]]
    for thread in threads:
        thread.start()
    result = run_rank(comms[0])
    for thread in threads:
        thread.join()
    # The error that started it all, not the BrokenBarrierErrors it caused on the other ranks.
    first = next((e for e in errors if e is not None
                  and not isinstance(e, threading.BrokenBarrierError)),
                 next((e for e in errors if e is not None), None))
    if first is not None:
        rank = errors.index(first)
        if rank and not getattr(first, "all_ranks", False):
            first.args = ((f"(simulated rank {rank}) {first.args[0] if first.args else ''}",)
                          + first.args[1:])
        raise first
    return result


class _ThreadHub:
    """What the simulated ranks share: a barrier and one slot per rank."""

    def __init__(self, size):
        self.size = size
        self.barrier = threading.Barrier(size)
        self.slots = [None] * size


class ThreadComm:
    """Rank ``rank`` of ``size`` simulated ranks: threads of one process (``--simulate-ranks``).

    The same training code runs in every thread, on that rank's shard, and
    the collectives below exchange data through shared memory. Sums are taken
    in rank order, so a simulated run is deterministic; it equals an MPI run
    up to the order of floating-point additions. Use it to step through the
    distributed logic with pdb, without MPI. If one thread fails, ``abort``
    breaks the barrier so that no other thread waits forever.
    """

    library = "simulated (threads of one process)"

    def __init__(self, hub, rank):
        self._hub, self.rank, self.size = hub, rank, hub.size

    @classmethod
    def create(cls, size):
        hub = _ThreadHub(size)
        return [cls(hub, rank) for rank in range(size)]

    def _exchange(self, value):
        """Every rank's ``value``, in rank order."""
        hub = self._hub
        hub.slots[self.rank] = value
        hub.barrier.wait()
        values = list(hub.slots)
        hub.barrier.wait()   # nobody overwrites a slot before everyone has read them all
        return values

    def allreduce_(self, array):
        values = self._exchange(array.copy())
        total = values[0].copy()
        for value in values[1:]:
            total += value
        array[...] = total
        return array

    def iallreduce_(self, array):
        # threads: done at once (what overlaps is the MPI ranks' communication)
        self.allreduce_(array)
        return DONE

    def allreduce(self, value):
        if isinstance(value, np.ndarray):
            return self.allreduce_(value.copy())
        values = self._exchange(value)
        total = values[0]
        for v in values[1:]:   # in rank order: deterministic
            total = total + v
        return total

    def bcast(self, obj, root=0):
        return self._exchange(obj)[root]

    def bcast_(self, array, root=0):
        array[...] = self._exchange(array.copy())[root]
        return array

    def allgather(self, obj):
        return self._exchange(obj)

    def gather(self, obj, root=0):
        values = self._exchange(obj)
        return values if self.rank == root else None

    def reduce_scatter_(self, array, bounds):
        lo, hi = bounds[self.rank], bounds[self.rank + 1]
        values = self._exchange(array.copy())
        total = values[0][lo:hi].copy()
        for value in values[1:]:   # in rank order: deterministic
            total += value[lo:hi]
        array[lo:hi] = total
        return array[lo:hi]

    def allgather_(self, array, bounds):
        values = self._exchange(array[bounds[self.rank]:bounds[self.rank + 1]].copy())
        for rank, value in enumerate(values):
            array[bounds[rank]:bounds[rank + 1]] = value
        return array

    def barrier(self):
        self._hub.barrier.wait()

    def split_by_node(self):
        return self, SerialComm()   # threads of one process: one node

    def free(self):
        pass   # split_by_node made nothing

    def allocate_shared(self, count, dtype):
        array = self._exchange(np.zeros(count, dtype=dtype) if self.rank == 0 else None)[0]
        return SharedBlock(array, sync=self.barrier)

    def break_collectives(self):
        """Wake every rank waiting in a collective (with BrokenBarrierError): one of them failed."""
        self._hub.barrier.abort()

    def abort(self, status):
        self.break_collectives()
        raise SystemExit(status)
