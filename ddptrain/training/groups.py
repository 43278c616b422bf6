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
* **Every sum over rows taken per group.** A thread's groups form one array
  of rows, group after group. A layer that computes each row alone
  (``rowwise``: ReLU, pooling, dropout, flatten) runs on all of it at once;
  BatchNorm takes its sums per group (``nn/normalization_groups.py``); any
  other layer (a convolution, a ``Linear``: products whose bits depend on
  the rows in the call) runs once per group, on a copy that shares the
  parameters, so that its products are calls on that group's rows alone.
* **Added in group order.** BatchNorm's sums, the parameter gradients, the
  loss and the correct predictions of every group are gathered from every
  rank and added in group order: a fixed order of fixed parts, the same bits
  whoever computed which part.

A rank's groups are shared among its threads (each a one-thread BLAS): which
thread runs which group changes nothing, so one process with 2 threads gives
the bits of one thread and of 2 ranks. The threads wait for each other only
at BatchNorm's sums. The rank's own model is thread 0's, even when that
thread has no rows, so that its BatchNorm's running statistics follow the
batch's sums on every rank. Nothing here knows about MPI: ``comm`` gathers
(``allgather_``, ``allreduce_``; one process needs neither).
"""

from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ddptrain.nn.columns import keep_owned
from ddptrain.nn.dropout import BatchContext

# The rows a group holds on average (global batch / groups) from which --reproducible trains a
# model with convolutions in groups. With fewer, one process pays more for the groups' calls than
# the whole batch costs it (docs/reproducible.md measures both); the rule looks at the batch and the
# groups only, never at the number of ranks, so that every rank count takes the same arithmetic.
GROUP_ROWS = 8


def uses_groups(layers, batch_size, groups):
    """Whether ``--reproducible`` trains a model of ``layers`` on global batches of ``batch_size``
    in ``groups`` groups of rows (a model with a layer that takes channels, a convolution or
    pooling, and ``GROUP_ROWS`` rows a group or more), rather than whole on every rank with its
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
        replicas = [model] + [model.replica() for _ in range(self.threads - 1)]
        self._workers = [_Worker(replica, loss_fn, count_correct) for replica in replicas]
        self._sums = _GroupSums(comm, self.threads)
        self._pool = (ThreadPoolExecutor(self.threads - 1, thread_name_prefix="groups")
                      if self.threads > 1 else None)

    def describe(self):
        return describe_groups(self.count, self.threads)

    def gradient(self, x, y, global_count, context):
        model = self.model
        groups = groups_of(context.positions, self.count)
        self._sums.plan([group for group, _ in groups], self.count)
        self._sync_replicas()
        # thread t runs a consecutive share of the groups (thread 0 on the model itself, even with
        # none: its BatchNorm's running statistics follow the batch's sums)
        shares = [groups[len(groups) * t // self.threads:len(groups) * (t + 1) // self.threads]
                  for t in range(self.threads)]
        results, errors = [None] * self.threads, []

        def run(thread):
            try:
                results[thread] = self._workers[thread].run(
                    shares[thread], x, y, global_count, context,
                    lambda parts, ids: self._sums.add(thread, list(zip(ids, parts)),
                                                      like=np.zeros(parts.shape[1], parts.dtype)))
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
        np.copyto(model.grads, self._sums.add_all([(group, grads) for group, grads, _ in done],
                                                  model.grads))
        keep_owned(model.grads, self.comm.rank == 0)   # one owner: see columns.py
        totals = self._sums.add_all([(group, np.array(total)) for group, _, total in done],
                                    np.zeros(2))
        if ready is not None:   # --overlap-allreduce: every layer's gradient is final now
            for index in range(len(model.layers) - 1, -1, -1):
                ready(index)
        return float(totals[0]), int(totals[1])

    def _sync_replicas(self):
        """The threads' replicas as the model is: its parameters, buffers (BatchNorm's sums are
        taken about its running mean), library of products and mode."""
        model = self.model
        for worker in self._workers[1:]:
            replica = worker.model
            if replica.params is not model.params:
                replica.use_arrays(model.params, replica.grads)
            replica.buffers[...] = model.buffers
            if replica.backend is not model.backend:
                replica.use_backend(model.backend)
            replica.train(model.training)

    def close(self):
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


class _Worker:
    """One thread's groups, on one replica of the model, as one array of rows (group after group).

    A layer that computes each row alone (``rowwise``: ReLU, pooling, dropout)
    runs on all of them at once; BatchNorm too, told the groups' rows, with
    its sums taken per group and added over the batch (``sum_groups``); any
    other layer (a convolution, a ``Linear``, a layer of your own) runs once
    per group, on a copy of its own that shares the parameters, so that its
    products are calls on one group's rows. Each group's parameter gradients go
    to a row of ``grads`` (``(groups, parameters)``), added over the batch by
    the caller.
    """

    def __init__(self, model, loss_fn, count_correct):
        self.model, self._loss_fn, self._count_correct = model, loss_fn, count_correct
        self._copies, self._losses, self._arrays, self._input_shapes = {}, [], {}, {}
        self._allocate(1)

    def run(self, groups, x, y, global_count, context, sum_groups):
        """Forward, loss and backward of ``groups`` (``[(group, rows)]``); returns ``[(group, its
        gradient, (loss share, correct))]``."""
        model, layers = self.model, self.model.layers
        ids = [group for group, _ in groups]
        rows = np.concatenate([r for _, r in groups]) if groups else np.zeros(0, dtype=np.int64)
        edges = np.cumsum([0] + [len(r) for _, r in groups])
        bounds = list(zip(edges[:-1].tolist(), edges[1:].tolist()))
        grads = self._group_grads(len(groups))
        model.set_batch_context(BatchContext(context.seed, context.step, context.positions[rows]))
        value, labels = x[rows], y[rows]
        try:
            for i, layer in enumerate(layers):
                value = self._forward(i, layer, value, bounds, ids, grads, sum_groups)
                if model.observer is not None:
                    model.observer("forward", layer, value)
            totals, grad = self._loss(value, labels, bounds, global_count)
            first = model._first_trained
            for i in range(len(layers) - 1, first - 1, -1):
                grad = self._backward(i, layers[i], grad, bounds, i > first)
                if model.observer is not None:
                    model.observer("backward", layers[i], grad)
        finally:
            for layer in layers:
                if getattr(layer, "sums_over_rows", False):
                    layer.row_groups = layer.group_grads = layer.sum_groups = None
        return [(group, grads[k], totals[k]) for k, group in enumerate(ids)]

    def _group_grads(self, count):
        """``grads``' rows for ``count`` groups."""
        if len(self.grads) < count:
            self._allocate(count)
        return self.grads[:count]

    def _allocate(self, count):
        """``grads`` with a row for each of ``count`` groups, and every layer's views of it."""
        self.grads = np.zeros((count, self.model.params.size), dtype=self.model.params.dtype)
        self._views = [{} for _ in self.model.layers]
        offset = 0
        for owner, layer in zip(self._views, self.model.layers):
            for name, shape in layer.param_shapes().items():   # the model's flat order
                size = int(np.prod(shape))
                owner[name] = self.grads[:, offset:offset + size].reshape(count, *shape)
                offset += size
        self._copies = {}   # their gradients were views of the old rows

    def _copy(self, i, layer, k):
        """Group slot ``k``'s copy of ``layers[i]``: its parameters, its own work arrays and state,
        its gradients in the slot's row of ``grads``."""
        copies = self._copies.setdefault(i, [])
        while len(copies) <= k:
            twin = copy.copy(layer)
            twin._scratch = type(layer._scratch)()
            for method in ("forward", "backward"):   # not a wrapper of the layer's (--profile)
                vars(twin).pop(method, None)
            twin.grads = {name: view[len(copies)] for name, view in self._views[i].items()}
            copies.append(twin)
        twin = copies[k]
        twin.params, twin.backend, twin.training = layer.params, layer.backend, layer.training
        return twin

    def _array(self, key, shape, dtype):
        kept = self._arrays.get(key)
        if kept is None or kept.size < np.prod(shape) or kept.dtype != dtype:
            kept = self._arrays[key] = np.empty(int(np.prod(shape)), dtype=dtype)
        return kept[:int(np.prod(shape))].reshape(shape)

    def _forward(self, i, layer, value, bounds, ids, grads, sum_groups):
        self._input_shapes[i] = value.shape[1:]
        if layer.rowwise:
            return layer.forward(value)
        if layer.training and getattr(layer, "sums_over_rows", False):
            layer.row_groups = bounds
            layer.group_grads = {name: view[:len(bounds)] for name, view in self._views[i].items()}
            layer.sum_groups = lambda parts: sum_groups(parts, ids)
            return layer.forward(value)
        out = self._array((i, "out"), (len(value), *layer.output_shape(value.shape[1:])),
                          value.dtype)
        for k, (start, stop) in enumerate(bounds):
            out[start:stop] = self._copy(i, layer, k).forward(value[start:stop])
        return out

    def _backward(self, i, layer, grad, bounds, need_input_grad):
        if layer.rowwise or (layer.training and getattr(layer, "sums_over_rows", False)):
            return layer.backward(grad, need_input_grad=need_input_grad)
        if not need_input_grad:
            for k, (start, stop) in enumerate(bounds):
                self._copy(i, layer, k).backward(grad[start:stop], need_input_grad=False)
            return None
        dx = None
        for k, (start, stop) in enumerate(bounds):
            part = self._copy(i, layer, k).backward(grad[start:stop], need_input_grad=True)
            if dx is None:
                dx = self._array((i, "dx"), (len(grad), *part.shape[1:]), part.dtype)
            dx[start:stop] = part
        if dx is None:   # no rows
            return np.zeros((0, *self._input_shapes[i]), dtype=grad.dtype)
        return dx

    def _loss(self, logits, labels, bounds, global_count):
        """Each group's share of the loss and its correct predictions, and the gradient of the
        logits (each group's loss on its rows: the loss sums over rows)."""
        while len(self._losses) < len(bounds):
            loss_fn = copy.deepcopy(self._loss_fn)
            for method in ("forward", "backward"):   # not a wrapper of the loss's (--profile)
                vars(loss_fn).pop(method, None)
            self._losses.append(loss_fn)
        grad = self._array(("loss",), logits.shape, logits.dtype)
        totals = []
        for loss_fn, (start, stop) in zip(self._losses, bounds):
            share = loss_fn.forward(logits[start:stop], labels[start:stop],
                                    normaliser=global_count)
            totals.append((share, self._count_correct(logits[start:stop], labels[start:stop])))
            grad[start:stop] = loss_fn.backward()
        return totals, grad
