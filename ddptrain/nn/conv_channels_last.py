"""A convolution over several input channels done channels-last: no wrapped pixels, and im2col's
copies in runs of ``k * C`` values.

The wide rows of ``conv.py`` keep im2col's copies long for an image of few
channels, at a price: ``k - 1`` wrapped pixels per output row, computed and
dropped. For the cnn's second convolution (12 x 12 inputs, 5 x 5 kernels)
that is 12 columns of products for every 8 kept, half as much arithmetic
again. With the channels last, ``(N, H, W, C)``, the ``k`` pixels of a window
row and all their channels are one contiguous run of ``k * C`` values, so
im2col copies long runs with no wrapped pixel at all once ``k * C`` is large
enough (``pays``):

    cols[(n, r, s), (i, j, c)] = x_pad[n, r * stride + i, s * stride + j, c]
    Y = cols @ Wc                   (pixels, F): one row per output pixel,
                                     Wc[(i, j, c), f] = W[f, c, i, j]
    dW = dY.T @ cols                (F, k*k*C): summed over every pixel of every sample

The input gradient of a stride-1 convolution comes from the shifted rows of
``conv_shifts.py`` (on wide rows, whose waste it shares), which measured
faster than the channels-last way, left for the others (stride > 1, 1 x 1):
``dcols = dY @ Wc.T``, then col2im adds each row of ``dcols`` back onto the
input values it was copied from. For one window row ``i`` and one output
column ``s``, the ``k * C`` values of ``dcols`` of every output pixel ``(n,
r, s)`` land on one run of ``x_pad[n, r * stride + i, s * stride:s * stride
+ k, :]``: ``k * Ow`` calls of long runs, where the window offsets ``(i,
j)`` would take ``k * k`` calls of runs of ``C``. Runs of different ``s``
overlap, so each is its own call; numpy's overhead per run (about 30 ns)
is what makes col2im the slower way.

The layer's input and output stay ``(N, C, H, W)``: the transposes in and
out copy the input and the output once each, cheap next to the products.
As in ``conv.py``, the bias rides in the products (a column of ones in
``cols``), the samples go in blocks of about ``Conv2d.CHUNK_BYTES`` of
``cols``, and the backward pass walks them in reverse, so that the last
block's ``cols`` from the forward pass is used again.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ddptrain.nn.conv_shifts import backward_by_shifts, shifts_pay

# The shortest run of k * C values for which channels-last pays. The cnn's second convolution has
# runs of 80 (its forward pass 1.3-1.4x faster); its first, one channel, runs of 5: wide rows are
# faster there.
MIN_RUN = 16


def pays(layer):
    """Whether a window row's ``k * C`` values are a long enough run for im2col's copies."""
    return layer.in_channels * layer.kernel_size >= MIN_RUN


class _Sizes:
    """The sizes of one convolution on one input size, channels last."""

    def __init__(self, layer, channels, height, width):
        _, self.out_height, self.out_width = layer.output_shape((channels, height, width))
        pad, k = layer.padding, layer.kernel_size
        self.padded = (height + 2 * pad, width + 2 * pad)
        self.pixels = self.out_height * self.out_width
        self.window = channels * k * k          # values of one window: (i, j, c)
        self.cols_width = self.window + layer.bias       # and a one for the bias


def _blocks(layer, n, sizes):
    return layer._sample_blocks(n, sizes.cols_width * sizes.pixels * layer._dtype.itemsize)


def _cols(layer, block, sizes):
    """The im2col work array for ``block`` samples, ``(pixels, window [+ 1])``, its last column ones
    where there is a bias."""
    rows = block * sizes.pixels
    cols = layer._scratch.get("cols_last", (rows * sizes.cols_width,), layer._dtype)
    cols = cols[:rows * sizes.cols_width].reshape(rows, sizes.cols_width)
    if layer.bias:
        cols[:, -1] = 1
    return cols


def _im2col(layer, first, count, sizes, cols):
    """Fill the first rows of ``cols`` with the windows of ``count`` samples from ``first`` on;
    return them."""
    padded, k, stride = layer._padded_last, layer.kernel_size, layer.stride
    used = cols[:count * sizes.pixels]
    sample, row, pixel, channel = padded.strides
    windows = as_strided(padded[first:], writeable=False,
                         shape=(count, sizes.out_height, sizes.out_width, k, k,
                                layer.in_channels),
                         strides=(sample, stride * row, stride * pixel, row, pixel, channel))
    _as_windows(used, count, sizes, layer)[...] = windows
    return used


def _as_windows(matrix, count, sizes, layer):
    """``matrix`` (pixels, window [+ 1]) viewed as ``(N, Oh, Ow, k, k, C)`` (the bias column left
    out): a view, never a copy, so that writing it writes ``matrix``."""
    k, channels = layer.kernel_size, layer.in_channels
    row, item = matrix.strides
    return as_strided(matrix, shape=(count, sizes.out_height, sizes.out_width, k, k, channels),
                      strides=(sizes.pixels * row, sizes.out_width * row, row,
                               k * channels * item, channels * item, item))


def _weight_columns(layer, sizes):
    """The weights as ``((i, j, c) [+ bias], F)``: cols' columns against the filters."""
    matrix = layer._scratch.get("weight_last", (sizes.cols_width, layer.out_channels),
                                layer._dtype)
    k, channels = layer.kernel_size, layer.in_channels
    np.copyto(matrix[:sizes.window].reshape(k, k, channels, layer.out_channels),
              layer.params["weight"].transpose(2, 3, 1, 0))
    if layer.bias:
        matrix[-1] = layer.params["bias"]
    return matrix


