"""One data-parallel training step: the unit that the trainer, ``--debug`` and the benchmark all
run.

Follow one step (``TrainStep.__call__``): this rank's rows of the global
batch (gathered by ``batches.Batches``) go forward through the model; the
loss is normalised by the *global* batch size, so this rank's gradient is its
share of the gradient of the global mean loss; backward fills the flat
gradient; the gradient exchange sums the shares, which gives exactly that
gradient however unevenly the batch was split; a five-number Allreduce adds
up the step's loss, correct predictions and samples, whether any rank was
asked to stop and (sharded) the squares of the gradient's slices; a NaN or
Inf stops everything before the update; the gradient is clipped to a global
norm if asked; the optimiser updates the part of the parameters this rank
owns, and the exchange publishes it to every rank.

How the shares are summed (one Allreduce, buckets during backward, a
reduce-scatter, a node's shared memory) is the exchange's business
(``distributed/exchange.py``): the step is the same for all of them. With
``--accumulate K`` the rows go forward and backward K micro-batches at a time
before the one reduction; with row threads (``row_threads.py``: a CNN's, by
default) a rank's rows go forward and backward on its threads, a slice each,
the same step one level down. Lines that exist only because training is
distributed are tagged ``# DDP:``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ddptrain.errors import NumericalError
from ddptrain.nn.dropout import BatchContext
from ddptrain.training.groups import RowGroups
from ddptrain.training.reproducible import (
    BatchGather,
    chunk_squares,
    norm_chunks,
    norm_of_squares,
)
from ddptrain.training.row_threads import RowThreads


@dataclass(frozen=True)
class StepTotals:
    """One step's global sums, the same on every rank (they come out of an Allreduce)."""

    loss_sum: float         # of the per-sample losses over the global batch
    correct: int            # predictions that were right
    samples: int            # the global batch size
    stop_requested: bool    # whether any rank was asked to stop (a signal)
    grad_norm: float = 0.0  # the 2-norm of the allreduced gradient, before any clipping


class NonFiniteStep(NumericalError):
    """The loss or the allreduced gradient holds a NaN or an Inf (the update was not applied)."""


def count_correct(logits, labels):
    return int(np.count_nonzero(logits.argmax(axis=1) == labels))


def local_gradient(model, loss_fn, x, y, global_count):
    """Fill ``model.grads`` with this rank's share, for the rows ``(x, y)``, of the gradient of the
    mean loss over a global batch of ``global_count`` samples; returns the rows' share of the loss
    and their correct predictions. The loss is normalised by the global count, so the shares of all
    the rows of the global batch, however they are split (over ranks, or over micro-batches), sum to
    that gradient."""
    logits = model.forward(x)
    loss_share = loss_fn.forward(logits, y, normaliser=global_count)
    correct = count_correct(logits, y)
    model.backward(loss_fn.backward())
    return loss_share, correct


