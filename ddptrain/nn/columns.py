"""Matrix products in fixed blocks of columns: how a model computes the same bits on any number of
ranks (``--reproducible``).

Why a split changes the bits: a sum of floating-point numbers depends on
the order of its additions, and a BLAS's matrix product adds in an order of
its own that depends on the shapes of the call and on its threads (OpenBLAS
0.3.31 gives a row of ``X @ W`` other bits when the call holds other rows,
even on one thread: ``scripts/gemm_row_invariance.py``). Splitting a global
batch over ranks changes every such call, so the weight gradients (sums over
the rows), and from there everything, differ in their last bits.

What this module does instead, when a run is reproducible: every rank holds
the whole global batch (``training/reproducible.py`` gathers it), and the
matrix products of a ``Linear`` layer are cut into blocks of ``BLOCK``
output columns. Each block is one *canonical* call, the same shapes and the
same inputs whatever the number of ranks, run with one BLAS thread:

* forward: ``y[:, block] = x @ W[:, block]``;
* weight gradient: ``dW[:, block] = x.T @ dy[:, block]``: a sum over the
  rows of the whole global batch, in one call, in global row order;
* input gradient: ``dx[:, block] = dy @ W[block, :].T`` over blocks of
  input columns.

The blocks of a product are shared out among the ranks, each rank
computes its share (on ``threads`` Python threads, each calling the
one-thread BLAS), and an allgather brings every rank's columns to every
rank (but where every rank computes all of a small layer's products,
``ColumnSplit.everywhere``, or no rank reads the others' columns,
``Sequential._plan_input_grads``). So the arithmetic of every number is
fixed before the number of ranks is known, and the ranks only decide who
does it. Every other layer (ReLU, BatchNorm, Dropout; a convolution, unless
the run trains in groups of rows: ``training/groups.py``) runs on the whole
batch on every rank: the same work as one process, hence the same bits.

The gradient of a parameter is then *owned* by one rank: a block's by the
rank that computed it, a whole-batch layer's by rank 0. The others fill
their copy with ``-0.0`` (``disown``), so the gradient exchange adds one
number and negative zeros, which gives the owner's number, bit for bit, in
any order and through any exchange. One process sends its own as they are.

Nothing here knows about MPI: the run hands in a ``gather``
(``distributed/gather.py``: with MPI, or through the node's shared memory;
nothing in one process).
"""

from __future__ import annotations

import math

import numpy as np

from ddptrain.nn.crew import Crew

# Output columns per canonical call. Part of what fixes the bits: runs compared with each other
# must use the same value. OpenBLAS multiplies 64-column blocks 20-30% slower than the whole
# product on one thread, 128-column ones 5-15% (docs/reproducible.md); 128 still gives a layer of
# 512 columns a block for each of 4 ranks.
BLOCK = 128

# Products with less arithmetic than this (floating-point operations) run on the thread that has
# them: handing them to another thread and back (nn/crew.py) would cost more than half of their
# time, which is what a second thread saves (docs/history.md, 8 December 2026). An MLP's last
# layer at small batches. (Which thread computes a block never changes its bits.)
INLINE_FLOPS = 8_000_000


def blocks_of(n, width=BLOCK):
    """The ``(start, stop)`` column ranges of ``n`` columns in blocks of ``width`` (the last may be
    narrower)."""
    return [(start, min(start + width, n)) for start in range(0, n, width)]


def owned_range(n_blocks, rank, size):
    """The blocks ``[first, stop)`` that ``rank`` of ``size`` computes: consecutive, as even as the
    count allows (a rank may have none)."""
    return n_blocks * rank // size, n_blocks * (rank + 1) // size


def _run_all(calls):
    for call in calls:
        call()


