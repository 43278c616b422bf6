"""Max and average pooling over ``(N, C, H, W)`` arrays, with whole-array numpy operations.

**Windows that tile the image** (stride = kernel size, the usual case) are
pooled in two separable stages, each over long runs of memory: first along
each row (the ``k`` values of a window's row are ``k`` neighbours in memory,
so ``x.reshape(-1, k)[:, t]`` is the ``t``-th of every group: one strided
view of the whole array), then across the ``k`` rows of each window. Views
of a window offset ``x[:, :, i::k, j::k]`` would be the obvious way, but
their rows are only ``W / k`` values long, and numpy's cost per row then
dominates (measured 4x slower).

**Overlapping windows or gaps** (stride != kernel size) take the general
path: for each of the ``k * k`` offsets ``(i, j)`` of the window, the values
at that offset of every window form one strided view of the input.

* ``AvgPool2d``: the output is the sum of the values divided by ``k * k``;
  backward gives each value ``dout / (k * k)``.
* ``MaxPool2d``: a running maximum, remembering which value held it. Only a
  strictly larger value replaces the current maximum, so among tied values
  **the first in the window (row by row) wins**, every time, and backward
  sends the whole gradient to it alone: ties are deterministic, and the
  gradient is that of PyTorch's CPU max pooling. (In two stages: the first
  maximum of each row segment, then the first row whose maximum is strictly
  larger: the first maximum of the window in row-major order.)

Windows that do not fit are dropped (PyTorch's floor rule, no padding).
"""

from __future__ import annotations

import math

import numpy as np

from ddptrain.nn.conv import conv_output_size
from ddptrain.nn.layer import Layer, ShapeError, shape_text


