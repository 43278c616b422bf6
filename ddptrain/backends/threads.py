"""BLAS threads per rank: ranks that share cores split them, so a node is never oversubscribed."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from ddptrain.errors import UserError


def usable_cores():
    """The cores this process may run on (its CPU affinity)."""
    return (os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity")
            else set(range(os.cpu_count() or 1)))


@dataclass(frozen=True)
class BlasThreads:
    threads: int          # BLAS threads of this rank
    description: str      # a line for the start-up output
    ranks_on_host: int    # ranks running on this rank's host, this one included
    hosts: dict = None    # host name -> its ranks, in order of their first rank

    @property
    def host_line(self):
        """``1 host`` or ``2 hosts (ddpt-h1: ranks 0-1, ddpt-h2: ranks 2-3)``, for the start-up
        output."""
        if len(self.hosts) == 1:
            return "1 host"
        return (f"{len(self.hosts)} hosts ("
                + ", ".join(f"{host}: {_ranks_text(ranks)}" for host, ranks in self.hosts.items())
                + ")")


def _ranks_text(ranks):
    """``rank 3``, ``ranks 0-1``, or ``ranks 0, 2, 4`` (a host's ranks need not be consecutive)."""
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return "ranks " + ", ".join(map(str, ranks))


def configure_blas_threads(comm, requested=0, library=None):
    """Give each rank its share of the cores it may run on; a ``BlasThreads``.

    Ranks that share a node and the same CPU affinity split those cores
    between them; a rank bound to its own cores (mpirun --bind-to, Open MPI's
    mpirun by default, srun --cpu-bind) uses all of them. ``requested`` > 0
    overrides, and is refused (a UserError, the same on every rank) where it
    exceeds a rank's cores: more threads than cores only slow the matrix
    products down. ``library``: the backend's name (``"mkl"``), else numpy's
    BLAS is named. A collective.
    """
    from threadpoolctl import threadpool_info, threadpool_limits

    cores = usable_cores()
    me = (socket.gethostname(), tuple(sorted(cores)))
    everyone = comm.allgather(me)   # DDP
    fewest = min(len(other_cores) for _, other_cores in everyone)
    if requested > fewest:
        raise UserError(f"--threads {requested}: a rank here may use {fewest} cores; more threads "
                        "than cores only slow the matrix products down")
    sharing = sum(1 for other in everyone if other == me)
    threads = requested or max(1, len(cores) // sharing)
    threadpool_limits(limits=threads, user_api="blas")
    # The library of the matrix products (gemm.py): threadpool_limits set the threads of every BLAS
    # loaded.
    blas = next((lib for lib in threadpool_info() if lib.get("user_api") == "blas"), {})
    library = "mkl" if library == "mkl" else blas.get("internal_api", "unknown BLAS")
    hosts = {}
    for rank, (host, _) in enumerate(everyone):
        hosts.setdefault(host, []).append(rank)
    return BlasThreads(threads, _description(everyone, requested, library),
                       ranks_on_host=len(hosts[me[0]]), hosts=hosts)


def _description(everyone, requested, library):
    """The threads of every rank, in a line:
    ``1 openblas thread per rank (2 cores shared by 2 rank(s))``, and per host where hosts differ
    (rank 0 prints it for all of them)."""
    def plural(n):
        return f"{n} {library} thread{'s' if n > 1 else ''} per rank"

    if requested:
        return f"{plural(requested)} (set by --threads)"
    # One entry per group of ranks sharing cores, (host, cores): the threads each of its ranks gets.
    shares = {member: max(1, len(member[1]) // everyone.count(member)) for member in everyone}
    if len(shares) == 1:
        [(member, threads)] = shares.items()
        return (f"{plural(threads)} ({len(member[1])} cores shared by "
                f"{everyone.count(member)} rank(s))")
    alike = len({(len(cores), everyone.count((host, cores))) for host, cores in shares}) == 1
    hosts = {host for host, _ in shares}
    if alike and len(hosts) == len(shares):   # one group of ranks per host, all alike
        member, threads = next(iter(shares.items()))
        return (f"{plural(threads)} ({len(member[1])} cores shared by {everyone.count(member)} "
                f"rank(s) on each of {len(hosts)} hosts)")
    if alike and len(shares) == len(everyone):   # every rank bound to cores of its own, alike
        cores = len(everyone[0][1])
        return f"{plural(shares[everyone[0]])} (each rank bound to {cores} core(s))"
    # a host's groups alike are said once
    return "; ".join(dict.fromkeys(f"{host}: {plural(threads)} ({len(cores)} cores shared by "
                                   f"{everyone.count((host, cores))} rank(s))"
                                   for (host, cores), threads in shares.items()))
