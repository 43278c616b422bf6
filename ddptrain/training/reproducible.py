"""``--reproducible``: what a step does besides the model's blocks of columns (``nn/columns.py``) so
that P ranks give bitwise the bits of one process.

* **The whole global batch on every rank.** Each rank still reads only its
  shard; the step's rows are gathered (``BatchGather``) and put in their
  global order, so the model computes on exactly the rows one process
  computes on, in the same order, whatever the split.
* **A gradient norm with a fixed recipe** (``chunk_squares``,
  ``norm_of_squares``): the squares of fixed chunks of the flat gradient,
  each one call, added in chunk order in float64. A sum of the ranks'
  shares would depend on where the shares begin and end; here each chunk is
  squared by the one rank that holds it reduced (a rank's slice of the
  gradient is whole chunks: ``sharding.shard_bounds``' align), and the
  chunks' squares reach every rank with the step's totals, each added to
  zeros: exact in any order.
* **Totals from one rank**: every rank computed the same loss and
  predictions on the whole batch; rank 0's alone go into the step's sums
  (adding P copies would round).
"""

from __future__ import annotations

import numpy as np

from ddptrain.distributed.sharding import NORM_CHUNK
from ddptrain.nn.dropout import BatchContext
from ddptrain.nn.layer import Scratch


class RowGather:
    """Every rank's rows of a batch, on every rank, in the order of their positions in it.

    Each rank's rows travel with their positions and labels as two more
    columns (whole numbers, exact in the rows' floating type), in one
    allgather after one of the row counts (and first positions), ``through``
    a gather (``distributed/gather.py``); then every rank sorts them by
    position. Through the node's shared memory, each rank writes its rows
    straight to their positions instead, and there is nothing to sort (nor
    any count to gather, where the caller knows how many rows there are). Into
    buffers kept from call to call: a fresh array of a batch's size each step
    costs its page faults, as much as the gathering.
    """

    def __init__(self, through):
        self.through = through
        self._scratch = Scratch()

    def gather(self, parts, total=None):
        """``(values, labels, positions)`` of every rank's rows, sorted by position, from this
        rank's ``parts``: ``[(values, positions, labels)]``, ``values`` ``(rows, ...)`` floats,
        the positions of all the ranks' rows consecutive whole numbers, once each. ``total``: the
        number of rows of all the ranks, when the caller knows it, their positions then ``0`` to
        ``total - 1``. The arrays are the gatherer's until the call after next. A collective."""
        gather, sample = self.through, parts[0][0].shape[1:]
        width, dtype = int(np.prod(sample, dtype=np.int64)), parts[0][0].dtype
        if gather.shared and total is not None:   # where each row goes is known: no counts
            packed = gather.buffer("rows", total * (width + 2), dtype).reshape(-1, width + 2)
            return self._gather_shared(parts, packed, 0, sample)
        # every rank's row count, and the first position of its rows
        counts = gather.buffer("row counts", 2 * gather.size, np.float64).reshape(-1, 2)
        counts[gather.rank] = (sum(len(values) for values, _, _ in parts),
                               min((int(positions.min()) for _, positions, _ in parts
                                    if len(positions)), default=np.inf))
        gather.allgather_(counts.reshape(-1), np.arange(gather.size + 1) * 2)   # DDP
        counts, first = counts[:, 0].astype(np.int64), counts[:, 1].min()
        bounds = np.concatenate([[0], np.cumsum(counts * (width + 2))])
        packed = gather.buffer("rows", int(bounds[-1]), dtype).reshape(-1, width + 2)
        if gather.shared:
            return self._gather_shared(parts, packed, int(first) if len(packed) else 0, sample)
        row = int(bounds[gather.rank]) // (width + 2)
        for values, positions, labels in parts:
            mine = packed[row:row + len(values)]
            mine[:, :width] = values.reshape(len(values), width)
            mine[:, width], mine[:, width + 1] = positions, labels
            row += len(values)
        gather.allgather_(packed.reshape(-1), bounds)   # DDP: every rank's rows
        order = np.argsort(packed[:, width], kind="stable")
        rows = len(order)
        values = self._scratch.get("sorted", (rows * width,), dtype).reshape(rows, width)
        np.take(packed[:, :width], order, axis=0, out=values, mode="clip")   # clip: not buffered
        return (values.reshape(rows, *sample),
                packed[order, width + 1].astype(parts[0][2].dtype),
                packed[order, width].astype(np.int64))

    def _gather_shared(self, parts, packed, first, sample):
        """``gather`` through one buffer for every rank, ``packed`` (a row for each position from
        ``first``): each rank writes its rows where they go, and there is nothing to sort."""
        width, rows = packed.shape[1] - 2, len(packed)
        for values, positions, labels in parts:
            packed[positions - first, :width] = values.reshape(len(values), width)
            packed[positions - first, width + 1] = labels
        self.through.allgather_(packed.reshape(-1), None)   # DDP: every rank's rows
        return (packed[:, :width].reshape(rows, *sample),
                packed[:, width + 1].astype(parts[0][2].dtype), first + np.arange(rows))


class BatchGather:
    """Every rank's rows of each global batch, on every rank, in global order (``gather``)."""

    def __init__(self, through):
        self._rows = RowGather(through)

    def gather(self, x, y, context, global_count):
        """``(x, y, context)`` of the whole global batch (``global_count`` rows) from this rank's
        ``x``, ``y`` and ``context.positions`` (where its rows sit in the global batch). A
        collective."""
        if self._rows.through.size == 1:
            return x, y, context
        x, y, _ = self._rows.gather([(x, context.positions, y)], total=global_count)
        return x, y, BatchContext(context.seed, context.step, np.arange(len(y)))


def norm_chunks(n):
    """How many chunks of ``NORM_CHUNK`` values the norm cuts a flat gradient of ``n`` values
    into."""
    return -(-n // NORM_CHUNK)


def chunk_squares(grads, start, stop, dot, out):
    """``out[c]`` = the squares of chunk ``c`` of the flat gradient ``grads`` summed (``dot``, one
    BLAS thread, one call a chunk) for the chunks in its values ``[start, stop)`` (``start`` a
    multiple of ``NORM_CHUNK``; ``stop`` one, or the end), 0 for the others. Returns ``out``."""
    out[...] = 0
    for c in range(start // NORM_CHUNK, norm_chunks(stop)):
        chunk = grads[c * NORM_CHUNK:(c + 1) * NORM_CHUNK]
        out[c] = float(dot(chunk, chunk))
    return out


def norm_of_squares(squares):
    """The 2-norm from every chunk's squares (``chunk_squares`` of all of them), added in chunk
    order in float64: the same recipe whatever the number of ranks."""
    total = 0.0
    for square in squares:
        total += float(square)
    return float(np.sqrt(total))
