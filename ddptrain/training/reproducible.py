"""``--reproducible``: what a step does besides the model's blocks of columns (``nn/columns.py``) so
that P ranks give bitwise the bits of one process.

* **The whole global batch on every rank.** Each rank still reads only its
  shard; the step's rows are gathered (``BatchGather``) and put in their
  global order, so the model computes on exactly the rows one process
  computes on, in the same order, whatever the split.
* **A gradient norm with a fixed recipe** (``canonical_norm``): the squares
  of fixed chunks of the flat gradient, each one call, added in chunk order
  in float64. A sum of the ranks' shares would depend on where the shares
  begin and end.
* **Totals from one rank**: every rank computed the same loss and
  predictions on the whole batch; rank 0's alone go into the step's sums
  (adding P copies would round).
"""

from __future__ import annotations

import numpy as np

from ddptrain.nn.dropout import BatchContext

# Values of the flat gradient per chunk of the gradient norm: fixed, like the blocks of columns.
NORM_CHUNK = 1 << 16


class BatchGather:
    """Every rank's rows of each global batch, on every rank, in global order (``gather``), through
    buffers kept from step to step: a fresh array of a batch's size each step costs its page
    faults, as much as the gathering itself."""

    def __init__(self, comm):
        self.comm = comm
        self._flat = self._full = None

    def gather(self, x, y, context):
        """``(x, y, context)`` of the whole global batch from this rank's ``x``, ``y`` and
        ``context.positions`` (where its rows sit in the global batch). A collective."""
        comm = self.comm
        if comm.size == 1:
            return x, y, context
        sizes = np.zeros(comm.size)
        sizes[comm.rank] = len(y)
        comm.allgather_(sizes, np.arange(comm.size + 1))   # DDP: every rank's row count
        rows = np.concatenate([[0], np.cumsum(sizes.astype(np.int64))])
        width = int(np.prod(x.shape[1:], dtype=np.int64))
        flat = self._buffer("_flat", rows[-1] * width, x.dtype)
        flat[rows[comm.rank] * width:rows[comm.rank + 1] * width] = x.reshape(-1)
        comm.allgather_(flat, rows * width)   # DDP: the rows
        where = np.empty(int(rows[-1]) * 2, dtype=np.float64)   # positions and labels: exact
        mine = where[2 * rows[comm.rank]:2 * rows[comm.rank + 1]].reshape(2, -1)
        mine[0], mine[1] = context.positions, y
        comm.allgather_(where, 2 * rows)   # DDP: where each row goes, and its label
        order = np.empty(int(rows[-1]), dtype=np.int64)
        labels = np.empty(int(rows[-1]), dtype=y.dtype)
        for rank in range(comm.size):
            theirs = where[2 * rows[rank]:2 * rows[rank + 1]].reshape(2, -1)
            order[rows[rank]:rows[rank + 1]] = theirs[0]
            labels[theirs[0].astype(np.int64)] = theirs[1]
        gathered = flat.reshape((int(rows[-1]), *x.shape[1:]))
        if not np.array_equal(order, np.arange(len(order))):   # the ranks' rows interleave
            full = self._buffer("_full", gathered.size, x.dtype).reshape(gathered.shape)
            full[order] = gathered
            gathered = full
        return gathered, labels, BatchContext(context.seed, context.step, np.arange(len(labels)))

    def _buffer(self, name, size, dtype):
        """The kept buffer ``name``, as ``size`` values of ``dtype`` (grown when too small)."""
        kept = getattr(self, name)
        if kept is None or kept.dtype != dtype or kept.size < size:
            kept = np.empty(int(size), dtype=dtype)
            setattr(self, name, kept)
        return kept[:int(size)]


def canonical_norm(grads, dot):
    """The 2-norm of the flat gradient ``grads`` (all of it, on this rank), computed the same way
    whatever the number of ranks: ``dot`` (one BLAS thread) of each fixed chunk, added in order in
    float64."""
    total = 0.0
    for start in range(0, grads.size, NORM_CHUNK):
        chunk = grads[start:start + NORM_CHUNK]
        total += float(dot(chunk, chunk))
    return float(np.sqrt(total))
