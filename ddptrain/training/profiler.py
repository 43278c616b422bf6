"""``--profile STEPS``: a timeline of STEPS steps on every rank, one file for Perfetto or
``chrome://tracing``.

The step is timed from outside, the way hooks time a PyTorch module: for
the steps profiled only, the parts of the trainer (``Batches.take``, the
model's and each layer's ``forward`` and ``backward``, the loss, the
exchange's ``reduce_`` and ``publish_``, the step's totals, the optimiser's
``step``, a layer's ``sum_over_ranks``, ``Trainer.evaluate``, the callbacks'
hooks, the checkpoint's save) are replaced on their objects by versions
that record a span around each call (``SpanRecorder.timed``), and put back
afterwards. Outside those steps nothing is wrapped and no line runs: a run
without ``--profile`` is the run it was. The model knows nothing of it.

The window opens after the first step this run trains (the first step
allocates the layers' work arrays and warms the caches: it is not a step
like the others) and holds STEPS steps; a step is timed from its start to
the start of the next, so the callbacks after it, and an evaluation and a
checkpoint that end an epoch, are in it. At either end of the window every
rank measures its clock against rank 0's (``distributed/clocks.py``); at the
end, rank 0 gathers every rank's spans and ``trace.build_trace`` puts them on
rank 0's time axis, each rank a process of the trace.
"""

from __future__ import annotations

import socket
import time

from ddptrain.distributed.clocks import clock_offsets
from ddptrain.training.trace import build_trace
from ddptrain.training.trainer import Callback

WARM_UP_STEPS = 1   # steps trained before the window opens
HOOKS = ("on_epoch_start", "on_step_start", "on_step_end", "on_epoch_end")
_MISSING = object()


class SpanRecorder:
    """Spans on one clock, in nanoseconds: ``(name, category, start, stop, collective, thread)``
    tuples in ``spans``, in the order they end. Generic: it knows nothing of steps, ranks or
    files."""

    def __init__(self, clock=time.perf_counter_ns):
        self.clock, self.spans = clock, []
        # inside a span recorded alone: nothing nested is recorded, on any thread (evaluation's
        # row threads run inside it)
        self.quiet = False

    def timed(self, function, name, category, collective=False, alone=False, thread=0):
        """``function``, recording a span around each of its calls. ``collective``: every rank
        calls it at the same point, so the wait for the last rank to arrive can be told apart.
        ``alone``: what it calls is not recorded (evaluation's forward passes are not the
        step's). ``thread``: which of the rank's threads calls it (0: the one that runs the
        step; a row thread's replica: its index). Spans of several threads may overlap; the
        list's appends are atomic."""
        clock, spans = self.clock, self.spans

        def timed_call(*args, **kwargs):
            if self.quiet:
                return function(*args, **kwargs)
            if alone:
                self.quiet = True
            start = clock()
            try:
                return function(*args, **kwargs)
            finally:
                spans.append((name, category, start, clock(), collective, thread))
                if alone:
                    self.quiet = False
        return timed_call


def span_cost(clock=time.perf_counter_ns, calls=2000):
    """What recording one span costs on this rank, in nanoseconds: the overhead of ``--profile``
    per span, stated in the timeline."""
    def nothing():
        pass
    timed = SpanRecorder(clock).timed(nothing, "calibration", "calibration")
    costs = []
    for _ in range(3):
        start = clock()
        for _ in range(calls):
            nothing()
        plain = clock() - start
        start = clock()
        for _ in range(calls):
            timed()
        costs.append((clock() - start - plain) / calls)
    return max(0.0, min(costs))


def clocks_phrase(uncertainty_us):
    """How well the ranks' clocks are aligned, in words."""
    if uncertainty_us == 0:
        return "one host, one clock"
    return f"clocks aligned to within {uncertainty_us:.0f} us"


