"""``--reproducible`` for models with convolutions: each rank trains on its own rows, in fixed
groups of rows whose sums are added in one order, so that P ranks give the bits of one process.

Gathering the whole batch on every rank (``reproducible.BatchGather``, with
the products cut into blocks of columns: ``nn/columns.py``) makes every rank
do the work of one process on every layer that cannot be cut by columns: a
convolution, BatchNorm over channels, pooling. For a CNN that is most of a
step, and 2 ranks were no faster than one process. Here instead:

* **Fixed groups.** Row ``p`` of a global batch (its position in it) belongs
  to group ``p % G``, with ``G`` the number of virtual shards. Row ``p`` is
  on rank ``(s + p) % P`` (``s``: the batch's first position in its epoch;
  ``data/sampler.py``) and ``P`` divides ``G``, so all of a group's rows are
  on one rank, for every number of ranks allowed: the groups do not depend
  on ``P``, and a rank holds whole groups.
* **Each group a model of its own.** A group's rows go forward and backward
  through a replica of the model (the parameters shared, the gradients and
  work arrays its own), so every product, every sum inside a layer, is a
  call on that group's rows alone: the same call on any number of ranks.
* **Sums over the batch, group by group.** What a layer adds over the whole
  batch (BatchNorm's statistics and its backward sums: the layers with
  ``sums_over_rows``) is taken per group, the groups' sums are gathered from
  every rank and added in group order; the same for the gradients, the loss
  and the count of correct predictions. Addition in a fixed order of fixed
  parts: the same bits whoever computed which part.

A rank's groups are shared among its threads (each a one-thread BLAS): which
thread runs which group changes nothing, so one process with 2 threads gives
the bits of one thread and of 2 ranks. The layers run one after the other
over a thread's groups; the threads wait for each other only at the sums.
The rank's own model runs an empty batch beside them, so that its
BatchNorm's running statistics follow the batch's (and every rank's do,
with or without rows this step). Nothing here knows about MPI: ``comm``
gathers (``allgather_``, ``allreduce_``; one process needs neither).
"""

from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ddptrain.nn.columns import keep_owned
from ddptrain.nn.dropout import BatchContext

# The rows a group holds on average (global batch / groups) from which --reproducible trains a
# model with convolutions in groups. In smaller groups the calls cost more than the whole batch on
# every rank does (docs/reproducible.md measures both); the rule looks at the batch and the groups
# only, never at the number of ranks, so that every rank count takes the same arithmetic.
GROUP_ROWS = 16


def uses_groups(layers, batch_size, groups):
    """Whether ``--reproducible`` trains a model of ``layers`` on global batches of ``batch_size``
    in ``groups`` groups of rows (a model with a layer that takes channels: a convolution,
    pooling; groups of ``GROUP_ROWS`` rows or more), rather than whole on every rank with its
    products in blocks of columns."""
    return (any(layer.takes_channels for layer in layers)
            and batch_size >= GROUP_ROWS * groups)


def groups_of_run(config, layers):
    """The number of groups a run of ``config`` (``run.config.Config``) trains a model of
    ``layers`` in: its virtual shards with ``--reproducible`` where ``uses_groups``, else 0."""
    if config.reproducible and uses_groups(layers, config.batch_size, config.virtual_shards):
        return config.virtual_shards
    return 0


def describe_groups(count, threads):
    """The start-up line's words on the groups."""
    return (f"each rank's rows in {count} fixed groups (a row's position in the batch mod "
            f"{count}), their sums added in group order; 1 BLAS thread each, {threads} thread(s) "
            "per rank")


def groups_of(positions, count):
    """``[(group, rows)]``: the indices of the rows at ``positions`` (in the global batch) by group
    (``position % count``), groups in ascending order, each group's rows in position order."""
    positions = np.asarray(positions, dtype=np.int64)
    group = positions % count
    order = np.lexsort((positions, group))
    edges = np.flatnonzero(np.diff(group[order])) + 1
    return [(int(group[rows[0]]), rows) for rows in np.split(order, edges) if len(rows)]


