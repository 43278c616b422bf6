"""Errors the user can fix, and the exit statuses ddptrain promises.

A ``UserError`` is printed as one line, without a traceback, and ends the
program with ``EXIT_USAGE``. Anything else is a bug or a fault and is reported
with its traceback (and, under MPI, aborts every rank).
"""

import sys

EXIT_OK = 0
EXIT_FAILURE = 1      # an unexpected error (a bug, a dead rank, a numerical fault)
EXIT_USAGE = 2        # bad input: options, data file, checkpoint
EXIT_PREEMPTED = 3    # stopped by a signal after writing a checkpoint; resume with --resume auto


class UserError(Exception):
    """Bad input, reported as a single line naming the file or option and the problem."""

    exit_status = EXIT_USAGE


class SettingError(UserError, ValueError):
    """A setting (of an optimiser, say) out of its range, named as the command-line option that sets it.

    Raised by the class that owns the setting, which is the one place that
    checks it; a ValueError too, for code that builds such objects directly.
    """

    def __init__(self, setting, problem):
        super().__init__(f"--{setting.replace('_', '-')} {problem}")


class DataError(UserError):
    """The data file is missing, unreadable or not a valid ddptrain MNIST file."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, or does not fit the model or data."""


class NumericalError(Exception):
    """A NaN or Inf in the loss or the gradients.

    Decided on values every rank holds after the Allreduce, so every rank
    raises it at the same step: it is printed once, as one line.
    """

    exit_status = EXIT_FAILURE
    all_ranks = True
    show_traceback = False


class same_on_every_rank:
    """Context manager: UserErrors raised inside are met identically by every rank.

    Use it around deterministic checks of inputs all ranks share (options,
    the data file's header, a checkpoint). The error is then printed once, by
    rank 0, and every rank exits with its status; no MPI abort is needed.
    """

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if isinstance(error, UserError):
            error.all_ranks = True
        return False


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
    from .launcher import rank_and_size
    status = getattr(error, "exit_status", EXIT_FAILURE)
    rank, size = (comm.rank, comm.size) if comm is not None else (rank_and_size()[0], 1)
    every_rank_failed = size == 1 or getattr(error, "all_ranks", False)
    if every_rank_failed:
        if rank == 0:
            if details and status == EXIT_FAILURE and getattr(error, "show_traceback", True):
                sys.stderr.write(details)
            print(f"ddptrain: error: {message}", file=sys.stderr, flush=True)
        return status
    if details:
        sys.stderr.write("".join(f"[rank {rank}] {line}\n" for line in details.splitlines()))
    print(f"ddptrain: error on rank {rank} of {size}: {message}", file=sys.stderr, flush=True)
    comm.abort(status)
    return status
