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

from .comm import ThreadComm


class SimulatedRankError(Exception):
    """Wraps the first error met on a simulated rank other than 0, naming that rank."""


def run_simulated(size, rank_main):
    """Run ``rank_main(comm)`` on ``size`` simulated ranks; rank 0's result, or the first rank's error."""
    comms = ThreadComm.create(size)
    errors = [None] * size

    def run_rank(comm):
        try:
            return rank_main(comm)
        except BaseException as error:      # noqa: BLE001 - re-raised in the main thread below
            errors[comm.rank] = error
            comm.break_collectives()        # wake every rank waiting in a collective
            return None

    threads = [threading.Thread(target=run_rank, args=(comm,), name=f"rank {comm.rank}", daemon=True)
               for comm in comms[1:]]
    for thread in threads:
        thread.start()
    result = run_rank(comms[0])
    for thread in threads:
        thread.join()
    # The error that started it all, not the BrokenBarrierErrors it caused on the other ranks.
    first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)),
                 next((e for e in errors if e is not None), None))
    if first is not None:
        rank = errors.index(first)
        if rank and not getattr(first, "all_ranks", False):
            first.args = (f"(simulated rank {rank}) {first.args[0] if first.args else ''}",) + first.args[1:]
        raise first
    return result
