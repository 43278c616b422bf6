"""A rank's threads on its rows: each thread runs forward and backward on a slice of the rank's rows
of the step, with a one-thread BLAS, and the slices' gradients are added in thread order.

Why: a convolutional network spends most of a step outside the matrix
products (im2col's copies, BatchNorm, pooling, col2im), in numpy's
element-wise loops, which run on one core; a BLAS's threads only help inside
the products, and small products (a convolution's blocks of samples) gain
little from them or lose. Two ranks, each with its rows and one BLAS thread,
use both cores all the time. ``RowThreads`` does the same inside one rank:
``T`` replicas of the model, one per thread, that share the parameters and
keep gradients of their own. numpy releases the GIL in its loops and its
BLAS calls, so the threads run at once (docs/cnn.md measures how far); each
call hands the GIL over, so on the threads the layers work in fewer, larger
calls than on a rank's own thread (``suit_threads``).

It is the data-parallel step again, one level down, with the same rules:

* the loss of every slice is normalised by the *global* batch size, so the
  slices' gradients add up to the rank's share (as the ranks' shares add up
  to the global gradient);
* BatchNorm's statistics are those of the global batch: each replica's sums
  are added over the threads (in thread order), then over the ranks (the
  model's ``sum_over_ranks``, called once, by thread 0), and every thread
  reads the total;
* Dropout draws from each row's position in the global batch, so a row's
  mask does not depend on which thread holds it.

So T threads on one rank train what T ranks train, to rounding, and a run
is deterministic: the slices are fixed and their sums added in one order.
Nothing here knows about MPI.
"""

from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ddptrain.nn.conv import Conv2d
from ddptrain.nn.dropout import BatchContext
from ddptrain.nn.normalization import BatchNorm

# --thread-work: where a rank's threads work
THREAD_WORK = ("auto", "rows", "blas")
# On the threads each numpy call hands the GIL over, so fewer and larger calls pay more than
# cache-sized blocks save (docs/cnn.md): BatchNorm's passes over all of a thread's rows at once (its
# blocks, BatchNorm.BLOCK_VALUES, cost about ten calls each), a convolution's products on blocks of
# 2 MiB of im2col rather than Conv2d.CHUNK_BYTES.
ONE_BLOCK = 1 << 40
THREAD_CHUNK_BYTES = 2 << 20


def wants_row_threads(layers, threads, choice="auto"):
    """How many row threads a rank with ``threads`` threads runs a model of ``layers`` on:
    ``threads`` when ``choice`` is "rows", or "auto" and the model has a convolution (a layer that
    takes channels), else 1 (the BLAS's threads do the work)."""
    if threads < 2 or choice == "blas":
        return 1
    if choice == "rows" or any(layer.takes_channels for layer in layers):
        return threads
    return 1


def row_threads_of_run(config, layers, threads):
    """``wants_row_threads`` for a run of ``config`` (``run.config.Config``): 1 with
    ``--reproducible`` (it has threads of its own) and ``--debug`` (it watches every layer of one
    model)."""
    if config.reproducible or config.debug:
        return 1
    return wants_row_threads(layers, threads, config.thread_work)


# what suit_threads sets: (layer type, attribute, size on the threads)
_THREAD_SIZES = ((BatchNorm, "BLOCK_VALUES", ONE_BLOCK),
                 (Conv2d, "CHUNK_BYTES", THREAD_CHUNK_BYTES))


def suit_threads(layers):
    """The block sizes of ``layers`` set for the row threads (see ``THREAD_CHUNK_BYTES``); returns
    them."""
    for layer in layers:
        for kind, name, size in _THREAD_SIZES:
            if isinstance(layer, kind):
                setattr(layer, name, size)
    return layers


def own_sizes(layers):
    """The block sizes set on ``layers`` themselves (not inherited from their class), for
    ``put_back_sizes``."""
    return [(layer, {name: vars(layer)[name] for _, name, _ in _THREAD_SIZES
                     if name in vars(layer)}) for layer in layers]


def put_back_sizes(sizes):
    """The layers' block sizes as ``own_sizes`` found them."""
    for layer, own in sizes:
        for _, name, _ in _THREAD_SIZES:
            if name in own:
                setattr(layer, name, own[name])
            else:
                vars(layer).pop(name, None)   # its class's again


def thread_line(row_threads, blas_line):
    """The start-up line's words on a rank's threads: ``blas_line`` (the BLAS's threads, from
    ``threads.configure_blas_threads``) where the BLAS has them."""
    if row_threads < 2:
        return blas_line
    return (f"{row_threads} threads per rank, each on a slice of the step's rows with 1 BLAS "
            "thread (--thread-work rows)")


