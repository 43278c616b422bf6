"""The ranks of a node share their parameters, and read each other's gradients, in the node's own
memory.

With an MPI Allreduce every rank copies its gradient into MPI's buffers and
the sum back out, and then applies the same update to its own copy of every
parameter: P copies of the same work. Ranks on one node already share the
machine's memory, so this exchange (``--exchange shared-memory``, the
default on one node, and on several nodes with the same number of ranks
each) lets them use it. On each node, for its L ranks:

1. the parameters live once, in an array of the node's shared memory, and
   each rank's gradient in its own slot of another one; backward writes it
   there, as it would into a private array;
2. after a barrier, the rank at place ``l`` on its node sums slice ``l`` of
   every slot into its own slot (its own values first, then the others in
   rank order): a reduce-scatter done by reading memory, nothing copied;
3. across nodes, that slice is summed with an Allreduce among the ranks at
   place ``l`` of every node (a hierarchical Allreduce), so that each node
   holds the gradient of the global mean loss there;
4. that rank updates slice ``l`` of the shared parameters with the optimiser
   state of that slice only (``sharding.ShardedOptimizer``: ZeRO-1 within
   the node, with 1/L of the state per rank);
5. after a second barrier every rank reads the new parameters: there is no
   allgather to do.

Each value gets the same arithmetic on the same numbers as with the
Allreduce, except the order in which more than two ranks' gradients are
added: the two exchanges agree to rounding (bitwise with two ranks, where
addition commutes). The gradient norm is the sum of the squares of node 0's
slices, in the step's totals Allreduce.

The benefit: rank 0 spends about half the time in the exchange that an
Allreduce takes, and updates 1/L of the parameters (docs/performance.md
has the figures). The cost: two barriers a step, so the ranks of a node move
in lockstep. ``exchange.NodeSharedMemory`` is the gradient exchange built on
this block.
"""

from __future__ import annotations

import os

import numpy as np

from ddptrain.errors import UserError

SHARED_MEMORY_FOLDER = "/dev/shm"   # where MPICH and Open MPI put shared windows on Linux
# of the shared memory a node's block needs, free before it is made
HEADROOM = 1.25


class NodeMemory:
    """One node's block of shared memory: the parameters once, and a gradient slot for each of its
    ranks.

    ``node``: the ranks of this node (this rank's place on it is ``node.rank``); ``across``: the
    ranks at the same place on every node.
    """

    def __init__(self, comm, n_params, dtype):
        node, across = comm.split_by_node()
        self.node, self.across = node, across
        count = (node.size + 1) * n_params
        try:
            self._block = node.allocate_shared(count, dtype)
        except Exception as error:   # noqa: BLE001 - the MPI library's, whatever its type: one line, not a traceback
            amount = amount_text(count * np.dtype(dtype).itemsize)
            raise UserError(f"--exchange shared-memory: could not get {amount} of shared memory on "
                            f"this node ({type(error).__name__}: {error}); use --exchange "
                            "allreduce") from error
        block = self._block.array.reshape(node.size + 1, n_params)
        self.params, self.slots = block[0], block[1:]
        self.grads = self.slots[node.rank]   # this rank's slot: its model's gradient, once placed

    def place(self, model):
        """Put ``model``'s parameters (the same on every rank) and gradient into the shared
        memory."""
        if self.node.rank == 0:
            self.params[...] = model.params
        self._block.sync()
        model.use_arrays(params=self.params, grads=self.grads)

    def release(self, model):
        """Give ``model`` private copies of its parameters and gradient, and the shared memory back
        (a collective): a model trained through ``ddptrain.train`` outlives the run."""
        model.use_arrays(params=self.params.copy(), grads=self.grads.copy())
        self._block.sync()   # nobody frees what another rank is still copying
        self._block.free()
        self.node.free()
        self.across.free()
        self.params = self.slots = self.grads = None

    def reduce_scatter_(self, grads, bounds):
        """Sum every rank's gradient into this rank's slice of its own slot (``grads``); returns the
        slice."""
        self._check_slot(grads)
        place = self.node.rank
        lo, hi = bounds[place], bounds[place + 1]
        self._block.sync()   # every rank's gradient is complete
        mine = grads[lo:hi]
        for rank, slot in enumerate(self.slots):
            if rank != place:
                mine += slot[lo:hi]
        if self.across.size > 1:
            self.across.allreduce_(mine)   # DDP: the same slice of the other nodes
        return mine

    def gather_gradient_(self, grads, bounds):
        """The other slots' reduced slices copied into this rank's slot (``grads``), for hooks that
        read all of the gradient (``--debug``)."""
        self._check_slot(grads)
        self._block.sync()
        for rank, slot in enumerate(self.slots):
            if rank != self.node.rank:
                grads[bounds[rank]:bounds[rank + 1]] = slot[bounds[rank]:bounds[rank + 1]]
        self._block.sync()   # no slice changes (clipping) before every rank has copied it

    def sync(self):
        """A barrier of the node's ranks: after it, every rank's writes to the block are seen by
        all."""
        self._block.sync()

    def _check_slot(self, grads):
        if grads is not self.grads:
            raise ValueError("the model's gradient must be in its slot of the node's memory "
                             "(place first)")


def shared_memory_free():
    """Bytes free for new shared memory on this node (None where unknown)."""
    try:
        stats = os.statvfs(SHARED_MEMORY_FOLDER)
    except (OSError, AttributeError):
        return None
    return stats.f_bavail * stats.f_frsize


def has_room_for(size):
    """Whether this node's shared memory has ``size`` bytes free, with ``HEADROOM`` to spare (a full
    /dev/shm kills a rank with SIGBUS when it touches the pages, not an error); True if unknown."""
    free = shared_memory_free()
    return free is None or free >= HEADROOM * size


def amount_text(size):
    """``size`` bytes as MiB, or KiB below one MiB."""
    return f"{size / 2 ** 20:.1f} MiB" if size >= 2 ** 20 else f"{size / 2 ** 10:.0f} KiB"
