"""Two-dimensional convolution on ``(N, C, H, W)`` arrays, done as matrix products.

``Conv2d`` computes, for each output channel ``f`` and output pixel ``(r, s)``,

    y[n, f, r, s] = bias[f] + sum over c, i, j of weight[f, c, i, j]
                                                  * x_pad[n, c, r * stride + i, s * stride + j]

(a cross-correlation, as in PyTorch), where ``x_pad`` is the input with
``padding`` zeros around it. Written as one matrix product, this is
``Y = W @ cols`` with ``W`` the weights as a ``(F, C*k*k)`` matrix and
``cols`` (the *im2col* matrix) holding, in the column of each output pixel
of each sample, the ``C*k*k`` input values its window covers. The backward
pass is two more products on the same matrices:

    dW = dY @ cols.T           (F, C*k*k): sums over every pixel of every sample
    dcols = W.T @ dY           then *col2im*: each column added back where it came from

so all the arithmetic runs in BLAS, threaded, with large matrices: ``cols``
is laid out ``(C*k*k, samples * pixels)``, channel-major, so that a block of
samples (about ``CHUNK_BYTES`` of ``cols``) is one product, not one small
product per sample. The bias rides along: ``cols`` has one more row of ones
and ``W`` one more column holding the bias, so BLAS adds the bias in the
forward product and sums its gradient in ``dW``, with no pass of its own.

**The wide-row trick (stride 1).** A window's values for all output pixels
of a row are consecutive in memory, and so are those of the next row, except
for the ``k - 1`` pixels where the window wraps past the right edge. If
``cols`` keeps those wrapped pixels too (a *wide* output row, ``W + 2p``
pixels instead of ``W + 2p - k + 1``), each ``(c, i, j)`` row of ``cols`` is
one strided copy of a contiguous run of the padded input per sample, instead
of one short copy per output row; copies with short rows are what make
im2col slow in numpy. The wrapped pixels are computed and then dropped
(a few percent more arithmetic); in backward their gradient is set to zero,
so they add nothing anywhere.

Buffers are kept between calls (``Scratch``): the padded input (kept for
backward, which copies each block's ``cols`` again rather than keep them
all), ``cols``, the wide output and the gradients' work arrays are allocated
once, for the largest batch seen.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ddptrain.nn import conv_channels_last
from ddptrain.nn.conv_shifts import backward_by_shifts, shifts_pay
from ddptrain.nn.layer import Layer, ShapeError, shape_text


def conv_output_size(size, kernel, stride, padding):
    """Pixels along one axis of a convolution's or pooling's output (PyTorch's floor rule)."""
    return (size + 2 * padding - kernel) // stride + 1


class Conv2d(Layer):
    """A 2-D convolution with ``out_channels`` filters of ``kernel_size x kernel_size`` over
    ``in_channels``.

    He initialisation (``N(0, 2 / fan_in)`` with ``fan_in = in_channels * k * k``),
    biases at zero; ``bias=False`` leaves them out (before a BatchNorm).
    """

    output_is_scratch = True        # backward needs cols and the weights, not the output
    input_grad_is_scratch = True
    takes_channels = True
    # --reproducible in groups of rows (layer.py): each block of samples lies in one group, so that
    # every product is a call on one group's rows, and each group's weight gradient is its own sum
    sums_over_rows = True

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride, self.padding, self.bias = (int(kernel_size), int(stride),
                                                                  int(padding), bool(bias))
        if (min(self.in_channels, self.out_channels, self.kernel_size, self.stride) < 1
                or self.padding < 0):
            raise ValueError(f"Conv2d({in_channels}, {out_channels}, kernel_size={kernel_size}, "
                             f"stride={stride}, padding={padding}): channels, kernel size and "
                             "stride must be positive, padding not negative")
        self._shape = None   # (N, C, H, W) of the last forward's input

    def config(self):
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding,
                "bias": self.bias}

    def label(self):
        extra = "".join([f" stride {self.stride}"] * (self.stride != 1)
                        + [f" pad {self.padding}"] * (self.padding > 0))
        return (f"Conv2d {self.in_channels}->{self.out_channels} "
                f"{self.kernel_size}x{self.kernel_size}{extra}")

    def param_shapes(self):
        k = self.kernel_size
        return {"weight": (self.out_channels, self.in_channels, k, k),
                **({"bias": (self.out_channels,)} if self.bias else {})}

    def init_params(self, rng):
        weight = self.params["weight"]
        fan_in = self.in_channels * self.kernel_size ** 2
        weight[...] = rng.standard_normal(weight.shape) * math.sqrt(2.0 / fan_in)
        if self.bias:
            self.params["bias"][...] = 0

    def output_shape(self, input_shape):
        if len(input_shape) != 3 or input_shape[0] != self.in_channels:
            raise ShapeError(f"{self.name or 'Conv2d'} ({self.label()}) takes images of "
                             f"{self.in_channels} channel(s) (C x H x W), not "
                             f"{shape_text(input_shape)}")
        height, width = (conv_output_size(size, self.kernel_size, self.stride, self.padding)
                         for size in input_shape[1:])
        if height < 1 or width < 1:
            raise ShapeError(f"{self.name or 'Conv2d'} ({self.label()}) needs images of at least "
                             f"{self.kernel_size - 2 * self.padding} x "
                             f"{self.kernel_size - 2 * self.padding} pixels, not "
                             f"{shape_text(input_shape)}")
        return (self.out_channels, height, width)

    def flops(self, input_shape):
        """Multiplications and additions of the forward pass for one sample (2 per multiply-add)."""
        _, height, width = self.output_shape(input_shape)
        return 2 * self.out_channels * height * width * self.in_channels * self.kernel_size ** 2

    def workspace(self, input_shape):
        """Values per sample kept in work arrays: the padded input (the im2col blocks have a fixed
        size)."""
        channels, height, width = input_shape
        return channels * (height + 2 * self.padding) * (width + 2 * self.padding)

    def block_bytes(self):
        """Bytes of this layer's work arrays that do not grow with the batch: cols and dcols, the
        wide output and its gradient, for one block of samples (about ``4 * CHUNK_BYTES``; the
        shifted backward's arrays, taken instead of dcols, stay under that too: conv_shifts.py)."""
        return 4 * self.CHUNK_BYTES

    # -- the geometry of one input size ------------------------------------------------------------

    def _geometry(self, height, width):
        k, stride, pad = self.kernel_size, self.stride, self.padding
        out_height, out_width = (conv_output_size(height, k, stride, pad),
                                 conv_output_size(width, k, stride, pad))
        padded_height, padded_width = height + 2 * pad, width + 2 * pad
        # Stride 1: wide rows (the output row as long as a padded row; see the module's docstring).
        cols_width = padded_width if stride == 1 else out_width
        return _Geometry(out_height, out_width, padded_height, padded_width, cols_width,
                         out_height * cols_width)

    def _padded(self, n, geometry, name):
        """The flat zero-bordered work array for ``n`` padded samples, with ``k - 1`` values of
        slack.

        The last wide rows of the last sample read up to ``k - 1`` values past
        its end (only for wrapped pixels, which are dropped): the slack keeps
        those reads inside the array.
        """
        size = n * self.in_channels * geometry.padded_height * geometry.padded_width
        return self._scratch.get(name, (size + self.kernel_size - 1,), self._dtype, zeroed=True)

    def _windows(self, padded, first, n, geometry):
        """A strided view of ``padded`` from sample ``first`` on:
        ``(C, k, k, n, out rows, cols width)``."""
        item, stride, k = padded.itemsize, self.stride, self.kernel_size
        row, channel = (geometry.padded_width * item,
                        geometry.padded_height * geometry.padded_width * item)
        start = first * self.in_channels * geometry.padded_height * geometry.padded_width
        return as_strided(padded[start:], shape=(self.in_channels, k, k, n, geometry.out_height,
                                                 geometry.cols_width),
                          strides=(channel, row, item, channel * self.in_channels, stride * row,
                                   stride * item))

    def _chunks(self, n, geometry):
        """``(first, count)`` of the blocks of samples processed together, and the block size.

        A block's im2col matrix is about ``CHUNK_BYTES``, so that the work
        arrays stay the same size for any batch: evaluating 2,000 images at
        once would otherwise take hundreds of megabytes per layer. A block
        small enough that its ``cols``, output and gradients stay in a core's
        L2 cache from one pass over it to the next (``CHUNK_BYTES``) makes a
        whole step faster, though the products alone are faster on larger
        blocks: docs/cnn.md.
        """
        per_sample = ((self.in_channels * self.kernel_size ** 2 + 1) * geometry.pixels
                      * self._dtype.itemsize)
        return self._sample_blocks(n, per_sample)

    def _sample_blocks(self, n, per_sample):
        """``(first, count)`` of blocks of about ``CHUNK_BYTES`` for ``n`` samples of
        ``per_sample`` bytes each, and the largest block's count; in groups of rows, the blocks
        of each group (``row_groups``) by the same rule, of up to ``GROUP_CHUNK_BYTES``."""
        budget = self.CHUNK_BYTES if self.row_groups is None else self.GROUP_CHUNK_BYTES
        chunks, per_block = [], max(1, budget // per_sample)
        for start, stop in self.row_groups if self.row_groups is not None else [(0, n)]:
            blocks = -(-(stop - start) // per_block)
            # Blocks of equal size (to one sample), not full blocks and a remainder: a small
            # product is a slow one.
            bounds = [start + (stop - start) * i // blocks for i in range(blocks + 1)]
            chunks += [(first, last - first) for first, last in zip(bounds[:-1], bounds[1:])]
        return chunks, max((count for _, count in chunks), default=1)

    def _gradient_sums(self, chunks):
        """``chunks`` in the order given, as ``(first, count, opens, grads_to)``: whether the
        block's weight gradient opens a sum (written, not added), and once the sum has its last
        block, where it goes (``{name: array}``: the layer's gradients, or in groups of rows its
        group's), else None. One sum over all the blocks; in groups, one per group."""
        groups = self.row_groups
        keys = [0 if groups is None else
                next(k for k, (start, stop) in enumerate(groups) if start <= first < stop)
                for first, _ in chunks]
        for i, ((first, count), key) in enumerate(zip(chunks, keys)):
            grads_to = None
            if i == len(chunks) - 1 or keys[i + 1] != key:   # the sum's last block
                grads_to = self.grads if groups is None else {
                    name: grads[key] for name, grads in self.group_grads.items()}
            yield first, count, i == 0 or keys[i - 1] != key, grads_to

    # Bytes of cols per block: a block's work arrays stay in an L2 cache of 1-2 MiB; much larger and
    # much smaller blocks made a whole step slower (docs/cnn.md).
    CHUNK_BYTES = 1 << 20
    # In --reproducible's groups of rows (training/groups.py) no block spans two groups, and a group
    # is small (a batch of 512 in 24 groups: 21 rows): blocks of up to this many bytes take such a
    # group in one call, fewer and larger products (docs/history.md, 8 December 2026). The same for
    # every number of ranks and threads: which rows share a call is part of what fixes the bits.
    GROUP_CHUNK_BYTES = 3 << 20

    def _im2col(self, padded, first, count, geometry, cols):
        """Fill the first rows of ``cols`` with the windows of ``count`` samples from ``first`` on;
        return them."""
        used = cols[:, :count * geometry.pixels]
        windows = self._windows(padded, first, count, geometry)
        used[:windows[:, :, :, 0, 0, 0].size].reshape(windows.shape)[...] = windows
        return used

    def _weight_matrix(self):
        """The weights as ``(F, C*k*k)``, with the bias as one more column when there is one."""
        weight = self.params["weight"].reshape(self.out_channels, -1)
        if not self.bias:
            return weight
        matrix = self._scratch.get("weight_matrix", (self.out_channels, weight.shape[1] + 1),
                                   self._dtype)
        matrix[:, :-1] = weight
        matrix[:, -1] = self.params["bias"]
        return matrix

    def _cols(self, block, geometry):
        """cols for ``block`` samples, with a row of ones for the bias.

        A flat array viewed as a matrix, so that a smaller block (the last
        batch of an epoch) reuses the memory of a larger one; so is ``_wide``'s.
        """
        rows = self.in_channels * self.kernel_size ** 2 + self.bias
        columns = block * geometry.pixels
        cols = self._scratch.get("cols", (rows * columns,),
                                 self._dtype)[:rows * columns].reshape(rows, columns)
        if self.bias:
            # the bias column of the weight matrix meets these ones: the bias, added by BLAS
            cols[-1] = 1
        return cols

    def _wide(self, block, geometry, name):
        """A wide output (``name`` "wide") or its gradient ("dwide") for ``block`` samples."""
        columns = block * geometry.pixels
        size = (self.out_channels * columns,)
        # The wrapped pixels of the gradient's wide rows are never written, so that they stay 0
        # from one step to the next; a new layout puts them elsewhere.
        wide = (self._scratch.zeroed_for(name, size, self._dtype, (block, geometry.pixels))
                if name == "dwide" else self._scratch.get(name, size, self._dtype))
        return wide[:size[0]].reshape(self.out_channels, columns)

    _channels_last = False   # whether the last forward ran channels-last
    # (first sample, samples, block) whose windows cols holds since the last forward
    _cols_hold = None

    @property
    def _dtype(self):
        return self.params["weight"].dtype

    # -- passes ------------------------------------------------------------------------------------

    def forward(self, x):
        if not len(x):   # an empty batch: a rank may hold none at the end of an epoch
            self._shape, self._channels_last = x.shape, False
            return np.zeros((0, *self.output_shape(x.shape[1:])), self._dtype)
        # no wrapped pixels, where a window row is a long enough run: conv_channels_last.py
        self._channels_last = conv_channels_last.pays(self)
        if self._channels_last:
            return conv_channels_last.forward(self, x)
        n, channels, height, width = x.shape
        geometry = self._geometry(height, width)
        self._shape, self._geometry_now = x.shape, geometry
        pad = self.padding
        padded = self._padded(n, geometry, "padded")
        body = padded[:n * channels * geometry.padded_height * geometry.padded_width]
        body = body.reshape(n, channels, geometry.padded_height, geometry.padded_width)
        # the border stays zero: nothing else writes it
        body[:, :, pad:pad + height, pad:pad + width] = x
        padded[body.size:] = 0                              # the slack: read only by wrapped pixels
        self._padded_input = padded

        out = self._scratch.get("out", (n, self.out_channels, geometry.out_height,
                                        geometry.out_width), self._dtype)
        chunks, block = self._chunks(n, geometry)
        cols, wide = self._cols(block, geometry), self._wide(block, geometry, "wide")
        weight = self._weight_matrix()
        for first, count in chunks:
            wide_used = self.backend.matmul(weight,
                                            self._im2col(padded, first, count, geometry, cols),
                                            out=wide[:, :count * geometry.pixels])
            # (F, samples, rows, wide row) -> (samples, F, rows, row): the wrapped pixels dropped.
            wide_used = wide_used.reshape(self.out_channels, count, geometry.out_height,
                                          geometry.cols_width)
            np.copyto(out[first:first + count],
                      wide_used[..., :geometry.out_width].transpose(1, 0, 2, 3))
            self._cols_hold = (first, count, block)
        return out

    def backward(self, dout, need_input_grad=True):
        if not self._shape[0]:   # no rows, no gradient
            for grad in self.grads.values():
                grad[...] = 0
            return np.zeros(self._shape, self._dtype) if need_input_grad else None
        if self._channels_last:
            return conv_channels_last.backward(self, dout, need_input_grad)
        if shifts_pay(self, need_input_grad):   # fewer copies and additions: conv_shifts.py
            return backward_by_shifts(self, dout, need_input_grad)
        n, channels, height, width = self._shape
        geometry, k, pad = self._geometry_now, self.kernel_size, self.padding
        chunks, block = self._chunks(n, geometry)
        cols, dwide = self._cols(block, geometry), self._wide(block, geometry, "dwide")
        weight = self._weight_matrix()
        # dW transposed, (C*k*k [+1], F), summed over the blocks: OpenBLAS makes cols @ dY.T, with
        # the long dimension (samples x pixels) inside, about a third faster than dY @ cols.T.
        grad_t = self._scratch.get("grad_t", weight.shape[::-1], self._dtype)
        grad_part = self._scratch.get("grad_part", weight.shape[::-1], self._dtype)
        if need_input_grad:
            weight_t = self._scratch.get("weight_t", (channels * k * k, self.out_channels),
                                         self._dtype)
            # contiguous: a faster product below
            np.copyto(weight_t, weight[:, :channels * k * k].T)
            size = channels * k * k * block * geometry.pixels
            dcols = self._scratch.get("dcols", (size,),
                                      self._dtype)[:size].reshape(channels * k * k, -1)
            dpadded = self._padded(block, geometry, "dpadded")
            dbody = dpadded[:block * channels * geometry.padded_height * geometry.padded_width]
            dbody = dbody.reshape(block, channels, geometry.padded_height, geometry.padded_width)
            dx = self._scratch.get("dx", self._shape, self._dtype)
        # Backwards through the blocks: cols still holds the last block's windows from the forward
        # pass.
        for first, count, opens, grads_to in self._gradient_sums(chunks[::-1]):
            used = count * geometry.pixels
            if self._cols_hold == (first, count, block):
                cols_used = cols[:, :used]
            # the windows again: cheaper than keeping every block's cols from the forward pass
            else:
                cols_used = self._im2col(self._padded_input, first, count, geometry, cols)
            self._cols_hold = None
            # dY of these samples as (F, samples * pixels), the layout of the wide output.
            dwide_used = dwide[:, :used].reshape(self.out_channels, count, geometry.out_height,
                                                 geometry.cols_width)
            dwide_used[..., :geometry.out_width] = dout[first:first + count].transpose(1, 0, 2, 3)
            dwide_used = dwide[:, :used]
            self.backend.matmul(cols_used, dwide_used.T, out=grad_t if opens else grad_part)
            if not opens:
                grad_t += grad_part
            if grads_to is not None:
                grads_to["weight"].reshape(self.out_channels, -1)[...] = \
                    grad_t[:channels * k * k].T
                if self.bias:
                    grads_to["bias"][...] = grad_t[-1]
            if not need_input_grad:
                continue
            dcols_used = self.backend.matmul(weight_t, dwide_used, out=dcols[:, :used])
            # col2im: add each (c, i, j) row of dcols back onto the input values it was copied from.
            dpadded[...] = 0
            dcols_used = dcols_used.reshape(channels, k, k, count, geometry.out_height,
                                            geometry.cols_width)
            # where each (c, i, j) row of cols came from
            targets = self._windows(dpadded, 0, count, geometry)
            for i in range(k):
                for j in range(k):
                    np.add(targets[:, i, j], dcols_used[:, i, j], out=targets[:, i, j])
            np.copyto(dx[first:first + count], dbody[:count, :, pad:pad + height, pad:pad + width])
        return dx if need_input_grad else None


class _Geometry:
    """The sizes of one convolution on one input size."""

    __slots__ = ("out_height", "out_width", "padded_height", "padded_width", "cols_width", "pixels")

    def __init__(self, out_height, out_width, padded_height, padded_width, cols_width, pixels):
        self.out_height, self.out_width = out_height, out_width
        self.padded_height, self.padded_width = padded_height, padded_width
        # columns of cols per sample: out rows x cols width
        self.cols_width, self.pixels = cols_width, pixels
