"""BatchNorm in training over a batch cut into groups of rows whose sums do not depend on the rows
beside them (``--reproducible``'s groups: ``training/groups.py``).

The layer is told its groups (``layer.row_groups``: the ``(start, stop)``
rows of each, consecutive), where each group's parameter gradients go
(``layer.group_grads``) and how the groups' sums are added over the whole
batch (``layer.sum_groups``: ``(groups, K)`` -> ``(K,)``, in group order).
What differs from ``BatchNorm.forward``: every number summed over rows is
summed per group, from that group's values alone:

* each group is centred on its first sample's mean (as a rank's rows are,
  on their first sample's, in ``BatchNorm``), so that its squares do not
  cancel;
* a row's sums are a reduction over that row's values alone, which numpy
  computes the same way wherever the row lies (tests/test_reproducible.py
  holds it to that on every CPU the suite runs on, with rows of odd sizes);
  a group's, its rows' added in order;
* the passes that sum nothing (centring, the output, the input gradient) run
  over every group at once, each row with its group's constants.

The statistics, running statistics and gradients are then those of the
whole batch, the same formulas as ``BatchNorm``'s (``_statistics``).
"""

from __future__ import annotations

import numpy as np


def _row_sums(a3):
    """Per row and channel, the sum of ``a3``'s values, ``(N, C)`` in float64 (numpy's pairwise
    sum of the row's values in their own type, as ``BatchNorm`` takes a sample's)."""
    return np.add.reduce(a3, axis=2).astype(np.float64)


def _row_dots(a3, b3):
    """Per row and channel, the sum of ``a3 * b3``, ``(N, C)`` in float64 (one pass, no
    product array)."""
    return np.einsum("ncs,ncs->nc", a3, b3).astype(np.float64)


def _by_group(layer, per_row):
    """The groups' sums of ``per_row`` (``(N, C)``), ``(groups, C)``, each in row order."""
    if not layer.row_groups:
        return np.zeros((0, per_row.shape[1]))
    return np.add.reduceat(per_row, _starts(layer), axis=0)


def _starts(layer):
    return np.array([start for start, _ in layer.row_groups], dtype=np.int64)


def forward(layer, x3):
    """``layer.forward`` in training, for ``x3`` (``(N, C, S)``) in ``layer.row_groups``."""
    _, _, per_sample = x3.shape
    sizes = np.array([stop - start for start, stop in layer.row_groups], dtype=np.int64)
    centres = (_row_sums(x3[_starts(layer)]) / per_sample).astype(x3.dtype)   # (groups, C)
    centre_rows = np.repeat(centres, sizes, axis=0)                            # (N, C)
    centred = x3 if layer.in_place else layer._scratch.get("centred", x3.shape, x3.dtype)
    np.subtract(x3, centre_rows[:, :, None], out=centred)
    counts = (sizes * per_sample).astype(np.float64)[:, None]
    centred_sums = _by_group(layer, _row_sums(centred))
    squares = _by_group(layer, _row_dots(centred, centred))
    shift = layer.buffers["running_mean"].astype(np.float64)   # the same on every rank
    offset = centres + centred_sums / counts - shift   # no group is empty
    m2 = squares - centred_sums ** 2 / counts
    sums = np.concatenate([counts, counts * offset, m2 + counts * offset * offset], axis=1)
    total = layer.sum_groups(sums)   # DDP: every group of the batch, in group order
    mean, var, layer._count = layer._statistics(total)
    layer._update_running_statistics(mean, var, layer._count)
    inv_std = 1.0 / np.sqrt(var + layer.eps)
    layer._mean, layer._inv_std = mean, inv_std
    layer._centred, layer._centre_rows = centred, centre_rows.astype(np.float64)
    # y = (x - centre) * scale + bias + (centre - mean) * scale, the centre the row's group's
    scale = layer.params["weight"] * inv_std
    shift_rows = (layer.params["bias"] + (layer._centre_rows - mean) * scale).astype(x3.dtype)
    out = layer._scratch.get("out", x3.shape, x3.dtype)
    np.multiply(centred, scale.astype(x3.dtype)[:, None], out=out)
    out += shift_rows[:, :, None]
    return out


def backward(layer, dout, need_input_grad):
    """``layer.backward`` in training, after ``forward``: each group's parameter gradients into
    ``layer.group_grads``, and the input gradient from the whole batch's two sums."""
    dy3, inv_std, centred = layer._groups(dout), layer._inv_std, layer._centred
    if centred is None:
        raise RuntimeError(f"{layer.name or 'BatchNorm'}: backward once per training forward")
    offset_rows = layer._centre_rows - layer._mean                     # (N, C)
    dy_sums = _by_group(layer, _row_sums(dy3))
    dy_xhat_sums = inv_std * (_by_group(layer, _row_dots(dy3, centred))
                              + offset_rows[_starts(layer)] * dy_sums)
    layer.group_grads["bias"][...] = dy_sums
    layer.group_grads["weight"][...] = dy_xhat_sums
    if not need_input_grad:
        return None
    total = layer.sum_groups(np.concatenate([dy_sums, dy_xhat_sums], axis=1))   # DDP
    channels = layer.num_features
    mean_dy, mean_dy_xhat = total[:channels] / layer._count, total[channels:] / layer._count
    # dx = scale * (dy + ratio * centred + constant), the constant the row's group's
    ratio = -inv_std * mean_dy_xhat
    constant_rows = (ratio * offset_rows - mean_dy).astype(dy3.dtype)
    layer._centred = None
    dx = np.multiply(centred, ratio.astype(dy3.dtype)[:, None], out=centred)
    dx += dy3
    dx += constant_rows[:, :, None]
    dx *= (layer.params["weight"] * inv_std).astype(dy3.dtype)[:, None]
    return dx.reshape(dout.shape)
