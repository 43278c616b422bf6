"""The ranks of a node share their parameters, and read each other's gradients, in the node's own memory.

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

What it saves, 2 ranks on 2 cores of an Intel Xeon (AVX-512), the default
MLP (2.1 MB of gradient), batch 128: rank 0 spends 0.20 ms in the exchange
(its half of the sum, and waiting for the other rank) against 0.43 ms in the
Allreduce, and updates half the parameters; the benchmark's step rate is
1.15x the Allreduce's (1.08x at batch 512, where the products dominate).
The cost: two barriers a step, so the ranks of a node move in lockstep.
"""

from __future__ import annotations

import os

import numpy as np

from .errors import UserError

SHARED_MEMORY_FOLDER = "/dev/shm"   # where MPICH and Open MPI put shared windows on Linux
HEADROOM = 1.25                     # of the shared memory a node's block needs, free before it is made


class NodeMemory:
    """The communicator a ``ShardedOptimizer`` works through when the ranks of a node share memory: its
    ``rank`` and ``size`` are this rank's place on its node and the node's rank count."""

    def __init__(self, comm, n_params, dtype):
        node, across = comm.split_by_node()
        self.node, self.across = node, across
        self.rank, self.size = node.rank, node.size
        # Every node holds the same reduced gradient: node 0's slices alone add up to its norm.
        self.counts_in_norm = across.rank == 0
        count = (node.size + 1) * n_params
        try:
            self._block = node.allocate_shared(count, dtype)
        except Exception as error:   # noqa: BLE001 - the MPI library's, whatever its type: one line, not a traceback
            size = count * np.dtype(dtype).itemsize
            amount = f"{size / 2 ** 20:.1f} MiB" if size >= 2 ** 20 else f"{size / 2 ** 10:.0f} KiB"
            raise UserError(f"--exchange shared-memory: could not get {amount} of shared memory on this node "
                            f"({type(error).__name__}: {error}); use --exchange allreduce") from error
        block = self._block.array.reshape(node.size + 1, n_params)
        self.params, self.slots = block[0], block[1:]
        self.grads = self.slots[self.rank]   # this rank's slot: its model's gradient, once placed

    def place(self, model):
        """Put ``model``'s parameters (the same on every rank) and gradient into the shared memory."""
        if self.rank == 0:
            self.params[...] = model.params
        self._block.sync()
        model.use_arrays(params=self.params, grads=self.grads)

    def release(self, model):
        """Give ``model`` private copies of its parameters and gradient, and the shared memory back (a
        collective): a model trained through ``ddptrain.train`` outlives the run."""
        model.use_arrays(params=self.params.copy(), grads=self.grads.copy())
        self._block.sync()   # nobody frees what another rank is still copying
        self._block.free()
        self.node.free()
        self.across.free()
        self.params = self.slots = self.grads = None

    def reduce_scatter_(self, grads, bounds):
        """Sum every rank's gradient into this rank's slice of its own slot (``grads``); returns the slice."""
        self._check_slot(grads)
        lo, hi = bounds[self.rank], bounds[self.rank + 1]
        self._block.sync()   # every rank's gradient is complete
        mine = grads[lo:hi]
        for rank, slot in enumerate(self.slots):
            if rank != self.rank:
                mine += slot[lo:hi]
        if self.across.size > 1:
            self.across.allreduce_(mine)   # DDP: the same slice of the other nodes
        return mine

    def allgather_(self, array, bounds):
        """Every rank's slice of ``array`` in this rank's ``array``: for the shared parameters, a barrier
        (each rank wrote its slice in place); for the gradient (``--debug``'s hooks), the other slots'
        slices copied in; anything else (the optimiser state, for a checkpoint) through the node's MPI."""
        if array is self.params:
            self._block.sync()
            return array
        if array is self.grads:
            self._block.sync()
            for rank, slot in enumerate(self.slots):
                if rank != self.rank:
                    array[bounds[rank]:bounds[rank + 1]] = slot[bounds[rank]:bounds[rank + 1]]
            self._block.sync()   # no slice changes (clipping) before every rank has copied it
            return array
        return self.node.allgather_(array, bounds)

    def _check_slot(self, grads):
        if grads is not self.grads:
            raise ValueError("reduce_scatter_ sums the model's gradient, which must be in its slot (place first)")


def shared_memory_free():
    """Bytes free for new shared memory on this node (None where unknown)."""
    try:
        stats = os.statvfs(SHARED_MEMORY_FOLDER)
    except (OSError, AttributeError):
        return None
    return stats.f_bavail * stats.f_frsize


def choose_exchange(comm, config, n_params):
    """``(use_node_memory, why)``: whether the gradient goes through the nodes' shared memory, the same
    verdict on every rank, and the reason when it does not. A collective."""
    asked = config.exchange
    if asked == "allreduce" or comm.size == 1:
        return False, "asked for" if asked == "allreduce" else "one rank"
    conflict = config.option_exchanging_through_mpi
    if conflict:   # config.validated refused them with --exchange shared-memory
        return False, f"{conflict} exchanges through MPI"
    node, across = comm.split_by_node()
    node_size = node.size
    node.free()     # NodeMemory makes its own; a run that leaked two communicators would, in a process that
    across.free()   # trains a thousand times (ddptrain.train in a loop), run out of MPI's contexts
    itemsize = np.dtype(config.dtype).itemsize
    needed = (node_size + 1) * n_params * itemsize
    free = shared_memory_free()
    fits = free is None or free >= HEADROOM * needed
    layouts = comm.allgather((node_size, fits))
    if all(size == 1 for size, _ in layouts):
        return False, "one rank per node"   # nothing to share: a node-level block would only add a copy
    if len({size for size, _ in layouts}) > 1:
        why = f"the nodes hold different numbers of ranks ({', '.join(str(s) for s, _ in layouts)})"
    elif not all(fit for _, fit in layouts):
        why = (f"{SHARED_MEMORY_FOLDER} has less than {HEADROOM * needed / 2 ** 20:.0f} MiB free on some node "
               f"(the parameters and {node_size} gradients)")
    else:
        return True, None
    if asked == "shared-memory":
        raise UserError(f"--exchange shared-memory: {why}; use --exchange allreduce")
    return False, why
