"""One data-parallel training step: the unit that the trainer, ``--debug`` and the benchmark all run.

Follow one step (``TrainStep.__call__``): this rank's rows of the global
batch (gathered by ``Batches``) go forward through the model; the loss is
normalised by the *global* batch size, so this rank's gradient is its share
of the gradient of the global mean loss; backward fills the flat gradient;
one reduction sums the shares, which gives exactly that gradient however
unevenly the batch was split; a second, five-number Allreduce adds up the
step's loss, correct predictions and samples, whether any rank was asked to
stop and (sharded) the squares of the gradient's slices; a NaN or Inf stops
everything before the update; the gradient is clipped to a global norm if
asked; and the optimiser updates the parameters.

With several ranks on a node (the default exchange) the reduction is
sharded: each rank receives the sum of its slice of the gradient and
updates that slice of the parameters (``sharding.ShardedOptimizer``),
through the node's shared memory (``node_memory.py``), where the ranks
share the parameters and nothing is gathered; with ``--shard-optimizer``
it is sharded through MPI's reduce-scatter and allgather; otherwise (one
rank per node, ``--exchange allreduce``) one Allreduce gives every rank the
whole gradient. With ``--accumulate K``
the rows go forward and backward K micro-batches at a time before the one
reduction. Lines that exist only because training is distributed are tagged
``# DDP:``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import gemm
from .data import PIXEL_MAX
from .dropout import BatchContext
from .errors import NumericalError
from .overlap import GradientBuckets
from .sharding import ShardedOptimizer


@dataclass
class Split:
    """The rows of one split (train or test) that this rank holds in memory.

    A data file's images stay as their uint8 pixels, a quarter of the memory
    of float32 (and of the memory traffic of gathering a batch), and become
    the model's floats, pixel/255, as rows are taken (``as_input``): the
    operation ``data.read_rows`` would have applied at load, so the same
    values. Floating-point images (in-memory arrays) are kept as given.
    """

    x: np.ndarray              # (rows, *sample shape): uint8 pixels, or floats of the model's dtype
    y: np.ndarray              # (rows,) int64 labels
    dtype: np.dtype = None     # the model's; None: that of x (floats)

    def __post_init__(self):
        self.dtype = np.dtype(self.x.dtype if self.dtype is None else self.dtype)
        if self.dtype.kind != "f":
            raise ValueError(f"a Split of {self.x.dtype} images needs the model's floating dtype")

    def as_input(self, x, out=None):
        """Rows taken from ``self.x`` as the model takes them: pixels scaled into ``out`` (a new array if
        None), or the floats themselves."""
        if x.dtype == np.uint8:
            return np.divide(x, PIXEL_MAX, out=out, dtype=self.dtype)
        return x


class Batches:
    """This rank's rows of each global batch, gathered from its shard into one reused array."""

    def __init__(self, split, max_rows):
        self.split = split
        self._x = np.empty((max_rows, *split.x.shape[1:]), dtype=split.dtype)
        self._pixels = np.empty((max_rows, *split.x.shape[1:]), dtype=np.uint8) if split.x.dtype == np.uint8 \
            else None

    def gather(self, rows):
        # mode="clip": with the default mode="raise", np.take fills a temporary and then
        # copies it into `out` (to stay safe on a bad index); the rows are valid by construction.
        x = self._x[:len(rows)]
        if self._pixels is None:
            np.take(self.split.x, rows, axis=0, out=x, mode="clip")
        else:
            self.split.as_input(np.take(self.split.x, rows, axis=0, out=self._pixels[:len(rows)], mode="clip"), x)
        return x, self.split.y[rows]


@dataclass(frozen=True)
class StepTotals:
    """One step's global sums, the same on every rank (they come out of an Allreduce)."""

    loss_sum: float         # of the per-sample losses over the global batch
    correct: int            # predictions that were right
    samples: int            # the global batch size
    stop_requested: bool    # whether any rank was asked to stop (a signal)
    grad_norm: float = 0.0  # the 2-norm of the allreduced gradient, before any clipping


class NonFiniteStep(NumericalError):
    """The loss or the allreduced gradient holds a NaN or an Inf (the update was not applied)."""


def count_correct(logits, labels):
    return int(np.count_nonzero(logits.argmax(axis=1) == labels))


def local_gradient(model, loss_fn, x, y, global_count):
    """Fill ``model.grads`` with this rank's share, for the rows ``(x, y)``, of the gradient of the mean
    loss over a global batch of ``global_count`` samples; returns the rows' share of the loss and their
    correct predictions. The loss is normalised by the global count, so the shares of all the rows of the
    global batch, however they are split (over ranks, or over micro-batches), sum to that gradient."""
    logits = model.forward(x)
    loss_share = loss_fn.forward(logits, y, normaliser=global_count)
    correct = count_correct(logits, y)
    model.backward(loss_fn.backward())
    return loss_share, correct


