"""``--reproducible`` for models with convolutions: each rank trains on its own rows, in fixed
groups of rows whose sums are added in one order, so that P ranks give the bits of one process.

The whole batch on every rank (``reproducible.BatchGather``, the products in
blocks of columns: ``nn/columns.py``) makes every rank do one process's work
on every layer that cannot be cut by columns (a convolution, BatchNorm,
pooling): for a CNN most of a step. Here instead:

* **Fixed groups.** Row ``p`` of a global batch belongs to group ``p % G``,
  ``G`` the virtual shards. Row ``p`` is on rank ``(s + p) % P`` (``s``: where
  the batch begins in its epoch; ``data/sampler.py``) and ``P`` divides
  ``G``: a group's rows are on one rank for every rank count allowed.
* **Every sum over rows taken per group**, in the layers before the first
  ``Linear`` (the trunk). A thread's groups are one array of rows. A layer
  that computes each row alone (``rowwise``: ReLU, pooling, dropout) runs on
  all of it; BatchNorm takes its sums per group (``nn/normalization_groups.py``)
  and a convolution its products (whose bits depend on the rows in the call)
  on one group's rows at a time (``sums_over_rows``: ``nn/layer.py``); any
  other layer runs once per group, on a copy sharing the parameters.
* **Added in group order.** BatchNorm's sums and the trunk's gradients of
  every group are gathered from every rank and added in group order. The
  trunk's output is gathered too, and the rest of the model (the head) runs
  on the whole batch on every rank, as an MLP does in this mode.

Which thread of a rank runs which group changes nothing, so one process with
2 threads gives the bits of one thread and of 2 ranks. The rank's own model
is thread 0's, even with no rows, so that its BatchNorm's running statistics
follow the batch's sums on every rank. Nothing here knows about MPI.
"""

from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ddptrain.nn.columns import ColumnSplit, disown
from ddptrain.nn.conv import Conv2d
from ddptrain.nn.dropout import BatchContext
from ddptrain.nn.layer import Scratch
from ddptrain.nn.model import flat_views
from ddptrain.training.reproducible import RowGather

# The rows a group holds on average (global batch / groups) from which --reproducible trains a
# model with convolutions in groups; with fewer, the groups' calls cost more than the whole batch on
# every rank (docs/reproducible.md). The rule never looks at the number of ranks.
GROUP_ROWS = 4


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


def head_of(layers):
    """Where the head begins: the first layer that splits its products by columns (a ``Linear``);
    the layers before it are the trunk, trained in groups."""
    return next((i for i, layer in enumerate(layers) if layer.splits_columns), len(layers))


def copied_layers(layers):
    """The trunk's layers that run once per group, each group on a copy of its own: those that
    neither compute each row alone (``rowwise``) nor take the groups themselves
    (``sums_over_rows``)."""
    return [layer for layer in layers[:head_of(layers)]
            if not (layer.rowwise or layer.sums_over_rows)]


def with_group_blocks(layers):
    """``layers`` with the block sizes they take in groups of rows (a convolution's: up to
    ``Conv2d.GROUP_CHUNK_BYTES``), on copies: what a memory estimate counts (``block_bytes``)."""
    layers = [copy.copy(layer) for layer in layers]
    for layer in layers:
        if isinstance(layer, Conv2d):
            layer.CHUNK_BYTES = layer.GROUP_CHUNK_BYTES
    return layers


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

    def __init__(self, comm, through, threads):
        self.comm, self.through = comm, through   # through: how every rank's parts travel
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
            flat = self.through.buffer(f"group sums of {length}", int(bounds[-1]), dtype)
            mine = flat[bounds[self.comm.rank]:bounds[self.comm.rank + 1]].reshape(-1, length)
            for row, group in enumerate(held[self.comm.rank]):
                mine[row] = parts[int(group)].reshape(-1)
            self.through.allgather_(flat, bounds)   # DDP: every group's part
            parts = {int(group): flat[bounds[rank] + row * length:
                                      bounds[rank] + (row + 1) * length]
                     for rank in ranks for row, group in enumerate(held[rank])}
        total = np.zeros(length, dtype=dtype)
        for group in sorted(parts):   # group order: the same additions on any number of ranks
            total += parts[group].reshape(-1)
        return total.reshape(like.shape)