class Wrapped:
    """Attributes of objects replaced by timed versions of themselves, until ``restore``."""

    def __init__(self, recorder):
        self.recorder, self._replaced = recorder, []

    def wrap(self, owner, attribute, name, category, **kwargs):
        self.replace(owner, attribute, self.recorder.timed(getattr(owner, attribute), name,
                                                           category, **kwargs))

    def replace(self, owner, attribute, value):
        own = vars(owner).get(attribute, _MISSING)   # an instance's own attribute, to put back
        setattr(owner, attribute, value)
        self._replaced.append((owner, attribute, own))

    def replace_items(self, items, replacements):
        """Put ``replacements`` in the list ``items``, in place (a loop over it goes on over
        them)."""
        self._replaced.append((items, None, list(items)))
        items[:] = replacements

    def restore(self):
        for owner, attribute, own in reversed(self._replaced):
            if attribute is None:
                owner[:] = own
            elif own is _MISSING:
                delattr(owner, attribute)
            else:
                setattr(owner, attribute, own)
        self._replaced = []


class TimedTotals:
    """The step's communicator, whose in-place Allreduce (the step's totals: the gradient goes
    through the exchange's own communicator) records a span."""

    def __init__(self, comm, recorder):
        self.comm = comm
        self.allreduce_ = recorder.timed(comm.allreduce_, "totals", "totals", collective=True)

    def __getattr__(self, name):
        return getattr(self.comm, name)


class TimedCallback:
    """A callback whose hooks record a span each, named after its class; the rest is its own.

    A stand-in in the trainer's list rather than a wrapper put on the callback itself: simulated
    ranks share the callbacks a script gives ``ddptrain.train``, and each rank times its own calls.
    """

    def __init__(self, callback, recorder):
        self.callback = callback
        for hook in HOOKS:
            if getattr(type(callback), hook, None) is not getattr(Callback, hook):
                setattr(self, hook, recorder.timed(getattr(callback, hook),
                                                   type(callback).__name__, "callbacks"))

    def __getattr__(self, name):
        return getattr(self.callback, name)


def instrument(wrapped, trainer, profiler, also=()):
    """Wrap every part of ``trainer``'s step that the timeline shows. ``also``: more
    ``(object, attribute, name, category)`` to record alone (the run's checkpoint writes)."""
    step, model = trainer.train_step, trainer.model
    # the rows of the step: a stream's wait for them included
    wrapped.wrap(trainer.batches, "take", "gather", "gather")
    _instrument_model(wrapped, model, step.loss_fn)
    for layer in model.layers:
        if "sum_over_ranks" in vars(layer):   # BatchNorm's statistics of the global batch
            wrapped.wrap(layer, "sum_over_ranks", f"{layer.name} allreduce", "batchnorm",
                         collective=True)
    # the rank's other row threads, each on a replica of the model: a track of their own
    replicas = step.thread_replicas
    for thread, (replica, loss_fn) in enumerate(replicas, start=1):
        _instrument_model(wrapped, replica, loss_fn, thread)
    if replicas:   # the threads' BatchNorm sums meet in one call over the ranks
        wrapped.wrap(model, "sum_over_ranks", "batchnorm allreduce", "batchnorm", collective=True)
    wrapped.wrap(step.exchange, "reduce_", "exchange", "exchange", collective=True)
    wrapped.wrap(step.exchange, "publish_", "publish", "exchange", collective=True)
    wrapped.replace(step, "comm", TimedTotals(step.comm, wrapped.recorder))
    wrapped.wrap(step.optimizer, "step", "update", "update")
    wrapped.wrap(trainer, "evaluate", "evaluation", "evaluation", alone=True)
    wrapped.replace_items(trainer.callbacks, [
        callback if callback is profiler else TimedCallback(callback, wrapped.recorder)
        for callback in trainer.callbacks])
    for owner, attribute, name, category in also:
        wrapped.wrap(owner, attribute, name, category, alone=True)


def _instrument_model(wrapped, model, loss_fn, thread=0):
    """The passes of ``model`` (whole and per layer) and its loss (if it has one of its own), run
    by the rank's thread ``thread``."""
    wrapped.wrap(model, "forward", "forward", "forward", thread=thread)
    wrapped.wrap(model, "backward", "backward", "backward", thread=thread)
    for layer in model.layers:
        wrapped.wrap(layer, "forward", f"forward {layer.name}", "forward", thread=thread)
        wrapped.wrap(layer, "backward", f"backward {layer.name}", "backward", thread=thread)
    if loss_fn is not None:
        wrapped.wrap(loss_fn, "forward", "loss", "loss", thread=thread)
        wrapped.wrap(loss_fn, "backward", "loss gradient", "loss", thread=thread)


