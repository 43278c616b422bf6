"""Dropout whose masks do not depend on the number of ranks.

The mask of a sample is a pure function of the seed, the global step and
that sample's position in the global batch (and of the layer): every value
of it is drawn by hashing those numbers with the index of the value
(SplitMix64's finaliser, a counter-based generator), so each rank draws only
its own rows' masks, and P ranks draw exactly the masks one process draws.
No random generator state is carried from step to step, so nothing needs to
be checkpointed for a resumed run to draw the same masks either.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

from ddptrain.nn.layer import Layer

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)


@dataclass(frozen=True)
class BatchContext:
    """Where the rows of a forward pass sit: the run's seed, the global step, and each row's
    position in the global batch (this rank's rows of it)."""

    seed: int
    step: int
    positions: np.ndarray


def _mix(z, shifted):
    """SplitMix64's finaliser, in place on a uint64 array: a bijection whose outputs look random.
    ``shifted``: a work array of the same shape (no temporary the size of the mask)."""
    for shift, multiplier in ((_S30, _MIX1), (_S27, _MIX2)):
        z ^= np.right_shift(z, shift, out=shifted)
        z *= multiplier
    z ^= np.right_shift(z, _S31, out=shifted)
    return z


class Dropout(Layer):
    """Zeroes each value with probability ``p`` in training (scaling the rest by ``1 / (1 - p)``);
    the identity in evaluation."""

    input_grad_is_scratch = True
    rowwise = True   # each row's mask from its position in the global batch
    elementwise = True
    # In evaluation the output *is* the input: a layer after this one must not overwrite it.
    output_is_scratch = False

    def __init__(self, p=0.5):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = float(p)
        self.batch_context = None   # set before each training step (Sequential.set_batch_context)
        self._calls = 0
        self._mask = None
        self._offsets = None

    def config(self):
        return {"p": self.p}

    def label(self):
        return f"Dropout {self.p:g}"

    def mask(self, context, sample_size, dtype):
        """The ``(rows, sample_size)`` mask of the rows at ``context.positions``, already scaled."""
        key = np.random.SeedSequence([context.seed, context.step,
                                      zlib.crc32((self.name or "").encode())])
        key = key.generate_state(1, np.uint64)[0]
        index = self._scratch.get("index", (len(context.positions), sample_size), np.uint64)
        if self._offsets is None or len(self._offsets) != sample_size:
            # each value's place in its sample
            self._offsets = np.arange(sample_size, dtype=np.uint64)
        np.add(np.asarray(context.positions, dtype=np.uint64)[:, None] * np.uint64(sample_size),
               self._offsets, out=index)
        index *= _GOLDEN
        index += key
        _mix(index, self._scratch.get("shifted", index.shape, np.uint64))
        # The top 53 bits are uniform on [0, 2**53): keep a value when they are at least p * 2**53.
        np.right_shift(index, _S11, out=index)
        keep = np.greater_equal(index, np.uint64(int(self.p * 2 ** 53)),
                                out=self._scratch.get("keep", index.shape, bool))
        mask = self._scratch.get("mask", index.shape, dtype)
        np.multiply(keep, dtype.type(1 / (1 - self.p)), out=mask)
        return mask

    def forward(self, x):
        if not self.training:
            return x
        context = self.batch_context
        if context is None:   # outside a trainer: the rows are a batch of their own, one per call
            context = BatchContext(seed=0, step=self._calls, positions=np.arange(len(x)))
            self._calls += 1
        if len(context.positions) != len(x):
            raise ValueError(f"{self.name}: the batch context has {len(context.positions)} "
                             f"positions for {len(x)} rows")
        self._mask = self.mask(context, math.prod(x.shape[1:]), x.dtype).reshape(x.shape)
        out = self._scratch.get("out", x.shape, x.dtype)
        return np.multiply(x, self._mask, out=out)

    def backward(self, dout, need_input_grad=True):
        if not need_input_grad:
            return None
        dx = self._scratch.get("dx", dout.shape, dout.dtype)
        if not self.training:
            np.copyto(dx, dout)
            return dx
        return np.multiply(dout, self._mask, out=dx)