def forward(layer, x):
    """``layer.forward(x)`` for a ``Conv2d`` (see the module's docstring)."""
    n, channels, height, width = x.shape
    sizes = _Sizes(layer, channels, height, width)
    pad, scratch, dtype = layer.padding, layer._scratch, layer._dtype
    layer._shape = x.shape
    if layer.stride == 1:   # for the input gradient by shifted rows
        layer._geometry_now = layer._geometry(height, width)
    # (N, Hp, Wp, C); the border stays zero: nothing else writes it
    padded = scratch.get("padded_last", (n, *sizes.padded, channels), dtype, zeroed=True)
    np.copyto(padded[:, pad:pad + height, pad:pad + width], x.transpose(0, 2, 3, 1))
    layer._padded_last = padded
    out = scratch.get("out", (n, layer.out_channels, sizes.out_height, sizes.out_width), dtype)
    chunks, block = _blocks(layer, n, sizes)
    cols, weight = _cols(layer, block, sizes), _weight_columns(layer, sizes)
    rows_out = scratch.get("rows_out", (block * sizes.pixels * layer.out_channels,), dtype)
    for first, count in chunks:
        used = count * sizes.pixels
        y = layer.backend.matmul(_im2col(layer, first, count, sizes, cols), weight,
                                 out=rows_out[:used * layer.out_channels].reshape(used, -1))
        np.copyto(out[first:first + count], y.reshape(count, sizes.out_height, sizes.out_width,
                                                      -1).transpose(0, 3, 1, 2))
        layer._cols_hold = (first, count, block)
    return out


def backward(layer, dout, need_input_grad):
    """``layer.backward(dout)`` for a ``Conv2d`` whose forward ran channels-last; fills its
    gradients and returns the input gradient (or None)."""
    n, channels, height, width = layer._shape
    sizes = _Sizes(layer, channels, height, width)
    pad, scratch, dtype = layer.padding, layer._scratch, layer._dtype
    filters, k, stride = layer.out_channels, layer.kernel_size, layer.stride
    chunks, block = _blocks(layer, n, sizes)
    cols = _cols(layer, block, sizes)
    by_shifts = need_input_grad and shifts_pay(layer, need_input_grad)
    col2im = need_input_grad and not by_shifts
    dy_rows = scratch.get("dy_rows", (block * sizes.pixels * filters,), dtype)
    grad = scratch.get("grad_last", (filters, sizes.cols_width), dtype)
    grad_part = scratch.get("grad_last_part", (filters, sizes.cols_width), dtype)
    if col2im:
        weight = _weight_columns(layer, sizes)
        dcols_flat = scratch.get("dcols_last", (block * sizes.pixels * sizes.window,), dtype)
        dpadded = scratch.get("dpadded_last", (block, *sizes.padded, channels), dtype)
        dx = scratch.get("dx", layer._shape, dtype)
    for first, count, opens, grads_to in layer._gradient_sums(chunks[::-1]):
        used = count * sizes.pixels
        if layer._cols_hold == (first, count, block):
            cols_used = cols[:used]
        else:   # the windows again: cheaper than keeping every block's cols from the forward pass
            cols_used = _im2col(layer, first, count, sizes, cols)
        layer._cols_hold = None
        dy = dy_rows[:used * filters].reshape(used, filters)
        np.copyto(dy.reshape(count, sizes.out_height, sizes.out_width, filters),
                  dout[first:first + count].transpose(0, 2, 3, 1))
        layer.backend.matmul(dy.T, cols_used, out=grad if opens else grad_part)
        if not opens:
            grad += grad_part
        if grads_to is not None:
            grads_to["weight"][...] = grad[:, :sizes.window].reshape(filters, k, k,
                                                                   channels).transpose(0, 3, 1, 2)
            if layer.bias:
                grads_to["bias"][...] = grad[:, -1]
        if not col2im:
            continue
        dcols = layer.backend.matmul(dy, weight[:sizes.window].T,
                                     out=dcols_flat[:used * sizes.window].reshape(used, -1))
        windows = _as_windows(dcols, count, sizes, layer)
        target = dpadded[:count]
        target[...] = 0
        for i in range(k):
            rows = slice(i, i + stride * (sizes.out_height - 1) + 1, stride)
            for s in range(sizes.out_width):
                run = target[:, rows, s * stride:s * stride + k]
                np.add(run, windows[:, :, s, i], out=run)
        np.copyto(dx[first:first + count],
                  target[:, pad:pad + height, pad:pad + width].transpose(0, 3, 1, 2))
    if by_shifts:
        return backward_by_shifts(layer, dout, need_input_grad, weight_grad=False)
    return dx if need_input_grad else None
