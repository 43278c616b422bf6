"""The gradient exchange: how the ranks' shares of the gradient become the gradient of the global
mean loss, and how each rank's update reaches every rank's parameters.

One interface, four variants (PyTorch DDP's communication hooks play the same part):

=====================  ============================  ==========================  ================
variant                chosen by                     the reduction               who updates what
=====================  ============================  ==========================  ================
``Allreduce``          one rank per node,            one Allreduce of the whole  every rank, all
                       ``--exchange allreduce``      gradient                    the parameters
``BucketedAllreduce``  ``--overlap-allreduce``       an Allreduce per bucket,    every rank, all
                                                     started during backward
``ReduceScatter``      ``--shard-optimizer``         a reduce-scatter; the       each rank its
                                                     slices are allgathered      slice (ZeRO-1)
``NodeSharedMemory``   several ranks on a node       the node's slots summed in  each rank its
                       (the default there)           shared memory, then across  slice of the
                                                     nodes by MPI                shared parameters
=====================  ============================  ==========================  ================

``TrainStep`` (``training/step.py``) calls the same methods whatever the
variant: ``during_backward`` around the backward pass, ``reduce_``, then
``owned`` (the part of the gradient this rank updates), ``norm_share`` and
``global_norm`` (the gradient's 2-norm, the same on every rank), the optimiser
on the owned part, and ``publish_``; with ``--reproducible``, ``gatherer``
(how the batch's rows and the products' columns reach every rank:
``gather.py``, through the node's memory where this exchange sums there).
``make_exchange`` picks the variant; the runner and the benchmark both call
it.
"""

from __future__ import annotations

import contextlib

import numpy as np

from ddptrain.distributed.gather import MessageGather, NodeGather
from ddptrain.distributed.node_memory import (
    HEADROOM,
    SHARED_MEMORY_FOLDER,
    NodeMemory,
    has_room_for,
)
from ddptrain.distributed.overlap import GradientBuckets
from ddptrain.distributed.sharding import NORM_CHUNK, ShardedOptimizer, shard_bounds
from ddptrain.errors import UserError


class Allreduce:
    """One Allreduce of the whole gradient: every rank holds all of it and updates every parameter.

    The base of the other variants: what it does not override is this.
    """

    def __init__(self, comm, why=None, align=1):
        self.comm = comm   # the world: the step's totals are summed over it too
        # why not the default exchange, for the start-up line (None: no reason to give)
        self.why = why
        # where the ranks' slices of the gradient may start (shard_bounds): NORM_CHUNK with
        # --reproducible
        self.align = align
        self._gatherer = None

    def gatherer(self):
        """How ``--reproducible`` brings every rank's rows and columns to every rank
        (``gather.py``), made once: with MPI here."""
        if self._gatherer is None:
            self._gatherer = self._make_gatherer()
        return self._gatherer

    def _make_gatherer(self):
        return MessageGather(self.comm)

    def sharded_optimizer(self, optimizer):
        """The optimiser as this exchange runs it: as it is, or (sharded) over this rank's slice."""
        return optimizer

    def attach(self, model):
        """Called once the parameters are final on every rank (restored or broadcast), before
        training."""

    def detach(self, model):
        """Called after training (a collective): the model keeps arrays of its own."""
        self._close_gatherer()

    def _close_gatherer(self):
        if self._gatherer is not None:
            self._gatherer.close()
            self._gatherer = None

    def during_backward(self, model):
        """A context manager around the step's backward pass (where reducing may start early)."""
        return contextlib.nullcontext()

    def reduce_(self, grads):
        """Sum the ranks' shares of ``grads`` in place (at least over the part this rank
        updates)."""
        # DDP: sum of the shares = gradient of the global mean, once a step
        self.comm.allreduce_(grads)

    def gather_gradient_(self, grads):
        """Make all of the reduced gradient visible in ``grads`` (for hooks that read it:
        ``--debug``)."""

    def owned(self, array):
        """The part of a flat array (the gradient, the parameters) that this rank updates."""
        return array

    def norm_share(self, squares):
        """This rank's addend to the squared gradient norm, summed with the step's totals;
        ``squares`` is the squared norm of ``owned(grads)``. Unsharded, every rank computes the norm
        itself: 0."""
        return 0.0

    def counted_range(self, n):
        """The values ``[start, stop)`` of the reduced flat gradient (``n`` values) whose squares
        this rank adds to ``--reproducible``'s norm: values it holds reduced, which no other rank
        counts, starting at a multiple of ``align``. Every rank holds all of them here: an even
        share each."""
        bounds = shard_bounds(n, self.comm.size, self.align)
        return bounds[self.comm.rank], bounds[self.comm.rank + 1]

    def global_norm(self, squares, summed):
        """The gradient's 2-norm, the same on every rank, from ``squares`` (this rank's owned part)
        or ``summed`` (the norm shares summed over the ranks)."""
        return float(np.sqrt(squares))   # every rank holds the whole reduced gradient

    def publish_(self, params):
        """After the update: every rank's updated part of ``params`` reaches every rank."""

    def describe(self):
        """The start-up line."""
        return f"gradients: MPI Allreduce{self._why_text()}"

    def _why_text(self):
        return f" ({self.why})" if self.why else ""