class _Pool2d(Layer):
    """What max and average pooling share: the output's shape, the tiled stages, and the input
    gradient's array.

    ``grad_over_input`` is decided by ``Sequential``, never by hand: when the
    layer before this one does not read its own output again
    (``output_is_scratch``), backward writes the input gradient over the
    input forward took, which nothing needs by then (backward reads only
    where the maxima were): one activation-sized array fewer to stream through
    the cache each step (docs/cnn.md).
    """

    takes_channels = True
    rowwise = True
    # backward reads what forward kept of the maxima (or nothing), never the output; nothing reads
    # the input gradient once returned: a ReLU next to a pooling may work in place
    output_is_scratch = True
    input_grad_is_scratch = True

    def __init__(self, kernel_size, stride=None):
        super().__init__()
        self.kernel_size = int(kernel_size)
        self.stride = self.kernel_size if stride is None else int(stride)
        if self.kernel_size < 1 or self.stride < 1:
            raise ValueError(f"{type(self).__name__}(kernel_size={kernel_size}, stride={stride}): "
                             "both must be positive")
        self.grad_over_input = False
        self._shape = self._input = None

    def config(self):
        return {"kernel_size": self.kernel_size, "stride": self.stride}

    def plan_in_place(self, before, after):
        self.grad_over_input = before is not None and before.output_is_scratch

    def label(self):
        stride = f" stride {self.stride}" if self.stride != self.kernel_size else ""
        return f"{type(self).__name__} {self.kernel_size}x{self.kernel_size}{stride}"

    def output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ShapeError(f"{self.name or type(self).__name__} ({self.label()}) takes images "
                             f"with channels (C x H x W), not {shape_text(input_shape)}")
        height, width = (conv_output_size(size, self.kernel_size, self.stride, 0)
                         for size in input_shape[1:])
        if height < 1 or width < 1:
            raise ShapeError(f"{self.name or type(self).__name__} ({self.label()}) needs images of "
                             f"at least {self.kernel_size} x {self.kernel_size} pixels, not "
                             f"{shape_text(input_shape)}")
        return (input_shape[0], height, width)

    @property
    def _tiles(self):
        """Whether the windows tile the image (stride = kernel size): the two-stage path."""
        return self.stride == self.kernel_size

    def _offsets(self, array, out_height, out_width):
        """``(offset, view)`` for the ``k * k`` offsets of the window: the values at that offset of
        all windows."""
        k, stride = self.kernel_size, self.stride
        for i in range(k):
            for j in range(k):
                yield i * k + j, array[:, :, i:i + stride * (out_height - 1) + 1:stride,
                                       j:j + stride * (out_width - 1) + 1:stride]

    def _tiled(self, x):
        """``x`` without the last rows or columns that fit no window (a copy when there are
        any)."""
        n, channels, height, width = x.shape
        k = self.kernel_size
        if height % k or width % k:
            cropped = self._scratch.get("cropped", (n, channels, height // k * k, width // k * k),
                                        x.dtype)
            np.copyto(cropped, x[:, :, :cropped.shape[2], :cropped.shape[3]])
            return cropped
        return x

    # input values per block of samples: a block's first stage stays in a core's L2 cache for
    # its second
    BLOCK_VALUES = 1 << 17

    def _blocks(self, n, per_sample):
        """Slices of about ``BLOCK_VALUES`` input values of samples, pooled one after the other."""
        step = max(1, self.BLOCK_VALUES // max(per_sample, 1))
        return [slice(first, min(first + step, n)) for first in range(0, n, step)]

    def _output(self, x):
        self._shape = x.shape
        _, height, width = self.output_shape(x.shape[1:])
        return self._scratch.get("out", (x.shape[0], x.shape[1], height, width), x.dtype)

    def forward(self, x):
        out = self._output(x)
        self._input = x if self.grad_over_input else None
        if not self._tiles:
            self._reduce([view for _, view in self._offsets(x, *out.shape[2:])], out, "offsets",
                         slice(0, len(x)))
            return self._finish(out)
        x, k = self._tiled(x), self.kernel_size
        n, channels, height, width = x.shape
        for block in self._blocks(n, channels * height * width):
            # Stage 1: each window row's segment, k neighbours in memory; stage 2: k rows of
            # those.
            segments = x[block].reshape(-1, k)     # (samples * C * rows * out columns, k)
            rows = self._scratch.get("rows", (segments.shape[0],), x.dtype)
            self._reduce([segments[:, t] for t in range(k)], rows, "columns", block)
            rows = rows.reshape(-1, k, width // k)
            self._reduce([rows[:, t] for t in range(k)], out[block].reshape(rows.shape[0], -1),
                         "rows", block)
        return self._finish(out)

    def backward(self, dout, need_input_grad=True):
        if not need_input_grad:
            return None
        dx = self._scratch.get("dx", self._shape, dout.dtype) if self._input is None else \
            self._input
        if not self._tiles:
            return self._backward_offsets(dout, dx)
        k, (n, channels, height, width) = self.kernel_size, self._shape
        divisible = not (height % k or width % k)
        if not divisible:
            dx[...] = 0   # the pixels no window covers
        target = dx if divisible else self._scratch.get(
            "dcropped", (n, channels, height // k * k, width // k * k), dout.dtype)
        for block in self._blocks(n, math.prod(target.shape[1:])):
            grad = dout[block].reshape(-1, width // k)       # (samples * C * out rows, out columns)
            drows = self._scratch.get("drows", (grad.size * k,), dout.dtype)[:grad.size * k]
            drows = drows.reshape(grad.shape[0], k, width // k)
            self._spread(grad, [drows[:, t] for t in range(k)], "rows", block)
            segments = target[block].reshape(-1, k)
            self._spread(drows.reshape(-1), [segments[:, t] for t in range(k)], "columns", block)
        if not divisible:
            dx[:, :, :target.shape[2], :target.shape[3]] = target
        return dx

    def _reduce(self, views, out, stage, block):
        """``out`` = the pooled ``views``, of the samples ``block`` of the batch."""
        raise NotImplementedError

    def _spread(self, grad, targets, stage, block):
        """``targets`` = the gradients of the views ``grad`` came from, for the samples
        ``block``."""
        raise NotImplementedError

    def _finish(self, out):
        return out


class MaxPool2d(_Pool2d):
    """The maximum of each ``kernel_size x kernel_size`` window (stride: the kernel size by
    default)."""

    def __init__(self, kernel_size, stride=None):
        super().__init__(kernel_size, stride)
        # per stage ("columns", "rows" or "offsets"): which view held each maximum
        self._which = {}

    def _reduce(self, views, out, stage, block):
        """``out`` = the maximum of ``views``; remembers, per value, the first view that holds
        it."""
        # per sample (none in an empty batch, which a rank may hold at the end of an epoch)
        per_sample = out.size // max(block.stop - block.start, 1)
        # per stage: the stages' shapes differ, and one array for both would be allocated again at
        # every call
        which = self._scratch.get(f"which_{stage}", (self._shape[0], per_sample),
                                  np.uint8 if len(views) <= 256 else np.int32)
        self._which[stage] = which
        which = which[block].reshape(out.shape)
        larger = self._scratch.get(f"larger_{stage}", (out.size,), bool)[:out.size]
        larger = larger.reshape(out.shape)
        offset = self._scratch.get(f"offset_{stage}", (out.size,), which.dtype)[:out.size]
        offset = offset.reshape(out.shape)
        if len(views) == 1:   # a 1x1 window
            np.copyto(out, views[0])
            which[...] = 0
        # strictly greater: a tie keeps the earlier view (0/1 written straight into a uint8 array)
        else:
            np.greater(views[1], views[0],
                       out=which.view(np.bool_) if which.dtype == np.uint8 else larger)
            if which.dtype != np.uint8:
                np.copyto(which, larger)
            np.maximum(views[0], views[1], out=out)
        for t, view in enumerate(views[2:], start=2):
            np.greater(view, out, out=larger)
            np.maximum(out, view, out=out)
            # which = t where larger: t exceeds every earlier index, so a maximum does it
            # (np.copyto(which, t, where=larger) measured ten times slower).
            np.maximum(which, np.multiply(larger, which.dtype.type(t), out=offset), out=which)

    def _spread(self, grad, targets, stage, block):
        """Each target gets ``grad`` where its view held the maximum, 0 elsewhere."""
        which = self._which[stage][block].reshape(grad.shape)
        if len(targets) == 2:   # which is 0 or 1: two passes, exact (grad - grad * 1 is 0)
            np.multiply(grad, which, out=targets[1])
            np.subtract(grad, targets[1], out=targets[0])
            return
        chosen = self._scratch.get("chosen", (grad.size,), bool)[:grad.size].reshape(grad.shape)
        for t, target in enumerate(targets):
            np.multiply(grad, np.equal(which, t, out=chosen), out=target)

    def _backward_offsets(self, dout, dx):
        dx[...] = 0   # overlapping windows add up; pixels between windows get 0
        chosen = self._scratch.get("chosen", (dout.size,), bool)[:dout.size].reshape(dout.shape)
        which = self._which["offsets"].reshape(dout.shape)
        for t, view in self._offsets(dx, *dout.shape[2:]):
            view += dout * np.equal(which, t, out=chosen)
        return dx


class AvgPool2d(_Pool2d):
    """The mean of each ``kernel_size x kernel_size`` window (stride: the kernel size by
    default)."""

    def _reduce(self, views, out, stage, block):
        np.copyto(out, views[0])
        for view in views[1:]:
            out += view

    def _finish(self, out):
        out *= 1.0 / self.kernel_size ** 2
        return out

    def _spread(self, grad, targets, stage, block):
        # each stage passes 1/k of the gradient: 1/k^2 in all
        for target in targets:
            np.multiply(grad, 1.0 / self.kernel_size, out=target)

    def _backward_offsets(self, dout, dx):
        dx[...] = 0
        share = np.multiply(dout, 1.0 / self.kernel_size ** 2,
                            out=self._scratch.get("share", dout.shape, dout.dtype))
        for _, view in self._offsets(dx, *dout.shape[2:]):
            view += share
        return dx