class RowGroups:
    """Forward and backward of a rank's rows in fixed groups, on ``threads`` threads.

    ``gradient(x, y, global_count, context)`` fills ``model.grads`` with the
    gradient of the global batch's mean loss and returns the batch's share of
    the loss and its correct predictions (the same on every rank);
    ``context.positions``: where this rank's rows sit in the batch. The layers
    before the first that splits its products by columns (a ``Linear``) are
    the *trunk*, run in groups; its output of every row is gathered in
    position order, and the *head* and the loss run on the whole batch, the
    products in blocks of columns (``nn/columns.py``) as an MLP's; the input
    gradient goes back to each thread's rows. One owner per gradient value:
    the trunk's rank 0, a block's its rank (``columns.disown``).
    """

    def __init__(self, model, loss_fn, comm, through, count, threads=1, count_correct=None):
        self.model, self.comm, self.count = model, comm, int(count)
        self.threads = max(1, int(threads))
        self._loss_fn, self._count_correct = loss_fn, count_correct
        layers = model.layers
        self.head = head_of(layers)
        self._trunk_size = sum(int(np.prod(shape)) for layer in layers[:self.head]
                               for shape in layer.param_shapes().values())
        # the head's products in blocks of columns (the trunk has none: the head starts at the
        # first layer that has)
        model.set_column_split(ColumnSplit(comm.rank, comm.size, through, self.threads))
        replicas = [model] + [model.replica() for _ in range(self.threads - 1)]
        self._workers = [_Worker(replica, self.head) for replica in replicas]
        self._sums = _GroupSums(comm, through, self.threads)
        self._rows = RowGather(through)
        self._pool = (ThreadPoolExecutor(self.threads - 1, thread_name_prefix="groups")
                      if self.threads > 1 else None)

    def describe(self):
        return describe_groups(self.count, self.threads)

    @property
    def replicas(self):
        """The model each thread runs its groups' trunk on (thread 0's: the model itself)."""
        return [worker.model for worker in self._workers]

    def gradient(self, x, y, global_count, context):
        model, layers = self.model, self.model.layers
        groups = groups_of(context.positions, self.count)
        self._sums.plan([group for group, _ in groups], self.count)
        self._sync_replicas()
        # thread t runs a consecutive share of the groups (thread 0 on the model itself, even with
        # none: its BatchNorm's running statistics follow the batch's sums)
        shares = [groups[len(groups) * t // self.threads:len(groups) * (t + 1) // self.threads]
                  for t in range(self.threads)]
        ready, model.gradient_ready = model.gradient_ready, None
        try:
            outputs = self._on_threads(lambda worker, thread: worker.forward(
                shares[thread], x, y, context,
                lambda parts, ids: self._sums.add(thread, list(zip(ids, parts)),
                                                  like=np.zeros(parts.shape[1], parts.dtype))))
            # DDP: the trunk's output of every row, on every rank, in position order
            value, labels, positions = self._rows.gather(
                [(values, positions, labels) for positions, values, labels in outputs])
            share, correct, grad = self._head(value, labels, positions, global_count, context)
            first = positions[0] if len(positions) else 0   # the rows' place in ``grad``
            done = self._on_threads(lambda worker, thread: worker.backward(
                None if grad is None else grad[outputs[thread][0] - first]))
        finally:
            model.gradient_ready = ready
        trunk = model.grads[:self._trunk_size]
        np.copyto(trunk, self._sums.add_all([(group, part[:self._trunk_size])
                                             for result in done for group, part in result],
                                            trunk))
        if self.comm.rank != 0:   # one owner: see columns.py
            disown(trunk)
        if ready is not None:   # --overlap-allreduce: every layer's gradient is final now
            for index in range(len(layers) - 1, -1, -1):
                ready(index)
        return share, correct

    def _on_threads(self, work):
        """``work(worker, thread)`` for every thread at once; their results, in thread order. A
        thread's error stops the others at their next sum and is raised here."""
        results, errors = [None] * self.threads, []

        def run(thread):
            try:
                results[thread] = work(self._workers[thread], thread)
            except BaseException as error:   # noqa: BLE001 - raised below, in the caller's thread
                errors.append(error)
                self._sums.barrier.abort()   # no thread waits for this one at a sum

        jobs = [self._pool.submit(run, t) for t in range(1, self.threads)] if self._pool else []
        run(0)
        for job in jobs:
            job.result()
        if errors:
            self._sums.barrier.reset()
            raise next((error for error in errors
                        if not isinstance(error, threading.BrokenBarrierError)), errors[0])
        return results

    def _head(self, value, labels, positions, global_count, context):
        """The head and the loss on the whole batch (every rank alike); the loss share, correct
        predictions and the gradient at the head's input (None when the trunk trains nothing)."""
        model = self.model
        whole = BatchContext(context.seed, context.step, positions)
        for layer in model.layers[self.head:]:
            if hasattr(layer, "batch_context"):
                layer.batch_context = whole
        value = model.forward(value, first=self.head)
        share = self._loss_fn.forward(value, labels, normaliser=global_count)
        correct = self._count_correct(value, labels)
        # one owner per gradient value (columns.py): a block's its rank, another layer's rank 0
        return share, correct, model.backward(self._loss_fn.backward(), first=self.head,
                                              need_input_grad=self.head > model._first_trained)

    def _sync_replicas(self):
        for worker in self._workers[1:]:
            worker.model.follow(self.model, self.model.training)

    def close(self):
        if self.model.columns is not None:
            self.model.columns.close()
            self.model.set_column_split(None)   # the caller's model is theirs again, as it was
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


class _Worker:
    """One thread's groups through the trunk (the layers before ``head``), on one replica of the
    model, as one array of rows (group after group).

    A layer that computes each row alone (``rowwise``: ReLU, pooling, dropout)
    runs on all of them at once; a layer that takes the groups
    (``sums_over_rows``: BatchNorm, Conv2d) too, told the groups' rows, with
    its sums taken per group (BatchNorm's statistics added over the batch by
    ``sum_groups``); any other layer (one of your own) runs once per group, on
    a copy of its own that shares the parameters. Each group's parameter
    gradients go to a row of ``grads`` (``(groups, parameters)``), added over
    the batch by the caller.
    """

    def __init__(self, model, head):
        self.model, self.head = model, head
        self._copies, self._arrays, self._input_shapes = {}, Scratch(), {}
        self._allocate(1)

    def forward(self, groups, x, y, context, sum_groups):
        """The trunk's forward of ``groups`` (``[(group, rows)]``); returns the rows' positions,
        the trunk's output and the rows' labels."""
        model = self.model
        self._ids = [group for group, _ in groups]
        rows = np.concatenate([r for _, r in groups]) if groups else np.zeros(0, dtype=np.int64)
        edges = np.cumsum([0] + [len(r) for _, r in groups])
        self._bounds = list(zip(edges[:-1].tolist(), edges[1:].tolist()))
        grads = self._group_grads(len(groups))
        positions = context.positions[rows]
        model.set_batch_context(BatchContext(context.seed, context.step, positions))
        value = x[rows]
        try:
            for i, layer in enumerate(model.layers[:self.head]):
                value = self._forward(i, layer, value, self._bounds, self._ids, grads, sum_groups)
                if model.observer is not None:
                    model.observer("forward", layer, value)
        except BaseException:
            self._forget_groups()
            raise
        return positions, value, y[rows]

    def backward(self, grad):
        """The trunk's backward from ``grad``, the gradient at its output (None: nothing in the
        trunk trains); returns ``[(group, its gradient)]``."""
        model, bounds = self.model, self._bounds
        first = model._first_trained
        try:
            for i in range(self.head - 1, first - 1, -1) if grad is not None else ():
                grad = self._backward(i, model.layers[i], grad, bounds, i > first)
                if model.observer is not None:
                    model.observer("backward", model.layers[i], grad)
        finally:
            self._forget_groups()
        return [(group, self.grads[k]) for k, group in enumerate(self._ids)]

    def _forget_groups(self):
        for layer in self.model.layers:
            if layer.sums_over_rows:
                layer.row_groups = layer.group_grads = layer.sum_groups = None

    def _group_grads(self, count):
        """``grads``' rows for ``count`` groups."""
        if len(self.grads) < count:
            self._allocate(count)
        return self.grads[:count]

    def _allocate(self, count):
        """``grads`` with a row for each of ``count`` groups, and every layer's views of it."""
        model = self.model
        self.grads = np.zeros((count, model.params.size), dtype=model.params.dtype)
        views = {id(layer): {} for layer in model.layers}
        for layer, name, view in flat_views(model.param_owners(), self.grads):
            views[id(layer)][name] = view
        self._views = [views[id(layer)] for layer in model.layers]
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

    def _forward(self, i, layer, value, bounds, ids, grads, sum_groups):
        self._input_shapes[i] = value.shape[1:]
        if layer.rowwise:
            return layer.forward(value)
        if layer.training and layer.sums_over_rows:
            layer.row_groups = bounds
            layer.group_grads = {name: view[:len(bounds)] for name, view in self._views[i].items()}
            layer.sum_groups = lambda parts: sum_groups(parts, ids)
            return layer.forward(value)
        out = self._arrays.get((i, "out"), (len(value), *layer.output_shape(value.shape[1:])),
                               value.dtype)
        for k, (start, stop) in enumerate(bounds):
            out[start:stop] = self._copy(i, layer, k).forward(value[start:stop])
        return out

    def _backward(self, i, layer, grad, bounds, need_input_grad):
        if layer.rowwise or (layer.training and layer.sums_over_rows):
            return layer.backward(grad, need_input_grad=need_input_grad)
        if not need_input_grad:
            for k, (start, stop) in enumerate(bounds):
                self._copy(i, layer, k).backward(grad[start:stop], need_input_grad=False)
            return None
        dx = None
        for k, (start, stop) in enumerate(bounds):
            part = self._copy(i, layer, k).backward(grad[start:stop], need_input_grad=True)
            if dx is None:
                dx = self._arrays.get((i, "dx"), (len(grad), *part.shape[1:]), part.dtype)
            dx[start:stop] = part
        if dx is None:   # no rows
            return np.zeros((0, *self._input_shapes[i]), dtype=grad.dtype)
        return dx
