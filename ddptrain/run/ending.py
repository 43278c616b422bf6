"""How a rank ends on an error: one line, printed once, an exit status, and an abort where others
may wait."""

from __future__ import annotations

import sys
import time

from ddptrain.distributed.launcher import rank_and_size
from ddptrain.errors import EXIT_FAILURE, UserError

MEETING_SECONDS = 10.0


def message_of(error):
    """The one line that reports ``error``: a UserError's message, else its type and message."""
    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    return f"{type(error).__name__}: {error}"


def end_rank(message, error, comm, details=None):
    """Print the error once and end this rank (and, if only some ranks failed, the whole job).

    Returns the exit status when every rank failed alike (``comm`` None: this
    process alone); aborts the MPI job otherwise, since the ranks that did
    not fail may wait forever in a collective operation.
    """
    status = getattr(error, "exit_status", EXIT_FAILURE)
    rank, size = (comm.rank, comm.size) if comm is not None else (rank_and_size()[0], 1)
    every_rank_failed = size == 1 or getattr(error, "all_ranks", False)
    if every_rank_failed:
        if rank == 0:
            if details and status == EXIT_FAILURE and getattr(error, "show_traceback", True):
                sys.stderr.write(details)
            print(f"ddptrain: error: {message}", file=sys.stderr, flush=True)
        if getattr(error, "all_ranks", False) and (comm.size if comm else rank_and_size()[1]) > 1:
            _meet_once_rank_0_has_printed(comm, status)
        return status
    if details:
        sys.stderr.write("".join(f"[rank {rank}] {line}\n" for line in details.splitlines()))
    print(f"ddptrain: error on rank {rank} of {size}: {message}", file=sys.stderr, flush=True)
    comm.abort(status)
    return status


def _meet_once_rank_0_has_printed(comm, status):
    """No rank ends before rank 0 has printed the error line that stands for all of them.

    Open MPI's mpiexec ends the whole job when the first rank exits with a non-zero status: a rank
    that was quicker than rank 0 would take rank 0's line with it. So the ranks meet in a barrier
    (MPI starts here if the error came before it had); one that does not come within
    ``MEETING_SECONDS`` ends the job (an abort) rather than hold the others.
    """
    try:
        if comm is None:
            from ddptrain.distributed.comm import MPIComm
            comm = MPIComm()
        meeting = comm.ibarrier()
        deadline = time.monotonic() + MEETING_SECONDS
        while not meeting.test():
            if time.monotonic() > deadline:
                comm.abort(status)
            time.sleep(0.001)
    except Exception:   # the error being reported matters more than a failed meeting
        pass