class BucketedAllreduce(Allreduce):
    """``--overlap-allreduce``: the gradient reduced in buckets, each started as soon as backward
    has filled it (``overlap.GradientBuckets``), and all of them waited for before the update."""

    def __init__(self, comm, model, bucket_bytes, why=None, align=1):
        super().__init__(comm, why, align)
        self.buckets = GradientBuckets(model, comm, bucket_bytes)

    def during_backward(self, model):
        # DDP: each bucket's Allreduce starts as soon as backward has filled it
        return self.buckets

    def reduce_(self, grads):
        self.buckets.finish()

    def describe(self):
        return f"gradients: MPI Allreduce in buckets during backward{self._why_text()}"


class ReduceScatter(Allreduce):
    """``--shard-optimizer`` (ZeRO-1, ``sharding.py``): a reduce-scatter gives each rank the sum of
    its slice of the gradient, each rank updates that slice with its slice of the optimiser state,
    and an allgather brings every rank's slice of the parameters to every rank."""

    def __init__(self, comm, n_params, why=None, sharers=None, align=1):
        """``sharers``: the ranks that split the parameters into slices and share the optimiser
        state (default: ``comm``, every rank)."""
        super().__init__(comm, why, align)
        self.sharers = comm if sharers is None else sharers
        self.bounds = shard_bounds(n_params, self.sharers.size, align)
        self.slice = slice(self.bounds[self.sharers.rank], self.bounds[self.sharers.rank + 1])
        self.n_params = n_params

    def sharded_optimizer(self, optimizer):
        return ShardedOptimizer(optimizer, self.sharers, self.n_params, self.bounds)

    def counted_range(self, n):
        return self.slice.start, self.slice.stop   # its slice alone is reduced on this rank

    def reduce_(self, grads):
        # DDP: each rank receives the sum of its slice only
        self.comm.reduce_scatter_(grads, self.bounds)

    def gather_gradient_(self, grads):
        self.comm.allgather_(grads, self.bounds)

    def owned(self, array):
        return array[self.slice]

    def norm_share(self, squares):
        return float(squares)   # the squares of the ranks' slices add up to the whole gradient's

    def global_norm(self, squares, summed):
        return float(np.sqrt(summed))

    def publish_(self, params):
        self.comm.allgather_(params, self.bounds)   # DDP: every rank's updated slice, everywhere

    def describe(self):
        return f"gradients: MPI Allreduce, optimiser state sharded{self._why_text()}"


