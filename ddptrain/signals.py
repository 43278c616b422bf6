"""Stop requests: SIGTERM, SIGUSR1 and SIGINT are remembered, and training stops after the current step."""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """Remembers that SIGTERM, SIGUSR1 or SIGINT arrived; training stops after the current step.

    Whether any rank was signalled travels in every step's Allreduce (see
    ``step.StepTotals``), so all ranks stop after the same step.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self):
        self.signal_name = None
        self._previous = {}

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return self   # a simulated rank (a thread): signals reach rank 0, in the main thread
        for name in self.SIGNALS:
            number = getattr(signal, name, None)
            if number is not None:
                self._previous[number] = signal.signal(number, self._handle)
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
