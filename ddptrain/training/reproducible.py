"""``--reproducible``: what a step does besides the model's blocks of columns (``nn/columns.py``) so
that P ranks give bitwise the bits of one process.

* **The whole global batch on every rank.** Each rank still reads only its
  shard; the step's rows are gathered (``gather_batch``) and put in their
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


def gather_batch(comm, x, y, context):
    """Every rank's rows of a global batch (``x``, ``y``: this rank's; ``context.positions``: where
    they sit in the global batch), on every rank, in global order; and the ``BatchContext`` of the
    whole batch. A collective."""
    if comm.size == 1:
        return x, y, context
    counts = comm.allgather(len(y))   # DDP
    width = int(np.prod(x.shape[1:], dtype=np.int64))
    bounds = np.cumsum([0] + [n * width for n in counts])
    flat = np.empty(int(bounds[-1]), dtype=x.dtype)
    flat[bounds[comm.rank]:bounds[comm.rank + 1]] = x.reshape(-1)
    comm.allgather_(flat, bounds)   # DDP: the rows
    rows = np.cumsum([0] + list(counts))
    where = np.empty(int(rows[-1]) * 2, dtype=np.float64)   # positions and labels: exact in float64
    mine = where[2 * rows[comm.rank]:2 * rows[comm.rank + 1]].reshape(2, -1)
    mine[0], mine[1] = context.positions, y
    comm.allgather_(where, 2 * rows)   # DDP: where each row goes, and its label
    order = np.empty(int(rows[-1]), dtype=np.int64)
    labels = np.empty(int(rows[-1]), dtype=y.dtype)
    for rank in range(comm.size):
        theirs = where[2 * rows[rank]:2 * rows[rank + 1]].reshape(2, -1)
        order[rows[rank]:rows[rank + 1]] = theirs[0]
        labels[theirs[0].astype(np.int64)] = theirs[1]
    full = np.empty((int(rows[-1]), *x.shape[1:]), dtype=x.dtype)
    full[order] = flat.reshape(full.shape)
    return full, labels, BatchContext(context.seed, context.step, np.arange(len(labels)))


def canonical_norm(grads, dot):
    """The 2-norm of the flat gradient ``grads`` (all of it, on this rank), computed the same way
    whatever the number of ranks: ``dot`` (one BLAS thread) of each fixed chunk, added in order in
    float64."""
    total = 0.0
    for start in range(0, grads.size, NORM_CHUNK):
        chunk = grads[start:start + NORM_CHUNK]
        total += float(dot(chunk, chunk))
    return float(np.sqrt(total))
