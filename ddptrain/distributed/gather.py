"""Every rank's part of a flat array, on every rank: what ``--reproducible`` moves each step (the
rows of the global batch, each rank's columns of a product).

Two ways behind one interface: a caller asks for a ``buffer``, writes its
rank's part into it, and calls ``allgather_``; after that the buffer holds
every rank's part on every rank.

* ``MessageGather``: the buffer is the rank's own, and one MPI allgather
  copies every part to every rank.
* ``NodeGather`` (every rank on one node): the buffer lies in the node's
  shared memory, the same pages on every rank, so each rank writes its part
  where all the others read it, and a barrier is all the gathering there is.
  Nothing is copied, and the ranks meet once, as in the allgather.

The gradient exchange picks the way (``exchange.gatherer``): the node's memory
wherever it sums the gradient there (on one node). Measured on 2 ranks of
2 cores, docs/reproducible.md.
"""

from __future__ import annotations

import numpy as np

from ddptrain.distributed import node_memory
from ddptrain.errors import UserError
from ddptrain.nn.layer import Scratch


class MessageGather:
    """Through MPI: each rank's part into a buffer of its own, then one allgather."""

    shared = False   # each rank has a buffer of its own: its part goes where ``bounds`` say

    def __init__(self, comm):
        self.comm, self.rank, self.size = comm, comm.rank, comm.size
        self._scratch = Scratch()

    def buffer(self, name, size, dtype):
        """A flat array of ``size`` values of ``dtype`` for the parts of a gather named ``name``;
        what it holds stays until the call after next for that name."""
        return self._scratch.get(name, (size,), dtype)

    def allgather_(self, array, bounds):
        """``array[bounds[r]:bounds[r + 1]]``, written by rank ``r``, on every rank, for every
        ``r``. A collective."""
        self.comm.allgather_(array, bounds)

    def close(self):
        self._scratch = Scratch()


class NodeGather:
    """Through the shared memory of one node that holds every rank (``node``: their communicator):
    each rank writes its part into the same buffer, and a barrier gathers.

    Each name has two buffers, used in turn: a rank that has passed one
    gather writes the next one's part into the other buffer, while a slower
    rank may still be reading the last one's (it is done with it before it
    reaches the next barrier). The buffers are made, and made larger, on
    every rank at once: every rank asks for the same sizes in the same order
    (they are the global batch's).
    """

    shared = True   # one buffer: a rank may write anywhere in it (its rows at their positions)

    def __init__(self, node):
        self.node, self.rank, self.size = node, node.rank, node.size
        self._blocks = {}   # (name, 0 | 1) -> the SharedBlock
        self._calls = {}    # name -> the buffers asked for so far
        self._last = None   # the block of the last buffer asked for

    def buffer(self, name, size, dtype):
        """As ``MessageGather.buffer``; a collective (its block may be made)."""
        calls = self._calls.get(name, 0)
        self._calls[name] = calls + 1
        key = (name, calls % 2)
        block = self._blocks.get(key)
        if block is None or block.array.size < size or block.array.dtype != dtype:
            if block is not None:
                block.free()
            self._blocks[key] = block = self._allocate(size, dtype)
        self._last = block
        return block.array[:size]

    def allgather_(self, array, bounds):
        """As ``MessageGather.allgather_``, ``array`` the last buffer asked for: every rank has
        written its part there, wherever it goes (``bounds`` are not needed). A collective."""
        if self._last is None or not np.shares_memory(array, self._last.array):
            raise ValueError("NodeGather gathers the last buffer it gave")
        self._last.sync()   # DDP: every rank's part written, and seen by all

    def close(self):
        """Give the node's memory back (a collective)."""
        for block in self._blocks.values():
            block.free()
        self._blocks.clear()
        self._last = None

    def _allocate(self, size, dtype):
        size = max(int(size), 1)
        need = size * np.dtype(dtype).itemsize
        # checked before MPI maps the pages, and every rank of the node refuses together (or none)
        if self.node.allreduce(int(not node_memory.has_room_for(need))):
            raise UserError(f"--reproducible: {node_memory.SHARED_MEMORY_FOLDER} has less than "
                            f"{node_memory.amount_text(node_memory.HEADROOM * need)} free on this "
                            "node for its buffers of rows and columns; free some, or use "
                            "--exchange allreduce")
        try:
            return self.node.allocate_shared(size, dtype)
        except Exception as error:   # noqa: BLE001 - the MPI library's, whatever its type: one line
            raise UserError(f"--reproducible: could not get {node_memory.amount_text(need)} of "
                            f"shared memory on this node ({type(error).__name__}: {error}); use "
                            "--exchange allreduce") from error