class _GroupSums:
    """Arrays of every group of the batch, whichever thread and rank holds them, added in group
    order; every thread of every rank gets the total."""

    def __init__(self, comm, threads):
        self.comm = comm
        self.barrier = threading.Barrier(threads)
        self.slots = [()] * threads
        self.holders = None   # per group: the rank that holds it, -1 for none (this step)
        self._total = None

    def plan(self, groups, count):
        """Learn which rank holds each of the ``count`` groups this step (``groups``: this rank's).
        A collective."""
        holders = np.zeros(count)
        holders[groups] = self.comm.rank + 1
        self.comm.allreduce_(holders)   # DDP: small whole numbers, exact in any order
        self.holders = holders.astype(np.int64) - 1

    def add(self, thread, parts, like=None):
        """The sum over every group of the batch of ``parts`` (``[(group, array)]``: this thread's
        groups), in group order. Every thread calls it at once; thread 0 gathers, and gives
        ``like``, an array of the parts' length and type (a rank may hold no group)."""
        self.slots[thread] = parts
        self.barrier.wait()
        if thread == 0:
            self._total = self.add_all([part for slot in self.slots for part in slot], like)
        self.barrier.wait()   # the total is made; nobody adds again before every thread has it
        return self._total

    def add_all(self, parts, like):
        """``add`` for this rank's ``parts`` of all its threads at once, from one thread. A
        collective."""
        parts, length, dtype = dict(parts), like.size, like.dtype
        if self.comm.size > 1:   # every rank's groups, on every rank
            ranks = range(self.comm.size)
            held = [np.flatnonzero(self.holders == rank) for rank in ranks]
            bounds = np.cumsum([0] + [len(groups) * length for groups in held])
            flat = np.empty(int(bounds[-1]), dtype=dtype)
            mine = flat[bounds[self.comm.rank]:bounds[self.comm.rank + 1]].reshape(-1, length)
            for row, group in enumerate(held[self.comm.rank]):
                mine[row] = parts[int(group)].reshape(-1)
            self.comm.allgather_(flat, bounds)   # DDP: every group's part
            parts = {int(group): flat[bounds[rank] + row * length:
                                      bounds[rank] + (row + 1) * length]
                     for rank in ranks for row, group in enumerate(held[rank])}
        total = np.zeros(length, dtype=dtype)
        for group in sorted(parts):   # group order: the same additions on any number of ranks
            total += parts[group].reshape(-1)
        return total.reshape(like.shape)