def micro_batch_bounds(rows, micro_batches):
    """``(start, stop)`` of ``micro_batches`` nearly equal, consecutive slices of ``rows`` rows (some empty
    when there are fewer rows than micro-batches)."""
    edges = [rows * i // micro_batches for i in range(micro_batches + 1)]
    return list(zip(edges[:-1], edges[1:]))


def gradient_norm(grads):
    """The 2-norm of the flat gradient: NaN or Inf when any value is. After the Allreduce every rank holds
    the same gradient, so every rank gets the same norm (and the same verdict on it)."""
    return float(np.sqrt(gemm.dot(grads, grads)))


def clip_gradient(grads, norm, max_norm):
    """PyTorch's ``clip_grad_norm_``: scale ``grads`` in place by ``max_norm / (norm + 1e-6)`` when below 1."""
    scale = max_norm / (norm + 1e-6)
    if scale < 1:
        grads *= grads.dtype.type(scale)


class TrainStep:
    """One step of data-parallel training; see the module docstring for the path it follows.

    ``after_reduce`` holds callables ``hook(x, y, global_count, context)`` run
    once the gradient is reduced and before clipping and the update
    (``--debug`` checks it there). ``clip_grad_norm``: clip the reduced
    gradient to that global 2-norm (None: no clipping). The norm is the
    *global* gradient's, the same on every rank: clipping each rank's share by
    its own norm would scale the shares differently and sum to a gradient no
    single process computes.
    """

    def __init__(self, model, loss_fn, optimizer, comm, clip_grad_norm=None, micro_batches=1, bucket_bytes=None):
        self.model, self.loss_fn, self.optimizer, self.comm = model, loss_fn, optimizer, comm
        self.clip_grad_norm = clip_grad_norm
        self.micro_batches = micro_batches
        # --overlap-allreduce: the gradient reduced in buckets during backward (one micro-batch, unsharded)
        self.buckets = None if bucket_bytes is None else GradientBuckets(model, comm, bucket_bytes)
        # --shard-optimizer (a ShardedOptimizer, or a wrapper of one): reduce-scatter, then allgather
        self.sharded = isinstance(getattr(optimizer, "sharded", optimizer), ShardedOptimizer)
        self._accumulated = None
        self.after_reduce = []
        self._totals = np.zeros(5)   # loss sum, correct, samples, ranks asked to stop, squared gradient norm

    def __call__(self, x, y, global_count, lr, stop_requested=False, context=None):
        """Train on this rank's ``(x, y)`` of a global batch of ``global_count``; returns the StepTotals.

        ``context`` (a ``dropout.BatchContext``: the seed, the global step and
        the rows' positions in the global batch) is what Dropout draws its masks from.
        """
        model, comm, sharded = self.model, self.comm, self.sharded
        if self.buckets is not None:
            with self.buckets:   # DDP: each bucket's Allreduce starts as soon as backward has filled it
                loss_share, correct = self._local_gradient(x, y, global_count, context)
            self.buckets.finish()
        else:
            loss_share, correct = self._local_gradient(x, y, global_count, context)
            self._reduce()
        for hook in self.after_reduce:
            hook(x, y, global_count, context)
        grads = model.grads[self.optimizer.slice] if sharded else model.grads
        totals = self._totals
        # Sharded, each rank holds its slice of the gradient: the squares of the slices sum to the norm's.
        totals[:] = (loss_share * global_count, correct, len(y), stop_requested,
                     float(gemm.dot(grads, grads)) if sharded and self.optimizer.sharded.counts_in_norm else 0.0)
        comm.allreduce_(totals)   # DDP: global totals, and whether a signal reached any rank
        norm = float(np.sqrt(totals[4])) if sharded else gradient_norm(grads)
        # Checked before the update, so the parameters in memory stay the last good ones.
        if not (np.isfinite(totals[0]) and np.isfinite(norm)):
            raise NonFiniteStep("NaN or Inf in the loss or gradients")
        if self.clip_grad_norm:
            clip_gradient(grads, norm, self.clip_grad_norm)
        self.optimizer.step(model.params, model.grads, lr)
        return StepTotals(loss_sum=float(totals[0]), correct=int(totals[1]), samples=int(totals[2]),
                          stop_requested=bool(totals[3]), grad_norm=norm)

    def _reduce(self):
        """Sum the ranks' shares of the gradient: all of it on every rank, or (sharded) each rank its slice."""
        model, comm = self.model, self.comm
        if self.sharded:
            # DDP: each rank receives the reduced gradient of its own slice of the parameters only
            # (through MPI, or, with node_memory, by summing the slots of its node's ranks)
            sharded = self.optimizer.sharded
            sharded.reduce_gradient_(model.grads)
            if self.after_reduce:
                sharded.gather_gradient_(model.grads)   # the hooks (--debug) see all of it
        else:
            comm.allreduce_(model.grads)   # DDP: sum of the shares = gradient of the global mean, once a step

    def _local_gradient(self, x, y, global_count, context):
        """This rank's share of the gradient in ``model.grads``, not yet reduced; its share of the loss and
        its correct predictions. With ``micro_batches`` K > 1 (gradient accumulation) the rows go forward
        and backward K slices at a time (the activations of a slice only), each slice's gradient
        normalised by the *global* count and summed here; the caller reduces it once for the whole step,
        as DDP's ``no_sync`` does."""
        model = self.model
        if self.micro_batches == 1:
            model.set_batch_context(context)
            return local_gradient(model, self.loss_fn, x, y, global_count)
        if self._accumulated is None or self._accumulated.shape != model.grads.shape:
            self._accumulated = np.empty_like(model.grads)
        accumulated, loss_share, correct = self._accumulated, 0.0, 0
        accumulated[...] = 0
        for start, stop in micro_batch_bounds(len(y), self.micro_batches):
            if start == stop:
                continue   # fewer rows than micro-batches: this slice adds nothing
            model.set_batch_context(None if context is None else
                                    BatchContext(context.seed, context.step, context.positions[start:stop]))
            share, right = local_gradient(model, self.loss_fn, x[start:stop], y[start:stop], global_count)
            accumulated += model.grads
            loss_share, correct = loss_share + share, correct + right
        np.copyto(model.grads, accumulated)
        return loss_share, correct