class ColumnSplit:
    """Who computes which blocks of columns, and how the ranks' columns reach every rank.

    ``rank``, ``size``: this rank and the number of ranks; ``gather``:
    how every rank's slice of a flat array reaches every rank (``buffer``,
    then ``allgather_``: ``distributed/gather.py``; none in one process);
    ``threads``: the Python threads that run this rank's canonical calls
    (each calls a one-thread BLAS), so one process with 2 threads computes
    what 2 ranks compute.
    """

    def __init__(self, rank=0, size=1, gather=None, threads=1, width=BLOCK):
        self.rank, self.size, self.width = rank, size, width
        self.gather = gather
        self.threads = max(1, int(threads))
        self._crew = Crew(self.threads, "columns") if self.threads > 1 else None

    def describe(self):
        return (f"matrix products in blocks of {self.width} columns, 1 BLAS thread each, "
                f"{self.threads} thread(s) per rank")

    # -- the plan ---------------------------------------------------------------------------------

    def blocks(self, n):
        return blocks_of(n, self.width)

    def columns_of(self, n, rank):
        """The columns ``(start, stop)`` that ``rank`` computes of a product with ``n`` columns."""
        blocks = self.blocks(n)
        first, stop = owned_range(len(blocks), rank, self.size)
        if first == stop:
            return (0, 0)
        return blocks[first][0], blocks[stop - 1][1]

    def my_blocks(self, n):
        blocks = self.blocks(n)
        first, stop = owned_range(len(blocks), self.rank, self.size)
        return blocks[first:stop]

    def everywhere(self, n_out):
        """Whether every rank computes all of the products of a layer of ``n_out`` output columns
        itself, with no allgather: when its outputs are one block. Its forward product would be
        one rank's while the others wait for it at the allgather, and its input gradient costs
        what its forward product costs. (Who computes a block never changes its bits.)"""
        return len(self.blocks(n_out)) == 1

    @property
    def owns_whole_batch_layers(self):
        """Whether this rank owns the gradients of the layers that run on the whole batch."""
        return self.rank == 0

    # -- the work ---------------------------------------------------------------------------------

    def run(self, calls, flops=None):
        """Run the callables ``calls`` (canonical products writing into disjoint arrays), on this
        rank's threads: one batch of calls per thread, this one running its own, so a product
        costs one hand-off per thread rather than one per block. ``flops``: their arithmetic in
        all; below ``INLINE_FLOPS`` this thread runs them all."""
        if (self._crew is None or len(calls) < 2
                or (flops is not None and flops < INLINE_FLOPS)):
            for call in calls:
                call()
            return
        self._crew.run([lambda batch=calls[i::self.threads]: _run_all(batch)
                        for i in range(min(self.threads, len(calls)))])

    @property
    def shares_memory(self):
        """Whether a product's shared columns are written into memory every rank reads (``output``):
        its layer's output is then not the layer's own to write over."""
        return self.size > 1 and self.gather is not None and self.gather.shared

    def output(self, scratch, key, shape, dtype, name):
        """The array that a product whose columns are then shared (``share``) is written into:
        ``name`` (the layer's, and ``key``) in the node's shared memory where the columns travel
        through it, so that each rank writes its columns where every other rank reads them;
        else the ``scratch`` array ``key``."""
        if self.shares_memory:
            return self.gather.buffer(f"{name} {key}", math.prod(shape), dtype).reshape(shape)
        return scratch.get(key, shape, dtype)

    def share(self, array):
        """Every rank's columns of ``array`` (``(rows, n)``, each rank having written its own) on
        every rank, in place. ``array`` from ``output``."""
        if self.size == 1:
            return array
        if self.shares_memory:   # written in place (``output``): a barrier is all there is to do
            self.gather.allgather_(array.reshape(-1), None)   # DDP: every rank's columns
            return array
        rows, n = array.shape
        spans = [self.columns_of(n, rank) for rank in range(self.size)]
        bounds = np.cumsum([0] + [rows * (stop - start) for start, stop in spans])
        packed = self.gather.buffer("share", int(bounds[-1]), array.dtype)
        start, stop = spans[self.rank]
        mine = packed[bounds[self.rank]:bounds[self.rank + 1]].reshape(rows, stop - start)
        np.copyto(mine, array[:, start:stop])
        self.gather.allgather_(packed, bounds)   # DDP: every rank's columns
        for rank, (start, stop) in enumerate(spans):
            if rank != self.rank and stop > start:
                array[:, start:stop] = packed[bounds[rank]:bounds[rank + 1]].reshape(
                    rows, stop - start)
        return array

    def close(self):
        if self._crew is not None:
            self._crew.close()
            self._crew = None


def disown(array):
    """What a rank sends of the gradient values it does not own: ``-0.0``, the one number whose sum
    with any float is that float itself (``x + -0.0`` is ``x``, ``-0.0`` included; ``+0.0`` would
    make an owner's ``-0.0`` into ``+0.0``). So the exchange's sum, in any order, is the owner's
    value, the very bits one process, with nothing to add, keeps."""
    array[...] = -0.0
    return array
