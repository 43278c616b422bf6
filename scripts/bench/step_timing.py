"""Timers around the pieces of ddptrain's training step, given to the step in place of its own.

``TimedComm`` times the gradient's exchange in the timed repetitions; the
``Profiled*`` wrappers, ``TimedLoss`` and ``StepProfile`` lap a few extra
steps phase by phase (the laps cost a little, so those steps are not timed).
"""

from __future__ import annotations

import statistics
import time

from ddptrain.nn import Conv2d, Linear


class TimedComm:
    """A communicator whose Allreduces are timed (batch normalisation's statistics)."""

    def __init__(self, comm):
        self._comm, self.seconds = comm, 0.0

    def __getattr__(self, name):
        return getattr(self._comm, name)

    def allreduce_(self, array):
        started = time.perf_counter()
        self._comm.allreduce_(array)
        self.seconds += time.perf_counter() - started
        return array


class TimedExchange:
    """A gradient exchange (``ddptrain.distributed.exchange``) whose reduction is timed, and with
    ``skip`` skipped (the diagnostic row). The step's totals Allreduce runs untimed: the step
    needs it."""

    def __init__(self, exchange, skip=False):
        self._exchange, self.skip, self.seconds = exchange, skip, 0.0

    def __getattr__(self, name):
        return getattr(self._exchange, name)

    def reduce_(self, grads):
        started = time.perf_counter()
        if not self.skip:
            self._exchange.reduce_(grads)
        self.seconds += time.perf_counter() - started


class _ProfiledTotals:
    """The step's totals Allreduce, lapped."""

    def __init__(self, comm, profile):
        self._comm, self._profile = comm, profile

    def __getattr__(self, name):
        return getattr(self._comm, name)

    def allreduce_(self, array):
        self._profile.lap("gradient norm")   # the owned gradient's squares, just before
        self._comm.allreduce_(array)
        self._profile.lap("step totals Allreduce")
        return array


class ProfiledExchange:
    """Laps of a StepProfile around the gradient exchange, the step's totals Allreduce and the
    publishing of the parameters (for the profile, not the timed rows)."""

    LABELS = {"Allreduce": "gradient Allreduce", "BucketedAllreduce": "gradient Allreduce",
              "ReduceScatter": "gradient reduce-scatter",
              "NodeSharedMemory": "gradient exchange (shared memory)"}

    def __init__(self, exchange, profile):
        self._exchange, self._profile = exchange, profile
        self.comm = _ProfiledTotals(exchange.comm, profile)   # what TrainStep sums its totals with
        variant = type(getattr(exchange, "_exchange", exchange)).__name__   # a TimedExchange's
        self._label = self.LABELS.get(variant, f"gradient exchange ({variant})")

    def __getattr__(self, name):
        return getattr(self._exchange, name)

    def reduce_(self, grads):
        self._profile.lap("other")   # next to nothing runs between the backward and here
        self._exchange.reduce_(grads)
        self._profile.lap(self._label)

    def publish_(self, params):
        self._exchange.publish_(params)
        self._profile.lap("publishing the parameters (allgather or barrier, sharded)")


class ProfiledOptimizer:
    """Laps of a StepProfile around the update: the finite check runs just before it."""

    def __init__(self, optimizer, profile):
        self._optimizer, self._profile = optimizer, profile

    def __getattr__(self, name):
        return getattr(self._optimizer, name)

    def step(self, params, grads, lr):
        self._profile.lap("finite check")
        self._optimizer.step(params, grads, lr)
        self._profile.lap("SGD update")


class StepProfile:
    """Where a step's time goes, from laps at layer boundaries (``Sequential.observer``) and
    around the loss.

    Matrix products are the Linear layers (their bias add and bias gradient included);
    everything else is memory-bound numpy work or communication.
    """

    def __init__(self):
        self.seconds, self.steps, self._mark = {}, 0, 0.0

    def start(self):
        self._mark = time.perf_counter()

    def lap(self, name):
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._mark
        self._mark = now

    def observer(self, direction, layer, array):
        self.lap("matrix products (Linear, bias included)" if isinstance(layer, Linear) else
                 "Conv2d (im2col, matrix products, col2im)" if isinstance(layer, Conv2d) else
                 type(layer).__name__)

    def per_step_ms(self):
        return {name: 1e3 * seconds / self.steps for name, seconds in self.seconds.items()}


class TimedLoss:
    """The loss, with a lap after its forward (and the accuracy count) and after its backward."""

    def __init__(self, loss, profile):
        self._loss, self._profile = loss, profile

    def forward(self, *args, **kwargs):
        value = self._loss.forward(*args, **kwargs)
        self._profile.lap("loss and accuracy")
        return value

    def backward(self):
        value = self._loss.backward()
        self._profile.lap("loss and accuracy")   # count_correct ran just before
        return value


def time_allreduce(allreduce, barrier, calls=30):
    """Median milliseconds of one allreduce of the whole gradient, on its own."""
    for _ in range(5):
        allreduce()
    times = []
    for _ in range(calls):
        barrier()
        began = time.perf_counter()
        allreduce()
        times.append(time.perf_counter() - began)
    return 1e3 * statistics.median(times)