class NodeSharedMemory(ReduceScatter):
    """The ranks of a node share one copy of the parameters and read each other's gradients in the
    node's memory (``node_memory.py``): each sums and updates its slice there, with an Allreduce of
    that slice across nodes; publishing the parameters is a barrier."""

    def __init__(self, comm, model, align=1):
        self.memory = NodeMemory(comm, model.params.size, model.dtype)
        # the node's ranks split the parameters and the optimiser state
        super().__init__(comm, model.params.size, sharers=self.memory.node, align=align)
        # Every node holds the same reduced gradient: node 0's slices alone add up to its norm.
        self._counts_in_norm = self.memory.across.rank == 0

    def attach(self, model):
        self.memory.place(model)   # the parameters every rank holds, shared from now on

    def _make_gatherer(self):
        # the rows and columns through the node's memory too, where one node holds every rank
        if self.memory.across.size == 1:
            return NodeGather(self.memory.node)
        return MessageGather(self.comm)

    def detach(self, model):
        self._close_gatherer()
        self.memory.release(model)

    def reduce_(self, grads):
        # DDP: the node's slots, then the other nodes
        self.memory.reduce_scatter_(grads, self.bounds)

    def gather_gradient_(self, grads):
        self.memory.gather_gradient_(grads, self.bounds)

    def norm_share(self, squares):
        return float(squares) if self._counts_in_norm else 0.0

    def counted_range(self, n):
        return (self.slice.start, self.slice.stop) if self._counts_in_norm else (0, 0)

    def publish_(self, params):
        self.memory.sync()   # each rank wrote its slice of the shared parameters in place

    def describe(self):
        node, nodes = self.memory.node, self.memory.across.size
        where = ("each of the " + str(nodes) + " nodes, then across nodes by MPI" if nodes > 1
                 else "this node")
        return (f"gradients: summed in shared memory by the {node.size} ranks of {where}"
                f"; each rank updates 1/{node.size} of the shared parameters")


def choose_node_memory(comm, config, n_params):
    """``(use_node_memory, why)``: whether the gradient goes through the nodes' shared memory, the
    same verdict on every rank, and the reason when it does not. A collective."""
    asked = config.exchange
    if asked == "allreduce" or comm.size == 1:
        return False, "asked for" if asked == "allreduce" else "one rank"
    conflict = config.option_exchanging_through_mpi
    if conflict:   # config.validated refused them with --exchange shared-memory
        return False, f"{conflict} exchanges through MPI"
    node, across = comm.split_by_node()
    node_size = node.size
    # NodeMemory makes its own; a run that leaked two communicators would, in a process that
    # trains a thousand times (ddptrain.train in a loop), run out of MPI's contexts
    node.free()
    across.free()
    itemsize = np.dtype(config.dtype).itemsize
    needed = (node_size + 1) * n_params * itemsize
    fits = has_room_for(needed)
    layouts = comm.allgather((node_size, fits))
    if all(size == 1 for size, _ in layouts):
        # nothing to share: a node-level block would only add a copy
        return False, "one rank per node"
    if len({size for size, _ in layouts}) > 1:
        why = f"the nodes hold different numbers of ranks ({', '.join(str(s) for s, _ in layouts)})"
    elif not all(fit for _, fit in layouts):
        why = (f"{SHARED_MEMORY_FOLDER} has less than {HEADROOM * needed / 2 ** 20:.0f} MiB free "
               f"on some node (the parameters and {node_size} gradients)")
    else:
        return True, None
    if asked == "shared-memory":
        raise UserError(f"--exchange shared-memory: {why}; use --exchange allreduce")
    return False, why


def make_exchange(comm, config, model):
    """The gradient exchange that ``config`` asks for, for ``model`` on the ranks of ``comm``. A
    collective (the node-memory variant allocates the node's shared block)."""
    use_node_memory, why_not = choose_node_memory(comm, config, model.params.size)
    # --reproducible: each rank squares whole chunks of the gradient for the norm (counted_range)
    align = NORM_CHUNK if config.reproducible else 1
    if use_node_memory:
        return NodeSharedMemory(comm, model, align)
    # said only where the default was not taken
    why = why_not if config.exchange == "auto" else None
    if config.shard_optimizer:
        return ReduceScatter(comm, model.params.size, why, align=align)
    if config.overlap_allreduce:
        return BucketedAllreduce(comm, model, int(config.bucket_mb * 2 ** 20), why, align)
    return Allreduce(comm, why, align)
