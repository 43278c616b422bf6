"""Optimiser state sharded across the ranks (ZeRO stage 1, PyTorch's ``ZeroRedundancyOptimizer``).

Unsharded, every rank holds the whole optimiser state (SGD's momentum, Adam's
two moments: one or two copies of the parameters) and every rank computes the
same update of every parameter. Sharded (``--shard-optimizer``), the flat
parameter array is cut into P consecutive slices, ``bounds[r]:bounds[r + 1]``
for rank r (uneven by at most one value when P does not divide the count), and:

1. the gradient is **reduce-scattered**: each rank receives the sum over the
   ranks of its own slice only (the gradient of the global mean loss there);
2. each rank updates its slice of the parameters with the optimiser state of
   that slice, which is all the state it keeps (1/P of it): ``ShardedOptimizer``;
3. the parameters are **allgathered**: every rank gets every rank's slice.

Steps 1 and 3 are the gradient exchange's (``exchange.ReduceScatter``, or
``exchange.NodeSharedMemory`` where a node's ranks share the parameters).

Every rank ends the step with the same parameters as the unsharded path. The
update of each value is the same arithmetic on the same numbers, but the
reduce-scatter may sum the ranks' gradients in another order than the
Allreduce does, so the two paths agree to rounding, not bitwise (with one
rank, where nothing is summed, they are bitwise equal).

A checkpoint holds the whole state, in the unsharded format: ``state_dict``
gathers every rank's slice (a collective), and ``load_state_dict`` keeps this
rank's slice of a whole state. So a sharded run resumes on any number of
ranks, sharded or not, and an unsharded checkpoint resumes sharded.
"""

from __future__ import annotations

import numpy as np

# --reproducible's gradient norm squares the flat gradient in fixed chunks of this many values
# (training/reproducible.py); a rank's slice of the gradient is then whole chunks (shard_bounds'
# align), which the rank squares itself.
NORM_CHUNK = 1 << 16


def shard_bounds(n, size, align=1):
    """Where each of ``size`` ranks' slices of ``n`` values starts, and the end: ``size + 1``
    offsets, as even as ``align`` allows (every slice starts at a multiple of it; a slice may be
    empty)."""
    return [n * rank // size // align * align for rank in range(size)] + [n]


class ShardedOptimizer:
    """``optimizer`` applied to this rank's slice of the parameters; see the module docstring."""

    def __init__(self, optimizer, comm, n_params, bounds=None):
        """``comm``: the ranks that share the state (the world, or a node's ranks); it gathers the
        state for a checkpoint. ``bounds``: the exchange's slices (``shard_bounds``)."""
        self.optimizer, self.comm = optimizer, comm
        self.bounds = shard_bounds(n_params, comm.size) if bounds is None else bounds
        self.slice = slice(self.bounds[comm.rank], self.bounds[comm.rank + 1])
        self.n_params = n_params

    @property
    def name(self):
        """The optimiser's name in checkpoints: the inner one's (a sharded checkpoint is an
        unsharded one)."""
        return type(self.optimizer).__name__

    @property
    def steps(self):
        return self.optimizer.steps

    def step(self, params, grads, lr):
        """Update this rank's slice of ``params`` from its slice of ``grads`` (which must hold the
        reduced gradient there); the exchange publishes it to the other ranks. Also with an empty
        slice: every rank's optimiser counts the same steps."""
        self.optimizer.step(params[self.slice], grads[self.slice], lr)

    def state_dict(self):
        """The whole state, as the unsharded optimiser would hold it: every rank's slices gathered
        (a collective)."""
        state = self.optimizer.state_dict()
        whole = {}
        for name in sorted(state):   # the same order on every rank
            value = state[name]
            if isinstance(value, np.ndarray):
                gathered = np.zeros(self.n_params, dtype=value.dtype)
                gathered[self.slice] = value
                value = self.comm.allgather_(gathered, self.bounds)
            whole[name] = value
        return whole

    def load_state_dict(self, state):
        """Keep this rank's slice of a whole state (from a checkpoint, sharded or not, of any rank
        count)."""
        self.optimizer.load_state_dict({name: value[self.slice] if isinstance(value, np.ndarray)
                                        else value for name, value in state.items()})
