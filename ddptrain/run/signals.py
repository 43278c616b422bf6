"""Stop requests: SIGTERM, SIGUSR1 and SIGINT are remembered, and training stops after the current
step.

From the program's first line (``__main__``) a signal is only remembered
(``remember_early_signals``); a training run's ``StopRequest`` takes over what
was remembered, and other commands get the usual behaviour back
(``restore_default_signals``). Only while the start-up waits on something
outside the program (``files.waiting``: a download, say) does a signal end it
at once, as ``errors.StartUpInterrupted``: the wait raises it (PEP 475 retries an
interrupted system call only when the handler returns), and status 128 + the
signal's number says so, as a shell reports a process that a signal ended.
"""

from __future__ import annotations

import os
import signal
import threading

from ddptrain import files

SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
_early = []   # the names of the signals remembered before a StopRequest was installed


def _numbers():
    return [getattr(signal, name) for name in SIGNALS if hasattr(signal, name)]


def _remember(number, frame):
    _early.append(signal.Signals(number).name)
    files.stop_signal_arrived(number)   # ends a wait of the start-up, now or when one begins


def remember_early_signals():
    """From now on, SIGTERM, SIGUSR1 and SIGINT are only remembered (until a StopRequest takes
    over)."""
    for number in _numbers():
        signal.signal(number, _remember)


def take_early_signals():
    """The names of the signals remembered so far, in order; they are forgotten here (a handler of
    the caller's takes over)."""
    taken = list(_early)
    _early.clear()
    files.stop_signal_arrived(None)
    return taken


def restore_default_signals():
    """The usual handlers back (a command that is not training); a signal remembered meanwhile acts
    now."""
    for number in _numbers():
        signal.signal(number,
                      signal.default_int_handler if number == signal.SIGINT else signal.SIG_DFL)
    files.stop_signal_arrived(None)
    if _early:
        os.kill(os.getpid(), getattr(signal, _early.pop(0)))


def ignore_stop_signals():
    """The command is over: SIGTERM, SIGUSR1 and SIGINT are ignored from now on.

    A training run that finished has nothing left that a signal could stop,
    and its status is decided. A late signal (a scheduler's SIGTERM at the end
    of the job, Ctrl-C to mpiexec) would otherwise find Python's defaults,
    which Python puts back as the interpreter exits and MPI finalises, and
    turn a status 0 into a kill.
    """
    for number in _numbers():
        signal.signal(number, signal.SIG_IGN)
    _early.clear()


class StopRequest:
    """Remembers that SIGTERM, SIGUSR1 or SIGINT arrived; training stops after the current step.

    Whether any rank was signalled travels in every step's Allreduce (see
    ``step.StepTotals``), so all ranks stop after the same step.
    """

    def __init__(self):
        self.signal_name = None
        self._previous = {}

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return self   # a simulated rank (a thread): signals reach rank 0, in the main thread
        for number in _numbers():
            self._previous[number] = signal.signal(number, self._handle)
        if _early:   # arrived while the program started: the run stops after its first step
            self.signal_name = _early[0]
            _early.clear()
            files.stop_signal_arrived(None)
        return self

    def uninstall(self):
        """Restore the previous handlers, unless a stop was requested.

        After a stop the process is on its way out: the signals are ignored
        from then on, so that a second one during the shutdown (a second
        Ctrl-C, a repeated SIGTERM, also while MPI finalises after Python has
        reset its own handlers) cannot kill a rank that already checkpointed.
        """
        for number, handler in self._previous.items():
            if self.requested:
                handler = signal.SIG_IGN
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number, frame):
        self.signal_name = signal.Signals(number).name

    @property
    def requested(self):
        return self.signal_name is not None
