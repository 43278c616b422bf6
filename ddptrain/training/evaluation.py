"""Evaluation of the current parameters on a whole split, every rank its rows, summed over the
ranks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ddptrain.nn.losses import SoftmaxCrossEntropy


@dataclass
class Evaluation:
    loss: float
    accuracy: float
    confusion: np.ndarray    # confusion[true, predicted], counts over the whole split

    @property
    def per_class_accuracy(self):
        totals = self.confusion.sum(axis=1)
        return np.diag(self.confusion) / np.maximum(totals, 1)


def evaluate(model, comm, split, n_classes, chunk=2000):
    """Loss and accuracy of the current parameters on the whole split, in evaluation mode.
    Collective.

    Each rank evaluates its rows; the per-sample loss sum and the confusion
    matrix are summed over the ranks, so the result is that of one process
    evaluating every row (up to the order of floating-point additions), and
    bitwise the same on every rank.

    Every rank runs the same number of forward passes: a rank with fewer
    rows passes empty batches at the end (the loop count is padded, never the
    data), so a layer may communicate in its forward without a deadlock.
    """
    passes = max(comm.allgather(-(-split.n_rows // chunk)))   # DDP
    loss_fn = SoftmaxCrossEntropy()
    loss_sum = 0.0
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, passes * chunk, chunk):
            x, y = split.rows(start, start + chunk)
            logits = model.forward(x)
            loss_sum += loss_fn.forward(logits, y, normaliser=1)
            confusion += np.bincount(y * n_classes + logits.argmax(axis=1),
                                     minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    finally:
        model.train(was_training)
    # DDP: every rank adds the ranks' sums itself, in rank order: the same bits on every rank,
    # which an Allreduce does not promise (its order of additions may differ between ranks), so
    # that a decision taken on each rank from them (early stopping) is the same everywhere.
    mine = np.concatenate([[loss_sum], confusion.ravel()]).astype(np.float64)
    totals = np.zeros_like(mine)
    for sums in comm.allgather(mine):
        totals += sums
    confusion = totals[1:].round().astype(np.int64).reshape(n_classes, n_classes)
    n = confusion.sum()
    return Evaluation(loss=float(totals[0] / n), accuracy=float(np.trace(confusion) / n),
                      confusion=confusion)
