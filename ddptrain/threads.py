"""BLAS threads per rank: ranks that share cores split them, so a node is never oversubscribed."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from .comm import collective
from .errors import UserError


def usable_cores():
    """The cores this process may run on (its CPU affinity)."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


@dataclass(frozen=True)
class BlasThreads:
    threads: int          # BLAS threads of this rank
    description: str      # a line for the start-up output
    ranks_on_host: int    # ranks running on this rank's host, this one included


@collective
def configure_blas_threads(comm, requested=0):
    """Give each rank its share of the cores it may run on; a ``BlasThreads``.

    Ranks that share a node and the same CPU affinity split those cores
    between them; a rank bound to its own cores (mpirun --bind-to, srun
    --cpu-bind) uses all of them. ``requested`` > 0 overrides, and is refused
    (a UserError, the same on every rank) where it exceeds a rank's cores:
    more threads than cores only slow the matrix products down.
    """
    from threadpoolctl import threadpool_info, threadpool_limits

    cores = usable_cores()
    me = (socket.gethostname(), tuple(sorted(cores)))
    everyone = comm.allgather(me)   # DDP
    fewest = min(len(other_cores) for _, other_cores in everyone)
    if requested > fewest:
        raise UserError(f"--threads {requested}: a rank here may use {fewest} cores; more threads than cores only "
                        f"slow the matrix products down")
    sharing = sum(1 for other in everyone if other == me)
    threads = requested or max(1, len(cores) // sharing)
    threadpool_limits(limits=threads, user_api="blas")
    blas = next((lib for lib in threadpool_info() if lib.get("user_api") == "blas"), {})
    library = blas.get("internal_api", "unknown BLAS")
    how = "set by --threads" if requested else f"{len(cores)} cores shared by {sharing} rank(s)"
    return BlasThreads(threads, f"{threads} {library} thread{'s' if threads > 1 else ''} per rank ({how})",
                       ranks_on_host=sum(1 for host, _ in everyone if host == me[0]))
