"""Opening a file the user named for reading: a regular file, or one line that says why not.

Every path ddptrain reads (the --config file, the data file, checkpoints,
``evaluate``'s CHECKPOINT, ``plot``'s metrics.jsonl) is checked here, once. A
FIFO, a socket or a device is refused before it is opened: opening a FIFO for
reading blocks until some other process opens it for writing, which may be
never, and a device may stream without end. A folder is refused too, naming the
path.

``open_regular`` closes the gap between that check and the open: it opens
without blocking (``O_NONBLOCK``) and checks what it opened, so a file swapped
for a FIFO in between is refused too, instead of hanging the start-up.

``waiting`` marks what start-up may wait on for long (a download, say):
a stop signal that arrives meanwhile ends the wait (``run.signals``) rather
than being remembered for a training step that would not come.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat

from ddptrain.errors import StartUpInterrupted, UserError

_waits = 0            # how many ``waiting`` blocks the main thread is in
_stop_signal = None   # the number of a stop signal that arrived during the start-up, or None


def _problem(mode, what):
    """What is wrong with a file of ``mode`` as a ``what`` to read, or None if nothing is."""
    if stat.S_ISDIR(mode):
        return f"is a folder, not a {what}"
    if not stat.S_ISREG(mode):
        return f"not a regular file (a FIFO, a socket or a device), not a {what}"
    return None


def check_regular_file(path, what="file", error=UserError, missing="no such file"):
    """Raise ``error`` (a UserError class) with one line ``"{path}: <problem>"`` unless ``path`` is
    a regular file this process may read; ``what`` names it ("data file"), ``missing`` is the
    problem of a path that does not exist."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except OSError as problem:
        raise error(f"{path}: cannot read it ({problem.strerror})") from None
    found = _problem(mode, what)
    if found:
        raise error(f"{path}: {found}")
    if not os.access(path, os.R_OK):
        raise error(f"{path}: cannot read it (permission denied)")


def open_regular(path, what="file", error=UserError, missing="no such file"):
    """``path`` opened for reading in binary, once ``check_regular_file`` passes; the file opened is
    checked again, so that it cannot block however the path changed meanwhile."""
    check_regular_file(path, what, error, missing)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as problem:
        raise error(f"{path}: cannot read it ({problem.strerror})") from None
    try:
        found = _problem(os.fstat(fd).st_mode, what)
        if found:
            raise error(f"{path}: {found}")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)   # a regular file's reads never wait on another process
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def waiting():
    """Mark a wait of the start-up that a stop signal ends, with ``StartUpInterrupted``: one that
    arrives during it, or arrived before it began."""
    global _waits
    _end_if_stopped()
    _waits += 1
    try:
        yield
    finally:
        _waits -= 1


def stop_signal_arrived(number):
    """Called by the stop signals' early handler (``run.signals``) with the signal's number: inside
    ``waiting`` it raises ``StartUpInterrupted``, which ends a blocked system call (PEP 475 retries
    one only when the handler returns). ``None``: the signal is taken care of (a training run's
    StopRequest stops after a step)."""
    global _stop_signal
    _stop_signal = number
    if _waits:
        _end_if_stopped()


def _end_if_stopped():
    if _stop_signal is not None:
        raise StartUpInterrupted(_stop_signal, signal.Signals(_stop_signal).name)
