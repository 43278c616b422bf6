"""A crew of threads for work handed out many times a step: each helper waits on a lock of its own.

``concurrent.futures.ThreadPoolExecutor`` hands a call to a thread through a
queue and returns a future to wait on: two condition variables and their
bookkeeping each way. ``--reproducible`` hands out a matrix product's blocks
5 or 6 times a step, so at small batches the round trips are a visible part
of a step; here a round trip is one lock each way, about half the time
(measured in ``docs/history.md``, 8 December 2026).
"""

from __future__ import annotations

import threading


class Crew:
    """``size`` threads, the caller's included: ``run(tasks)`` runs ``tasks[0]`` in the caller's
    thread and ``tasks[i]`` on helper ``i`` at the same time, and returns once all are done."""

    def __init__(self, size, name="crew"):
        self.size = max(1, int(size))
        self._helpers = [_Helper(f"{name}-{i}") for i in range(1, self.size)]

    def run(self, tasks):
        """Run the callables ``tasks`` (at most ``size``) at once, one per thread; the first error
        any of them raised is raised here, after all have finished."""
        if len(tasks) > self.size:
            raise ValueError(f"{len(tasks)} tasks for a crew of {self.size}")
        helpers = self._helpers[:len(tasks) - 1]
        for helper, task in zip(helpers, tasks[1:]):
            helper.start(task)
        errors = []
        try:
            tasks[0]()
        except BaseException as error:   # noqa: BLE001 - raised below, once the helpers are done
            errors.append(error)
        errors += [error for error in (helper.wait() for helper in helpers) if error is not None]
        if errors:
            raise errors[0]

    def close(self):
        """Stop the helpers."""
        for helper in self._helpers:
            helper.stop()
        self._helpers = []


class _Helper:
    """One thread that runs a task each time ``start`` hands it one; ``wait`` for it to finish."""

    def __init__(self, name):
        self._go, self._done = threading.Lock(), threading.Lock()
        self._go.acquire()     # released by start: a task is waiting
        self._done.acquire()   # released by the thread: the task is done
        self._task, self._error = None, None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def start(self, task):
        self._task = task
        self._go.release()

    def wait(self):
        """The task's error, or None, once it has finished."""
        self._done.acquire()
        error, self._error = self._error, None
        return error

    def stop(self):
        self.start(None)
        self._thread.join()

    def _loop(self):
        while True:
            self._go.acquire()
            task, self._task = self._task, None
            if task is None:
                return
            try:
                task()
            except BaseException as error:   # noqa: BLE001 - handed to the caller by wait
                self._error = error
            self._done.release()