class Profiler(Callback):
    """Records ``steps`` steps after the first on every rank, then hands rank 0's trace to
    ``write`` (called on every rank: a collective that writes on rank 0, returning the path, or
    None if the write failed).

    Put it first among the callbacks: a step starts when its ``on_step_start`` does. ``finish``
    (after ``fit``, on every rank) ends a window the run did not reach the end of; ``restore``
    (after ``fit`` however it ended) leaves the trainer's parts as they were.
    """

    def __init__(self, steps, write, report=print, about=None, also=(),
                 clock=time.perf_counter_ns):
        self.steps, self.write, self.report = steps, write, report
        self.about, self.also, self.clock = dict(about or {}), also, clock
        self.first = None          # the first step profiled
        self.recorder = self.wrapped = None
        self.steps_seen = []       # (step, start, stop, first span, end of its spans)
        self._step = None          # (step, start, index of its first span) while one runs
        self._opened = None        # (rank 0's offsets, this rank's clock, a span's cost) then
        self.done = False

    @property
    def recording(self):
        return self.wrapped is not None

    def on_fit_start(self, trainer):
        self.first = trainer.position.step + WARM_UP_STEPS

    def on_step_start(self, trainer):
        step = trainer.position.step
        self._end_step()
        if self.recording and step >= self.first + self.steps:
            self.finish(trainer)
        elif not self.recording and not self.done and step == self.first:
            self._open(trainer)
        if self.recording:
            self._step = (step, self.clock(), len(self.recorder.spans))

    def _open(self, trainer):
        comm = trainer.comm
        cost = span_cost(self.clock)
        offsets = clock_offsets(comm, self.clock)   # DDP: before anything is recorded
        self._opened = (offsets, self.clock(), cost)
        self.recorder = SpanRecorder(self.clock)
        self.wrapped = Wrapped(self.recorder)
        instrument(self.wrapped, trainer, self, self.also)

    def _end_step(self):
        if self._step is not None:
            step, start, first = self._step
            self.steps_seen.append((step, start, self.clock(), first, len(self.recorder.spans)))
            self._step = None

    def restore(self):
        """Put back what was wrapped (on this rank alone: no collective); the window is over."""
        self._end_step()
        if self.wrapped is not None:
            self.wrapped.restore()
            self.wrapped = None

    def finish(self, trainer):
        """End the window, if it is open, and write the timeline (a collective). Returns its path,
        or None."""
        if self.done or self._opened is None:
            if not self.done and self.first is not None:
                self.report(f"--profile {self.steps}: the run ended before step {self.first}, the "
                            "first to profile; no timeline written")
            self.done = True
            return None
        self.restore()
        self.done = True
        comm = trainer.comm
        offsets, opened_at, cost = self._opened
        closing = clock_offsets(comm, self.clock)        # DDP: the drift over the window
        closed_at = self.clock()
        mine = {"host": socket.gethostname(), "spans": self.recorder.spans,
                "steps": self.steps_seen, "clock": (opened_at, closed_at), "span_cost_ns": cost}
        ranks = comm.gather(mine)                        # DDP: every rank's spans, on rank 0
        trace = None
        if comm.rank == 0:
            trace = build_trace(ranks, offsets, closing, self.about)
        path = self.write(trace)
        if self.steps_seen and path is not None:
            about = trace["otherData"] if trace else None   # rank 0's: the others print nothing
            self.report(f"timeline of steps {self.steps_seen[0][0]} to {self.steps_seen[-1][0]} on "
                        f"{comm.size} rank(s) written to {path}"
                        + (f" ({clocks_phrase(about['clock']['uncertainty_us_max'])}; recording "
                           f"cost about {about['overhead']['per_step_us']:.0f} us a step)"
                           if about else ""))
        return path