class RowGroups:
    """Forward and backward of a rank's rows in fixed groups (see the module docstring), on
    ``threads`` threads.

    ``gradient(x, y, global_count, context)`` fills ``model.grads`` with the
    gradient of the global batch's mean loss (the sum over every rank's
    groups; rank 0 keeps it and the others zero theirs, so that the gradient
    exchange adds one number and zeros: ``columns.keep_owned``), and returns
    the global batch's share of the loss and its correct predictions (the same
    on every rank). ``context.positions`` says where this rank's rows sit in the
    global batch. The BLAS must run one thread (the caller sets it).
    """

    def __init__(self, model, loss_fn, comm, count, threads=1, count_correct=None):
        self.model, self.comm, self.count = model, comm, int(count)
        self.threads = max(1, int(threads))
        self._loss_fn, self._count_correct = loss_fn, count_correct
        self._replicas, self._losses = [], []
        self._sums = _GroupSums(comm, self.threads)
        self._pool = (ThreadPoolExecutor(self.threads - 1, thread_name_prefix="groups")
                      if self.threads > 1 else None)

    def describe(self):
        return describe_groups(self.count, self.threads)

    def gradient(self, x, y, global_count, context):
        model = self.model
        groups = groups_of(context.positions, self.count)
        self._sums.plan([group for group, _ in groups], self.count)
        self._sync_replicas(len(groups))
        runs = [(group, rows, self._replicas[k], self._losses[k])
                for k, (group, rows) in enumerate(groups)]
        # thread t runs a consecutive share of the groups; thread 0 also the model itself, on no
        # rows: its BatchNorm's running statistics follow the batch's sums
        shares = [runs[len(runs) * t // self.threads:len(runs) * (t + 1) // self.threads]
                  for t in range(self.threads)]
        shares[0] = [(None, np.zeros(0, dtype=np.int64), model, None)] + shares[0]
        results, errors = [None] * self.threads, []

        def run(thread):
            try:
                results[thread] = self._run(thread, shares[thread], x, y, global_count, context)
            except BaseException as error:   # noqa: BLE001 - raised below, in the caller's thread
                errors.append(error)
                self._sums.barrier.abort()   # no thread waits for this one at a sum

        ready, model.gradient_ready = model.gradient_ready, None
        try:
            jobs = [self._pool.submit(run, t) for t in range(1, self.threads)] if self._pool else []
            run(0)
            for job in jobs:
                job.result()
        finally:
            model.gradient_ready = ready
        if errors:
            self._sums.barrier.reset()
            raise next((error for error in errors
                        if not isinstance(error, threading.BrokenBarrierError)), errors[0])
        done = [part for result in results for part in result]
        np.copyto(model.grads, self._sums.add_all(
            [(group, replica.grads) for group, replica, _ in done], model.grads))
        keep_owned(model.grads, self.comm.rank == 0)   # one owner: see columns.py
        totals = self._sums.add_all([(group, np.array(total)) for group, _, total in done],
                                    np.zeros(2))
        if ready is not None:   # --overlap-allreduce: every layer's gradient is final now
            for index in range(len(model.layers) - 1, -1, -1):
                ready(index)
        return float(totals[0]), int(totals[1])

    def _sync_replicas(self, count):
        """``count`` replicas of the model as the model is: its parameters, buffers (BatchNorm's
        sums are taken about its running mean), library of products and mode."""
        model = self.model
        while len(self._replicas) < count:
            self._replicas.append(model.replica())
            self._losses.append(copy.deepcopy(self._loss_fn))
        for replica in self._replicas[:count]:
            if replica.params is not model.params:
                replica.use_arrays(model.params, replica.grads)
            replica.buffers[...] = model.buffers
            if replica.backend is not model.backend:
                replica.use_backend(model.backend)
            replica.train(model.training)

    def _run(self, thread, runs, x, y, global_count, context):
        """Forward, loss and backward of the groups ``runs`` (``(group, rows, replica, loss)``),
        layer after layer; returns ``[(group, replica, (loss share, correct))]``."""
        layers, observer = self.model.layers, self.model.observer
        for _, rows, replica, _ in runs:
            replica.set_batch_context(BatchContext(context.seed, context.step,
                                                   context.positions[rows]))
        values = [x[rows] for _, rows, _, _ in runs]
        for i, layer in enumerate(layers):
            if layer.training and getattr(layer, "sums_over_rows", False):
                sums = [replica.layers[i].forward_sums(value)
                        for value, (_, _, replica, _) in zip(values, runs)]
                total = self._add(thread, runs, sums)
                values = [replica.layers[i].forward_from(total) for _, _, replica, _ in runs]
            else:
                values = [replica.layers[i].forward(value)
                          for value, (_, _, replica, _) in zip(values, runs)]
            if observer is not None:
                for value, (group, _, _, _) in zip(values, runs):
                    if group is not None:
                        observer("forward", layer, value)
        totals, grads = [], []
        for value, (group, rows, _, loss_fn) in zip(values, runs):
            if group is None:   # the model itself, on no rows
                grads.append(np.zeros_like(value))
                continue
            share = loss_fn.forward(value, y[rows], normaliser=global_count)
            totals.append((share, self._count_correct(value, y[rows])))
            grads.append(loss_fn.backward())
        first = self.model._first_trained
        for i in range(len(layers) - 1, first - 1, -1):
            layer, needed = layers[i], i > first
            if layer.training and getattr(layer, "sums_over_rows", False):
                sums = [replica.layers[i].backward_sums(grad, needed)
                        for grad, (_, _, replica, _) in zip(grads, runs)]
                if needed:
                    total = self._add(thread, runs, sums)
                    grads = [replica.layers[i].backward_from(total) for _, _, replica, _ in runs]
            else:
                grads = [replica.layers[i].backward(grad, need_input_grad=needed)
                         for grad, (_, _, replica, _) in zip(grads, runs)]
        return [(group, replica, total)
                for (group, _, replica, _), total in zip(runs[1:] if thread == 0 else runs, totals)]

    def _add(self, thread, runs, arrays):
        """The sum over the batch's groups of ``arrays`` (one per run of this thread)."""
        parts = [(group, array) for (group, _, _, _), array in zip(runs, arrays)
                 if group is not None]
        return self._sums.add(thread, parts, like=arrays[0] if thread == 0 else None)

    def close(self):
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
