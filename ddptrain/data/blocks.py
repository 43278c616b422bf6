"""Rows a block at a time: how a data file is written from sets larger than memory.

A *source of rows* has ``shape`` (all its rows: ``(N, ...)``), ``dtype``, and
``blocks(rows)``, which yields its rows in order, ``rows`` at a time (the last
block fewer). A block is used before the next one is asked for, so a source
may fill the same buffer again. ``ArrayRows`` is the source of arrays given in
pieces: in memory, or memory maps (``np.load(f, mmap_mode="r")``, ``np.memmap``),
which are read a block at a time and never whole, or files opened only while
they are read (``npy.NpyChunk``). ``idx.IdxFile`` is the source of an IDX
file. ``writer.write_sources`` writes a data file from them.
"""

from __future__ import annotations

import math
import mmap

import numpy as np

# About what a block of rows takes, read, hashed and written at a time: a conversion's memory.
BLOCK_BYTES = 16 * 2 ** 20


def block_rows(shape, itemsize, multiple=1):
    """Rows per block of a source of ``shape``: about ``BLOCK_BYTES`` of values of ``itemsize``,
    a multiple of ``multiple`` (the rows of a chunk of the file: a block writes whole chunks), at
    least one."""
    row_bytes = max(1, math.prod(shape[1:]) * itemsize)
    rows = BLOCK_BYTES // row_bytes // multiple * multiple
    return max(multiple, rows)


class ArrayRows:
    """The rows of arrays given in pieces (chunks of a split), as one source of rows.

    A piece is an array, or an object with ``shape``, ``dtype`` and ``open()``
    (which gives the array: ``npy.NpyChunk``), opened when its rows are read
    and let go after, so that a folder of thousands of memory-mapped chunks
    does not hold thousands of files open. A block that lies within one piece
    is a view of it, not a copy; one that spans pieces is joined from them.
    The pages of a read-only memory map are let go once read (``release``): a
    set larger than memory is read once, and never resides in this process's
    memory whole.
    """

    def __init__(self, pieces):
        self.pieces = list(pieces)
        self.shape = (sum(len(piece) for piece in self.pieces), *self.pieces[0].shape[1:])
        self.dtype = np.result_type(*(piece.dtype for piece in self.pieces))

    def blocks(self, rows):
        joined, have = None, 0   # a block that spans pieces, filled as they come
        for piece in self.pieces:
            piece = piece.open() if hasattr(piece, "open") else piece
            start = 0
            while start < len(piece):
                if not have and len(piece) - start >= rows:
                    yield piece[start:start + rows]
                    release(piece[start:start + rows])
                    start += rows
                    continue
                if joined is None:
                    joined = np.empty((rows, *self.shape[1:]), self.dtype)
                take = min(rows - have, len(piece) - start)
                joined[have:have + take] = piece[start:start + take]
                release(piece[start:start + take])
                have, start = have + take, start + take
                if have == rows:
                    yield joined
                    have = 0
        if have:
            yield joined[:have]


def release(view):
    """Let go of the pages of a read-only memory map that ``view`` was read from.

    Pages of a file mapped in memory and read stay in the process's memory
    (its resident set) until it unmaps them; those of a read-only map are
    copies of the file, which the kernel reads again should they be needed,
    so dropping them once a block is written (``MADV_DONTNEED``) costs
    nothing. Anything else (an array in memory, a map that may be written) is
    left as it is.
    """
    owner = view
    while not isinstance(owner, np.memmap) and isinstance(owner.base, np.ndarray):
        owner = owner.base
    mapping = getattr(owner, "_mmap", None)   # np.memmap's mmap.mmap
    if (not isinstance(owner, np.memmap) or owner.mode != "r" or mapping is None
            or view.size == 0 or not hasattr(mmap, "MADV_DONTNEED")):
        return
    low, high = np.lib.array_utils.byte_bounds(view)
    mapped = np.frombuffer(mapping, np.uint8).__array_interface__["data"][0]
    start, end = low - mapped, high - mapped
    if start < 0 or end > len(mapping):
        return
    start -= start % mmap.PAGESIZE   # madvise takes whole pages, from a page's start
    mapping.madvise(mmap.MADV_DONTNEED, start, end - start)


def value_range(source, below=None):
    """``(smallest, largest, first)`` of the values of a source of rows (labels), read a block at
    a time; ``first``: the first value, in order, that is not below ``below`` (None: none, or no
    ``below``)."""
    smallest = largest = first = None
    for block in source.blocks(block_rows(source.shape, np.dtype(source.dtype).itemsize)):
        low, high = int(block.min()), int(block.max())
        smallest = low if smallest is None else min(smallest, low)
        largest = high if largest is None else max(largest, high)
        if below is not None and first is None and high >= below:
            first = int(block[np.argmax(block >= below)])
    return smallest, largest, first