class _ThreadSums:
    """BatchNorm's ``sum_over_ranks`` for the replicas: each thread's array added in thread order,
    then over the ranks (``outer``, by thread 0), and the total handed back to every thread."""

    def __init__(self, count):
        self.barrier = threading.Barrier(count)
        self.slots = [None] * count
        self.outer = None

    def for_thread(self, index):
        def sum_over_threads_and_ranks(array):
            slots = self.slots
            slots[index] = array
            self.barrier.wait()
            if index == 0:
                total = slots[0]
                for other in slots[1:]:
                    total += other   # in thread order: deterministic
                self.outer(total)
            self.barrier.wait()   # thread 0's total is in slots[0]
            if index:
                array[...] = slots[0]
            self.barrier.wait()   # nobody deposits the next sums before everyone has read these
            return array
        return sum_over_threads_and_ranks


class RowThreads:
    """Forward and backward of a rank's rows on ``count`` threads (see the module docstring).

    ``gradient(x, y, global_count, context)`` is ``local_gradient``'s job
    (``step.local_gradient``: forward, loss, backward of some rows; returns
    their share of the loss and their correct predictions) done on the
    threads, each calling it on its replica: ``model.grads`` holds the rank's
    share of the gradient afterwards. The BLAS must run one thread (the caller
    sets it).
    """

    def __init__(self, model, loss_fn, count, local_gradient):
        self.model, self.count, self._local_gradient = model, int(count), local_gradient
        self.replicas = [model] + [model.replica() for _ in range(self.count - 1)]
        # the model's own sizes, put back by close(): a caller who goes on in one thread (the
        # Python API) gets the layers as they were, and the bits of one thread
        self._model_sizes = own_sizes(model.layers)
        for replica in self.replicas:
            suit_threads(replica.layers)
        self.losses = [loss_fn] + [copy.deepcopy(loss_fn) for _ in range(self.count - 1)]
        self._sums = _ThreadSums(self.count)
        self._pool = ThreadPoolExecutor(self.count - 1, thread_name_prefix="rows")
        self._calls = 0   # steps without a context, as Dropout counts them

    def gradient(self, x, y, global_count, context):
        if context is None:   # outside a trainer: the rows are a batch of their own, one per call
            context = BatchContext(seed=0, step=self._calls, positions=np.arange(len(y)))
            self._calls += 1
        return self._gradient(x, y, global_count, context)

    def _gradient(self, x, y, global_count, context):
        model = self.model
        bounds = [len(y) * i // self.count for i in range(self.count + 1)]
        outer, ready = model.sum_over_ranks, model.gradient_ready
        self._sums.outer = outer
        self._sync_replicas(model.training)
        for index, replica in enumerate(self.replicas):
            replica.set_sum_over_ranks(self._sums.for_thread(index))
        # Every thread runs its slice, even an empty one: the others wait for its BatchNorm sums.
        results, errors = [None] * self.count, []

        def run(index):
            try:
                results[index] = self._slice(index, x, y, bounds, global_count, context)
            except BaseException as error:   # noqa: BLE001 - raised below, in the caller's thread
                errors.append(error)
                self._sums.barrier.abort()   # no thread waits for this one in a BatchNorm

        model.gradient_ready = None   # the buckets may start once the threads' sum is made
        try:
            jobs = [self._pool.submit(run, index) for index in range(1, self.count)]
            run(0)
            for job in jobs:
                job.result()
        finally:
            model.gradient_ready = ready
            model.set_sum_over_ranks(outer)
        if errors:
            self._sums.barrier.reset()
            raise next((error for error in errors
                        if not isinstance(error, threading.BrokenBarrierError)), errors[0])
        for replica in self.replicas[1:]:
            model.grads += replica.grads   # in thread order: deterministic
        if ready is not None:   # --overlap-allreduce: every layer's gradient is final now
            for index in range(len(model.layers) - 1, -1, -1):
                ready(index)
        return sum(share for share, _ in results), sum(correct for _, correct in results)

    def forward(self, x):
        """The model's output for the rows ``x`` in evaluation mode (no sums across rows), each
        thread a slice of them, into one array."""
        bounds = [len(x) * i // self.count for i in range(self.count + 1)]
        self._sync_replicas(training=False)
        try:
            jobs = [self._pool.submit(self.replicas[i].forward, x[bounds[i]:bounds[i + 1]])
                    for i in range(1, self.count)]
            outputs = [self.model.forward(x[:bounds[1]])] + [job.result() for job in jobs]
        finally:
            for replica in self.replicas[1:]:
                replica.train()
        return np.concatenate(outputs)

    def _sync_replicas(self, training):
        for replica in self.replicas[1:]:
            replica.follow(self.model, training)

    def _slice(self, index, x, y, bounds, global_count, context):
        """Thread ``index``'s rows: forward, loss and backward on its replica."""
        start, stop = bounds[index], bounds[index + 1]
        replica = self.replicas[index]
        replica.set_batch_context(BatchContext(context.seed, context.step,
                                               context.positions[start:stop]))
        return self._local_gradient(replica, self.losses[index], x[start:stop], y[start:stop],
                                    global_count)

    def close(self):
        self._pool.shutdown()
        put_back_sizes(self._model_sizes)
