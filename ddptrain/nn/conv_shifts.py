"""A stride-1 convolution's backward pass with the kernel's columns folded into the products.

With wide rows (see ``conv.py``), a window offset ``(i, j)`` is the flat
offset ``i * Wp + j`` into a padded sample (``Wp`` its padded width), and the
output pixel ``t`` of a sample reads ``x_pad[t + i * Wp + j]``. The plain
backward pass multiplies ``dY`` against im2col's ``C * k * k`` rows and adds
``k * k`` rows of ``dcols`` back onto the input (col2im): ``k * k * C``
copies and as many additions per output pixel, with products whose inner
dimension is only ``F``.

Shifting ``dY`` instead moves ``j`` to the other side: with
``dY_j[t'] = dY[t' - j]`` (``k`` copies of ``dY``, each shifted by ``j``
along the flat pixel axis),

    dW[f, c, i, j] = sum over t' of dY_j[f, t'] * x_pad[c, t' + i * Wp]
    dx_pad[c, t' + i * Wp] += sum over f, j of W[f, c, i, j] * dY_j[f, t']

so both products take the ``k * F`` rows of the shifted ``dY`` (a longer
inner dimension), im2col needs only the ``k`` row offsets ``i`` (``k * C``
rows), and col2im only ``k`` additions of ``C`` rows. The shifts never mix
pixels of different rows or samples: a valid ``t`` ends ``k - 1`` values
before its wide row does, and the wrapped pixels of ``dY`` are zero, so what
a shift moves in from the left is zero too. The arithmetic is the same
count of multiply-adds; only the copies and additions shrink, from
``2 * k * k * C`` per pixel to ``k * (2 * C + F)``.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided


def shifts_pay(layer, need_input_grad):
    """Whether the shifted products copy and add less than im2col and col2im (stride 1 only)."""
    if layer.stride != 1:
        return False
    k, c, f = layer.kernel_size, layer.in_channels, layer.out_channels
    shifted = k * (c + f) + (k * c if need_input_grad else 0)
    plain = k * k * c * (2 if need_input_grad else 1)
    return shifted < plain


def backward_by_shifts(layer, dout, need_input_grad, weight_grad=True):
    """``layer.backward(dout)`` for a stride-1 ``Conv2d`` whose forward ran last (see the module's
    docstring); fills its gradients and returns the input gradient (or None).

    ``weight_grad=False``: the input gradient only (the weights' from a channels-last forward:
    ``conv_channels_last.py``), which needs neither the padded input nor im2col.
    """
    n, channels, height, width = layer._shape
    geometry, k, pad, filters = layer._geometry_now, layer.kernel_size, layer.padding, \
        layer.out_channels
    chunks, block = layer._chunks(n, geometry)
    dwide = layer._wide(block, geometry, "dwide")
    scratch, dtype, pixels = layer._scratch, layer._dtype, geometry.pixels
    rows = channels * k + layer.bias
    columns = block * pixels
    if weight_grad:
        # x_pad at the k row offsets, (C*k [+ a row of ones for the bias], samples * pixels)
        x_rows = scratch.get("row_cols", (rows * columns,), dtype).reshape(rows, columns)
        if layer.bias:
            x_rows[-1] = 1
        grad = scratch.get("shift_grad", (rows, k * filters), dtype)
        grad_part = scratch.get("shift_grad_part", (rows, k * filters), dtype)
    # dY shifted by j = 0 .. k-1, ((j, f), samples * pixels)
    shifted = scratch.get("shifted_dy", (k * filters * columns,), dtype)
    shifted = shifted.reshape(k * filters, columns)
    if need_input_grad:
        # W as ((c, i), (j, f)): the rows of dx_pad at row offset i, from the shifted dY
        weight_rows = scratch.get("shift_weight", (channels * k, k * filters), dtype)
        np.copyto(weight_rows.reshape(channels, k, k, filters),
                  layer.params["weight"].transpose(1, 2, 3, 0))
        row_grads = scratch.get("row_grads", (channels * k * columns,), dtype)
        dpadded = layer._padded(block, geometry, "dpadded")
        per_sample = channels * geometry.padded_height * geometry.padded_width
        dbody = dpadded[:block * per_sample].reshape(block, channels, geometry.padded_height,
                                                     geometry.padded_width)
        dx = scratch.get("dx", layer._shape, dtype)
    for first, count, opens, grads_to in layer._gradient_sums(chunks):
        used = count * pixels
        dwide_used = dwide[:, :used].reshape(filters, count, geometry.out_height,
                                             geometry.cols_width)
        dwide_used[..., :geometry.out_width] = dout[first:first + count].transpose(1, 0, 2, 3)
        for j in range(k):
            # what moves in from the left is the previous pixels' wrapped zeros: none at the start
            shifted[j * filters:(j + 1) * filters, :j] = 0
            shifted[j * filters:(j + 1) * filters, j:used] = dwide[:, :used - j]
        shifted_used = shifted[:, :used]
        if weight_grad:
            x_used = x_rows[:, :used]
            windows = layer._windows(layer._padded_input, first, count, geometry)
            x_used[:channels * k].reshape(channels, k, count, geometry.out_height,
                                          geometry.cols_width)[...] = windows[:, :, 0]
            layer.backend.matmul(x_used, shifted_used.T, out=grad if opens else grad_part)
            if not opens:
                grad += grad_part
            if grads_to is not None:
                grads_to["weight"][...] = grad[:channels * k].reshape(channels, k, k,
                                                                    filters).transpose(3, 0, 1, 2)
                if layer.bias:
                    grads_to["bias"][...] = grad[-1, :filters]   # j = 0: dY unshifted
        if not need_input_grad:
            continue
        row_grads_used = layer.backend.matmul(
            weight_rows, shifted_used,
            out=row_grads[:channels * k * used].reshape(channels * k, used))
        row_grads_used = row_grads_used.reshape(channels, k, count, pixels)
        dpadded[...] = 0
        targets = _row_targets(dpadded, channels, k, count, geometry)
        for i in range(k):
            np.add(targets[:, i], row_grads_used[:, i], out=targets[:, i])
        np.copyto(dx[first:first + count], dbody[:count, :, pad:pad + height, pad:pad + width])
    layer._cols_hold = None
    return dx if need_input_grad else None


def _row_targets(dpadded, channels, k, count, geometry):
    """Where row offset ``i`` of each channel adds onto the padded input gradient: ``(C, k, samples,
    pixels)``, the pixel axis one contiguous run per sample (valid rows never pass its end)."""
    item, width = dpadded.itemsize, geometry.padded_width
    plane = geometry.padded_height * width * item
    return as_strided(dpadded, shape=(channels, k, count, geometry.pixels),
                      strides=(plane, width * item, channels * plane, item))
