"""The streamed order: which rows each rank trains on when it holds only windows of its shard; pure
functions, no I/O.

The sampler's design (``sampler``) stands: ``V`` virtual shards, rank ``r``
owns the shards ``v % P == r``, and position ``k`` of an epoch is drawn from
shard ``k % V``, as its row number ``k // V``. Only the order of each shard's
rows changes, so that a rank can read its shard in whole HDF5 chunks and hold
a bounded part of it:

1. Each shard is cut into *blocks* at the file's chunk boundaries (rows
   ``[start, stop)`` with ``stop - start <= block_rows``; a shard's first and
   last block may be partial).
2. Every epoch, a shard's blocks are put in an order drawn from
   ``(seed, epoch, v, BLOCK_ORDER)`` and grouped into *windows* of
   ``window_blocks`` consecutive blocks (the last window may hold fewer).
3. A window's rows, taken in file order, are shuffled by the next
   permutation of a generator seeded with ``(seed, epoch, v)``; the shard's
   rows in the epoch are its windows' rows, window after window.

The rows a shard gives an epoch depend on ``(seed, epoch, v)`` and the
order's two numbers only, never on ``P``: P ranks train the global batches
of one process. With one window covering a whole shard, step 3 is the
sampler's own permutation of the shard (the same generator, the same call),
so the streamed order *equals* the in-memory order there.

A rank holds two windows of each of its shards (the one being trained on
and the next, read ahead). A step takes at most ``ceil(B / V)`` consecutive
rows of a shard, which must lie in at most two consecutive windows:
``min_window_blocks`` is the smallest window that guarantees it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ddptrain.data.format import CHUNK_BYTES, ROWS_PER_CHUNK
from ddptrain.data.sampler import (
    StepSlices,
    check_layout,
    owned_shards,
    shard_bounds,
    steps_per_epoch,
)

BLOCK_ORDER = 1    # the last seed word of the generator that orders a shard's blocks
SLOTS = 2          # windows held per shard: the one trained on and the next


@dataclass(frozen=True)
class StreamOrder:
    """The two numbers that, with the sampler's, fix the streamed order."""

    window_blocks: int   # blocks per window
    block_rows: int      # rows per block: the file's rows per chunk

    def to_dict(self):
        return {"window_blocks": self.window_blocks, "block_rows": self.block_rows}


def shard_blocks(start, stop, block_rows):
    """The blocks of rows ``[start, stop)``, cut at multiples of ``block_rows``: an ``(m, 2)``
    array of ``(start, stop)``."""
    cuts = np.arange((start // block_rows + 1) * block_rows, stop, block_rows, dtype=np.int64)
    edges = np.concatenate([[start], cuts, [stop]]).astype(np.int64)
    return np.stack([edges[:-1], edges[1:]], axis=1)


@dataclass(frozen=True)
class ShardWindows:
    """One shard's windows in one epoch: ``blocks[w]`` (``(m, 2)``, in file order) and ``cum``,
    where window ``w`` gives the shard's rows ``cum[w]`` to ``cum[w + 1] - 1`` of the epoch."""

    blocks: tuple
    cum: np.ndarray

    @property
    def count(self):
        return len(self.blocks)

    def window_of(self, index):
        """The window of each of the shard's epoch rows ``index`` (an array)."""
        return np.searchsorted(self.cum, index, side="right") - 1


def shard_windows(start, stop, order, seed, epoch, shard):
    """The windows of virtual shard ``shard`` (rows ``[start, stop)``) in ``epoch``."""
    blocks = shard_blocks(start, stop, order.block_rows)
    if len(blocks) > order.window_blocks:   # else one window of every block: no order to draw
        blocks = blocks[np.random.default_rng([seed, epoch, shard, BLOCK_ORDER])
                        .permutation(len(blocks))]
    width = order.window_blocks
    windows = tuple(blocks[np.argsort(blocks[at:at + width, 0]) + at]
                    for at in range(0, len(blocks), width))
    rows = [int((w[:, 1] - w[:, 0]).sum()) for w in windows]
    return ShardWindows(windows, np.concatenate([[0], np.cumsum(rows)]).astype(np.int64))


def window_rows(blocks):
    """The file rows of a window's blocks, in file order."""
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in blocks])


