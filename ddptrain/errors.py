"""Errors the user can fix, and the exit statuses ddptrain promises.

A ``UserError`` is printed as one line, without a traceback, and ends the
program with ``EXIT_USAGE``. Anything else is a bug or a fault and is reported
with its traceback (and, under MPI, aborts every rank).
"""


EXIT_OK = 0
EXIT_FAILURE = 1      # an unexpected error (a bug, a dead rank, a numerical fault)
EXIT_USAGE = 2        # bad input: options, data file, checkpoint
EXIT_PREEMPTED = 3    # stopped by a signal after writing a checkpoint; resume with --resume auto


class UserError(Exception):
    """Bad input, reported as a single line naming the file or option and the problem."""

    exit_status = EXIT_USAGE


class SettingError(UserError, ValueError):
    """A setting (of an optimiser, say) out of its range, named as the command-line option that sets
    it.

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


class StartUpInterrupted(Exception):
    """A stop signal ended the start-up while it waited on something outside the program
    (``files.waiting``): nothing was trained. Its status is 128 + the signal's number, as a shell
    reports a process that the signal ended (143 for SIGTERM, 130 for SIGINT)."""

    show_traceback = False

    def __init__(self, number, name):
        self.exit_status = 128 + number
        super().__init__(f"stopped by {name} during the start-up, before training")


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
