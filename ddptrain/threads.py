"""BLAS threads per rank: ranks that share cores split them, so a node is never oversubscribed."""

from __future__ import annotations

import os
import socket

from .comm import collective


@collective
def configure_blas_threads(comm, requested=0):
    """Give each rank its share of the cores it may run on; returns ``(threads, a line saying so)``.

    Collective. Ranks that share a node and the same CPU affinity split those
    cores between them; a rank bound to its own cores (mpirun --bind-to, srun
    --cpu-bind) uses all of them. ``requested`` > 0 overrides.
    """
    from threadpoolctl import threadpool_info, threadpool_limits

    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    me = (socket.gethostname(), tuple(sorted(cores)))
    sharing = sum(1 for other in comm.allgather(me) if other == me)   # DDP
    threads = requested or max(1, len(cores) // sharing)
    threadpool_limits(limits=threads, user_api="blas")
    blas = next((lib for lib in threadpool_info() if lib.get("user_api") == "blas"), {})
    library = blas.get("internal_api", "unknown BLAS")
    how = "set by --threads" if requested else f"{len(cores)} cores shared by {sharing} rank(s)"
    return threads, f"{threads} {library} thread{'s' if threads > 1 else ''} per rank ({how})"