def micro_batch_bounds(rows, micro_batches):
    """``(start, stop)`` of ``micro_batches`` nearly equal, consecutive slices of ``rows`` rows
    (some empty when there are fewer rows than micro-batches)."""
    edges = [rows * i // micro_batches for i in range(micro_batches + 1)]
    return list(zip(edges[:-1], edges[1:]))


def clip_gradient(grads, norm, max_norm):
    """PyTorch's ``clip_grad_norm_``: scale ``grads`` in place by ``max_norm / (norm + 1e-6)`` when
    below 1."""
    scale = max_norm / (norm + 1e-6)
    if scale < 1:
        grads *= grads.dtype.type(scale)


class TrainStep:
    """One step of data-parallel training; see the module docstring for the path it follows.

    ``exchange``: the gradient exchange (``distributed/exchange.py``), whose
    ``comm`` also sums the step's totals. ``after_reduce`` holds callables
    ``hook(x, y, global_count, context)`` run once the gradient is reduced and
    before clipping and the update (``--debug`` checks it there).
    ``clip_grad_norm``: clip the reduced gradient to that global 2-norm (None:
    no clipping). The norm is the *global* gradient's, the same on every rank:
    clipping each rank's share by its own norm would scale the shares
    differently and sum to a gradient no single process computes.
    ``row_threads`` T > 1: this rank's rows go forward and backward on T
    threads, a slice each (``row_threads.py``; the BLAS must run one thread).
    ``row_groups`` G > 0 (with ``reproducible``): this rank's rows in fixed
    groups whose sums are added in group order (``groups.py``) instead of the
    whole batch on every rank, on ``group_threads`` threads.
    """

    def __init__(self, model, loss_fn, optimizer, exchange, clip_grad_norm=None, micro_batches=1,
                 reproducible=False, row_threads=1, row_groups=0, group_threads=1):
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.exchange, self.comm = exchange, exchange.comm
        self.clip_grad_norm = clip_grad_norm
        self.micro_batches = micro_batches
        # --reproducible (reproducible.py): the whole batch on every rank, the model in blocks of
        # columns (model.set_column_split), a norm and totals with a fixed recipe
        self.reproducible = reproducible
        # DDP: how the rows and columns travel: the exchange's way (MPI, or the node's memory)
        gather = exchange.gatherer() if reproducible else None
        if gather is not None and model.columns is not None:
            model.columns.gather = gather
            model.set_column_split(model.columns)   # the layers plan again for this gather
        self._batch_gather = BatchGather(gather) if reproducible else None
        self._rows = (RowThreads(model, loss_fn, row_threads, local_gradient) if row_threads > 1
                      else None)
        self._groups = (RowGroups(model, loss_fn, self.comm, gather, row_groups, group_threads,
                                  count_correct) if reproducible and row_groups else None)
        self._accumulated = None
        self.after_reduce = []
        # loss sum, correct, samples, ranks asked to stop, squared gradient norm (--reproducible:
        # then the squares of each of the norm's chunks)
        self._totals = np.zeros(5 + (norm_chunks(model.params.size) if reproducible else 0))

    @property
    def thread_replicas(self):
        """``(model, loss_fn)`` of each of the rank's threads after the first (the first runs
        ``model`` and ``loss_fn`` themselves): the row threads' replicas, or in groups of rows the
        group threads' (whose loss is thread 0's: None); none on one thread. What ``--profile``
        times on them."""
        if self._rows is not None:
            return list(zip(self._rows.replicas[1:], self._rows.losses[1:]))
        if self._groups is not None:
            return [(replica, None) for replica in self._groups.replicas[1:]]
        return []

    def __call__(self, x, y, global_count, lr, stop_requested=False, context=None):
        """Train on this rank's ``(x, y)`` of a global batch of ``global_count``; returns the
        StepTotals.

        ``context`` (a ``dropout.BatchContext``: the seed, the global step and
        the rows' positions in the global batch) is what Dropout draws its masks from.
        """
        model, exchange = self.model, self.exchange
        if self.reproducible and self._groups is None:
            # DDP: every rank's rows, on every rank, in their global order
            x, y, context = self._batch_gather.gather(x, y, context, global_count)
        with exchange.during_backward(model):
            loss_share, correct = self._local_gradient(x, y, global_count, context)
        # DDP: the ranks' shares summed: the gradient of the global mean loss
        exchange.reduce_(model.grads)
        if self.after_reduce:
            exchange.gather_gradient_(model.grads)   # the hooks (--debug) see all of it
            if self._groups is not None:   # DDP: and the whole batch
                x, y, context = self._batch_gather.gather(x, y, context, global_count)
            for hook in self.after_reduce:
                hook(x, y, global_count, context)
        # what this rank updates: all of it, or (sharded) its slice
        grads = exchange.owned(model.grads)
        totals = self._totals
        if self.reproducible:
            # every rank computed them on the whole batch: rank 0's alone (P copies would round)
            counted = self.comm.rank == 0
            totals[:5] = (loss_share * global_count * counted, correct * counted,
                          global_count * counted, stop_requested, 0)
            # the squares of the norm's chunks this rank holds reduced, zeros for the others'
            chunk_squares(model.grads, *exchange.counted_range(model.grads.size),
                          model.backend.dot, totals[5:])
            # DDP: whether a signal reached any rank, and every chunk's squares (one rank's
            # number and zeros: exact in any order)
            self.comm.allreduce_(totals)
            norm = norm_of_squares(totals[5:])
        else:
            squares = model.backend.dot(grads, grads)
            totals[:] = (loss_share * global_count, correct, len(y), stop_requested,
                         exchange.norm_share(squares))
            self.comm.allreduce_(totals)   # DDP: global totals, and whether a signal reached any
            norm = exchange.global_norm(squares, totals[4])
        # Checked before the update, so the parameters in memory stay the last good ones.
        if not (np.isfinite(totals[0]) and np.isfinite(norm)):
            raise NonFiniteStep("NaN or Inf in the loss or gradients")
        if self.clip_grad_norm:
            clip_gradient(grads, norm, self.clip_grad_norm)
        self.optimizer.step(model.params, model.grads, lr)
        exchange.publish_(model.params)   # DDP: every rank's updated part, on every rank
        return StepTotals(loss_sum=float(totals[0]), correct=int(totals[1]), samples=int(totals[2]),
                          stop_requested=bool(totals[3]), grad_norm=norm)

    def _local_gradient(self, x, y, global_count, context):
        """This rank's share of the gradient in ``model.grads``, not yet reduced; its share of the
        loss and its correct predictions. With ``micro_batches`` K > 1 (gradient accumulation) the
        rows go forward and backward K slices at a time (the activations of a slice only), each
        slice's gradient normalised by the *global* count and summed here; the caller reduces it
        once for the whole step, as DDP's ``no_sync`` does."""
        model = self.model
        if self.micro_batches == 1:
            return self._gradient(x, y, global_count, context)
        if self._accumulated is None or self._accumulated.shape != model.grads.shape:
            self._accumulated = np.empty_like(model.grads)
        accumulated, loss_share, correct = self._accumulated, 0.0, 0
        accumulated[...] = 0
        for start, stop in self._micro_batches(len(y), global_count, context):
            if start == stop and self._groups is None:
                continue   # fewer rows than micro-batches: this slice adds nothing (with groups,
                # the rank still takes part in the sums over the groups)
            share, right = self._gradient(x[start:stop], y[start:stop], global_count,
                                          None if context is None else
                                          BatchContext(context.seed, context.step,
                                                       context.positions[start:stop]))
            accumulated += model.grads
            loss_share, correct = loss_share + share, correct + right
        np.copyto(model.grads, accumulated)
        return loss_share, correct

    def _micro_batches(self, rows, global_count, context):
        """``(start, stop)`` of this rank's ``rows`` in each micro-batch: slices of them, or with
        groups of rows, those of each slice of the *global* batch (the groups of one process)."""
        if self._groups is None:
            return micro_batch_bounds(rows, self.micro_batches)
        edges = np.searchsorted(context.positions, [start for start, _ in micro_batch_bounds(
            global_count, self.micro_batches)] + [global_count])
        return list(zip(edges[:-1], edges[1:]))

    def _gradient(self, x, y, global_count, context):
        """``local_gradient`` of the rows ``(x, y)``, on this rank's row threads or groups if it
        has them."""
        if self._groups is not None:
            return self._groups.gradient(x, y, global_count, context)
        if self._rows is not None:
            return self._rows.gradient(x, y, global_count, context)
        self.model.set_batch_context(context)
        return local_gradient(self.model, self.loss_fn, x, y, global_count)

    def forward(self, x):
        """The model's output for ``x`` as the model is (evaluation mode: no sums across rows),
        on this rank's row threads if it has them."""
        if self._rows is None or self.model.training:
            return self.model.forward(x)
        return self._rows.forward(x)

    def close(self):
        """Stop the row threads, if any."""
        for threads in (self._rows, self._groups):
            if threads is not None:
                threads.close()
        self._rows = self._groups = None
