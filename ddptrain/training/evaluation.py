"""Evaluation of the current parameters on a whole split, every rank its rows, summed over the
ranks."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ddptrain.distributed.gather import MessageGather
from ddptrain.nn.losses import SoftmaxCrossEntropy
from ddptrain.training.reproducible import RowGather


@dataclass
class Evaluation:
    loss: float
    accuracy: float
    confusion: np.ndarray    # confusion[true, predicted], counts over the whole split

    @property
    def per_class_accuracy(self):
        totals = self.confusion.sum(axis=1)
        return np.diag(self.confusion) / np.maximum(totals, 1)


def evaluate(model, comm, split, n_classes, chunk=2000, reproducible=False, forward=None):
    """Loss and accuracy of the current parameters on the whole split, in evaluation mode.
    Collective.

    Each rank evaluates its rows; the per-sample loss sum and the confusion
    matrix are summed over the ranks, so the result is that of one process
    evaluating every row (up to the order of floating-point additions), and
    bitwise the same on every rank.

    Every rank runs the same number of forward passes: a rank with fewer
    rows passes empty batches at the end (the loop count is padded, never the
    data), so a layer may communicate in its forward without a deadlock.
    ``forward``: what computes a chunk's outputs (default ``model.forward``;
    the step's, to use its row threads).
    """
    if reproducible:
        return evaluate_in_global_order(model, comm, split, n_classes, chunk)
    passes = max(comm.allgather(-(-split.n_rows // chunk)))   # DDP
    tally = _Tally(n_classes)
    with _evaluation_mode(model):
        for start in range(0, passes * chunk, chunk):
            x, y = split.rows(start, start + chunk)
            tally.add((forward or model.forward)(x), y)
    # DDP: every rank adds the ranks' sums itself, in rank order: the same bits on every rank,
    # which an Allreduce does not promise (its order of additions may differ between ranks), so
    # that a decision taken on each rank from them (early stopping) is the same everywhere.
    mine = np.concatenate([[tally.loss_sum], tally.confusion.ravel()]).astype(np.float64)
    totals = np.zeros_like(mine)
    for sums in comm.allgather(mine):
        totals += sums
    confusion = totals[1:].round().astype(np.int64).reshape(n_classes, n_classes)
    return _evaluation(totals[0], confusion)


def _evaluation(loss_sum, confusion):
    n = confusion.sum()
    return Evaluation(loss=float(loss_sum / n), accuracy=float(np.trace(confusion) / n),
                      confusion=confusion)


def evaluate_in_global_order(model, comm, split, n_classes, chunk):
    """``evaluate`` for ``--reproducible``: the split in chunks of ``chunk`` rows of the *whole*
    split (rank r holds the rows ``evaluation_block`` gives it), each chunk gathered on every rank
    and run through the model in blocks of columns, the chunks' sums added in chunk order: the bits
    of one process whatever the number of ranks. Collective."""
    sizes = comm.allgather(split.n_rows)   # DDP: each rank's consecutive block of the split
    starts = np.cumsum([0] + sizes)
    tally, gather = _Tally(n_classes), RowGather(MessageGather(comm))
    with _evaluation_mode(model):
        for first in range(0, int(starts[-1]), chunk):
            last = min(first + chunk, int(starts[-1]))
            # DDP: this chunk's rows from the ranks that hold them
            x, y = _gather_rows(gather, split, starts, first, last)
            tally.add(model.forward(x), y)
    return _evaluation(tally.loss_sum, tally.confusion)


class _Tally:
    """The loss summed over the samples and the confusion matrix of the chunks evaluated so far."""

    def __init__(self, n_classes):
        self.n_classes, self.loss_fn = n_classes, SoftmaxCrossEntropy()
        self.loss_sum = 0.0
        self.confusion = np.zeros((n_classes, n_classes), dtype=np.int64)

    def add(self, logits, y):
        n = self.n_classes
        self.loss_sum += self.loss_fn.forward(logits, y, normaliser=1)
        self.confusion += np.bincount(y * n + logits.argmax(axis=1),
                                      minlength=n * n).reshape(n, n)


@contextmanager
def _evaluation_mode(model):
    """``model`` in evaluation mode inside the block, in the mode it was in after it."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _gather_rows(gather, split, starts, first, last):
    """Rows ``[first, last)`` of the whole split, on every rank, in order: each rank's part of them,
    from its block ``[starts[rank], starts[rank + 1])``, through ``gather`` (a RowGather)."""
    rank, size = gather.through.rank, gather.through.size
    mine = [min(max(row, starts[rank]), starts[rank + 1]) for row in (first, last)]
    x, y = split.rows(int(mine[0] - starts[rank]), int(mine[1] - starts[rank]))
    if size == 1:
        return x, y
    # positions within the chunk: exact in any floating type (a chunk is far below 2**24 rows)
    positions = np.arange(mine[0], mine[1]) - first
    x, y, _ = gather.gather([(x, positions, y)], total=last - first)
    return x, y