def shard_sequence(windows, seed, epoch, shard, file_rows=False):
    """For each of the shard's rows of the epoch, in order: its place in its window (whose rows are
    in file order), or with ``file_rows`` its row of the file."""
    rng = np.random.default_rng([seed, epoch, shard])   # the sampler's generator: see the docstring
    parts = []
    for blocks in windows.blocks:
        permutation = rng.permutation(int((blocks[:, 1] - blocks[:, 0]).sum()))
        parts.append(window_rows(blocks)[permutation] if file_rows else permutation)
    return np.concatenate(parts)


def min_window_blocks(n, global_batch, n_shards, block_rows):
    """The smallest window (in blocks) in which every step's rows of a shard lie in at most two
    consecutive windows, whatever the epoch's order of blocks.

    A step takes at most ``m = ceil(B / V)`` consecutive rows of a shard; a
    window between the first and the last of a shard's epoch must then hold at
    least ``m - 1`` rows. The fewest a window of ``W`` blocks can hold is the
    sum of the shard's ``W`` smallest blocks (its partial first and last ones
    among them). A shard of at most ``2W`` blocks has no window in between.
    """
    need = -(-global_batch // n_shards) - 1
    bounds = shard_bounds(n, n_shards)
    sizes = [np.sort(np.diff(shard_blocks(int(a), int(b), block_rows), axis=1).ravel())
             for a, b in zip(bounds[:-1], bounds[1:])]
    window = 1
    while not all(len(s) <= 2 * window or s[:window].sum() >= need for s in sizes):
        window += 1
    return window


class StreamLayout:
    """The streamed order of one rank: the sampler's arguments and a ``StreamOrder``."""

    def __init__(self, n, global_batch, rank, world_size, seed, n_shards, drop_last, order):
        check_layout(n, global_batch, world_size, n_shards)
        self.n, self.global_batch, self.rank, self.world_size = n, global_batch, rank, world_size
        self.seed, self.n_shards, self.drop_last, self.order = seed, n_shards, drop_last, order
        self.bounds = shard_bounds(n, n_shards)
        self.shards = owned_shards(rank, world_size, n_shards)
        self.n_used = min(steps_per_epoch(n, global_batch, drop_last) * global_batch, n)
        # rows of a window's slot: W blocks, or a whole shard if that is less
        self.capacity = min(order.window_blocks * order.block_rows, int(np.diff(self.bounds).max()))

    def windows(self, epoch, j):
        """The windows of this rank's ``j``-th shard in ``epoch``."""
        v = self.shards[j]
        return shard_windows(int(self.bounds[v]), int(self.bounds[v + 1]), self.order, self.seed,
                             epoch, v)

    def first_steps(self, windows, j):
        """The step at which each window of this rank's ``j``-th shard is first trained on; -1 for
        the windows no step reaches (past the last batch, with ``drop_last``)."""
        positions = windows.cum[:-1] * self.n_shards + self.shards[j]
        return np.where(positions < self.n_used, positions // self.global_batch, -1)

    def slot_start(self, j, window):
        """The first row of the buffer slot that holds window ``window`` of shard ``j``."""
        return (j * SLOTS + window % SLOTS) * self.capacity

    @property
    def buffer_rows(self):
        return len(self.shards) * SLOTS * self.capacity


def window_bytes(n, n_shards, world_size, order, row_bytes):
    """Bytes one rank holds for this order: two windows of each of its shards."""
    capacity = min(order.window_blocks * order.block_rows, -(-n // n_shards))
    return n_shards // world_size * SLOTS * capacity * row_bytes


class StreamedEpochPlan(StepSlices):
    """One rank's view of one streamed epoch, as ``sampler.EpochPlan`` gives it in memory.

    ``local_rows`` are rows of the rank's buffer (``StreamLayout.slot_start``);
    ``first_window[t, j]`` is the lowest window of its ``j``-th shard that step
    ``t`` or a later one trains on (row ``n_steps``: past the epoch), and
    ``last_window[t, j]`` the highest that step ``t`` trains on (-1: none);
    ``gives_back[t]``: whether a window is done with after step ``t``;
    ``reaches[t]``: whether step ``t`` needs a window no earlier step needed.
    """

    def __init__(self, layout, epoch):
        self.layout, self.epoch = layout, epoch
        lay, size = layout, layout.world_size
        n_local = len(range(lay.rank, lay.n_used, size))
        step_starts = np.arange(0, lay.n_used, lay.global_batch, dtype=np.int64)
        edges = np.append(step_starts, lay.n_used)
        self.step_bounds = np.clip(-(-(edges - lay.rank) // size), 0, n_local)
        self.global_counts = np.minimum(step_starts + lay.global_batch, lay.n_used) - step_starts
        self.global_batch = lay.global_batch
        n_owned = len(lay.shards)
        self.local_rows = np.empty(n_local, dtype=np.int64)
        self.first_window = np.empty((len(step_starts) + 1, n_owned), dtype=np.int64)
        self.last_window = np.empty((len(step_starts), n_owned), dtype=np.int64)
        self.windows = []
        for j in range(n_owned):
            # Position k = i * V + v of shard v's row i is this rank's local row (k - r) / P =
            # i * S + j, S the shards it owns: the shard's rows are every S-th local row.
            windows = lay.windows(epoch, j)
            self.windows.append(windows)
            offsets = shard_sequence(windows, lay.seed, epoch, lay.shards[j])
            count = len(self.local_rows[j::n_owned])
            which = windows.window_of(np.arange(count))
            self.local_rows[j::n_owned] = (offsets[:count]
                                           + (j * SLOTS + which % SLOTS) * lay.capacity)
            self._windows_of_steps(j, n_owned, windows, count)
        # The steps at which a window is given back, and those that need a window no earlier step
        # of the epoch needed: the stream has work at those only.
        self.gives_back = (self.first_window[1:] != self.first_window[:-1]).any(axis=1)
        reached = np.maximum.accumulate(self.last_window, axis=0)
        self.reaches = np.ones(len(self.last_window), dtype=bool)
        self.reaches[1:] = (self.last_window[1:] > reached[:-1]).any(axis=1)

    def _windows_of_steps(self, j, n_owned, windows, count):
        first = np.clip(-(-(self.step_bounds - j) // n_owned), 0, count)   # shard rows by step
        lowest = np.where(first < count, windows.window_of(first), windows.count)
        self.first_window[:, j] = lowest
        taken = first[1:] > first[:-1]
        self.last_window[:, j] = np.where(taken, windows.window_of(np.maximum(first[1:] - 1, 0)),
                                          -1)
        if np.any(taken & (self.last_window[:, j] - lowest[:-1] > 1)):
            raise AssertionError("a step spans more than two windows: the window is below "
                                 "min_window_blocks")

    def positions_in_batch(self, step):
        """Where this rank's rows of step ``step`` sit in its global batch (0 .. count - 1)."""
        lay = self.layout
        local = np.arange(self.step_bounds[step], self.step_bounds[step + 1], dtype=np.int64)
        return lay.rank + local * lay.world_size - step * self.global_batch

    @property
    def global_rows(self):
        """The file rows of ``local_rows`` (computed again: for tests and checks, not training)."""
        lay, n_owned = self.layout, len(self.layout.shards)
        rows = np.empty(len(self.local_rows), dtype=np.int64)
        for j, windows in enumerate(self.windows):
            file_rows = shard_sequence(windows, lay.seed, self.epoch, lay.shards[j], True)
            count = len(rows[j::n_owned])
            rows[j::n_owned] = file_rows[:count]
        return rows


def streamed_epoch_plan(n, global_batch, rank, world_size, seed, epoch, n_shards, drop_last,
                        order):
    """Plan one streamed epoch for one rank (see the module docstring)."""
    layout = StreamLayout(n, global_batch, rank, world_size, seed, n_shards, drop_last, order)
    return StreamedEpochPlan(layout, epoch)


def block_rows_for(image_shape, itemsize=1):
    """Rows per block where a file has no chunks to follow (in-memory arrays, contiguous data): as
    ``writer`` chunks a file, about 1 MiB of rows."""
    return min(ROWS_PER_CHUNK, max(1, CHUNK_BYTES // (math.prod(image_shape) * itemsize)))
