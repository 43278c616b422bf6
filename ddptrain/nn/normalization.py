"""Batch normalisation whose statistics are those of the whole global batch, however it is split.

In training mode ``BatchNorm`` normalises each channel by the mean and the
(biased) variance of the batch. In data-parallel training each rank holds only
part of the global batch: with its own rows' statistics (what plain PyTorch
DDP does), the model trained would depend on how many ranks there are. Here
the layer is handed ``sum_over_ranks``, a function that sums an array over the
ranks in place (``comm.allreduce_``; the identity in one process, or for
``--batchnorm local``), and uses it twice:

* **forward**: each rank computes, per channel, its value count, its values'
  mean and their centred sum of squares, exactly: the channel's values are
  centred on one float32 value near their mean, the mean of the first
  sample's values (the centred values are kept for the output and for
  backward), and that centre is corrected by the centred values' own sum in
  float64. It then
  shifts its mean by a value every rank shares (the running mean), and one
  Allreduce of ``[count, count * (mean - shift), centred + count * (mean -
  shift)**2]``, in float64, gives the global mean and variance. Centred sums
  of squares do not cancel catastrophically the way ``sum(x**2) - count *
  mean**2`` in float32 does.
* **backward**: with ``x_hat = (x - mean) / sqrt(var + eps)`` and
  ``y = weight * x_hat + bias``, the input gradient over the global batch of
  ``M`` values per channel is the three-term formula

      dx = weight / sqrt(var + eps) * (dy - sum(dy) / M - x_hat * sum(dy * x_hat) / M)

  whose two sums run over the *global* batch: one more Allreduce of those two
  per-channel sums. The parameter gradients need no Allreduce of their own
  (``dbias = sum(dy)``, ``dweight = sum(dy * x_hat)`` over this rank's rows
  are its shares, which the step's gradient Allreduce adds up).

The passes go through the batch in blocks of samples (``BLOCK_VALUES``), so
that the second and later passes over a block find it in the cache, and
per-channel constants are vectors of a sample's length, the operand numpy
runs its fast loop with.

Running statistics follow PyTorch: ``running = (1 - momentum) * running +
momentum * batch``, with the unbiased variance ``var * M / (M - 1)``; they are
the same on every rank (computed from global values) and evaluation uses them.
"""

from __future__ import annotations

import math

import numpy as np

from ddptrain.nn import normalization_groups
from ddptrain.nn.layer import Layer, ShapeError, no_reduction


class BatchNorm(Layer):
    """Batch normalisation over ``(N, C)`` or, per channel over N, H and W, ``(N, C, H, W)``
    inputs.

    ``in_place`` is decided by ``Sequential``, never by hand: when the layer
    before this one does not read its own output again (``output_is_scratch``),
    training centres the input where it lies instead of into an array of its
    own, which backward keeps: one activation-sized array fewer to stream
    through the cache each step (docs/cnn.md).
    """

    output_is_scratch = True        # backward reads x_hat, kept apart from the output
    input_grad_is_scratch = True

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        if not (int(num_features) > 0 and eps > 0 and 0 <= momentum <= 1):
            raise ValueError(f"BatchNorm({num_features}, eps={eps}, momentum={momentum}): needs a "
                             "positive number of features, eps > 0 and 0 <= momentum <= 1")
        self.num_features, self.eps, self.momentum = int(num_features), float(eps), float(momentum)
        self.sum_over_ranks = no_reduction   # comm.allreduce_ for statistics of the global batch
        self.in_place = False
        self._centred = None   # x - centre, from a training forward until its backward
        self._inv_std = None
        self._count = 0

    def config(self):
        return {"num_features": self.num_features, "eps": self.eps, "momentum": self.momentum}

    def plan_in_place(self, before, after):
        self.in_place = before is not None and before.output_is_scratch

    def label(self):
        return f"BatchNorm {self.num_features}"

    def param_shapes(self):
        return {"weight": (self.num_features,), "bias": (self.num_features,)}

    def buffer_shapes(self):
        return {"running_mean": (self.num_features,), "running_var": (self.num_features,)}

    def init_params(self, rng):
        self.params["weight"][...] = 1
        self.params["bias"][...] = 0

    def init_buffers(self):
        self.buffers["running_mean"][...] = 0
        self.buffers["running_var"][...] = 1

    def output_shape(self, input_shape):
        if len(input_shape) not in (1, 3) or input_shape[0] != self.num_features:
            raise ShapeError(f"{self.name or 'BatchNorm'} ({self.label()}) takes "
                             f"{self.num_features} features or channels per sample, not "
                             f"{'x'.join(map(str, input_shape))}")
        return tuple(input_shape)

    def values_per_channel(self, sample_shape):
        """How many values of each channel one sample contributes to the statistics (H * W, or
        1)."""
        return math.prod(sample_shape[1:])

    def _groups(self, x):
        """``x`` as ``(N, C, S)``: S values of each channel per sample (H * W, or 1 for rows)."""
        # not -1: a batch may be empty
        return x.reshape(x.shape[0], self.num_features, math.prod(x.shape[2:]))

    # --reproducible in groups of rows (layer.py, normalization_groups.py): statistics of the
    # whole batch from each group's sums
    sums_over_rows = True

    def forward(self, x):
        x3 = self._groups(x)
        if self.training and self.row_groups is not None:
            return normalization_groups.forward(self, x3).reshape(x.shape)
        if self.training:
            sums = self._local_sums(x3)
            self.sum_over_ranks(sums)   # DDP: counts, shifted sums and centred squares, every rank
            mean, var, self._count = self._statistics(sums)
            self._update_running_statistics(mean, var, self._count)
            # y from x - centre: no cancellation
            return self._normalise(x3, mean, var, self._centred, self._centre).reshape(x.shape)
        mean, var = self.buffers["running_mean"].astype(np.float64), self.buffers["running_var"]
        # for the weight gradient in evaluation mode (the input is not written before backward)
        self._x3 = x3
        return self._normalise(x3, mean, var, x3, 0.0).reshape(x.shape)

    def _normalise(self, x3, mean, var, source, origin):
        inv_std = 1.0 / np.sqrt(var.astype(np.float64) + self.eps)
        self._mean, self._inv_std = mean, inv_std
        # y = weight * (x - mean) * inv_std + bias = (x - origin) * scale + shift: two passes.
        scale = self.params["weight"] * inv_std
        shift = self.params["bias"] + (origin - mean) * scale
        out = self._scratch.get("out", x3.shape, x3.dtype)
        out2, source2 = self._flat(out), self._flat(source)
        scale, shift = self._per_value("scale", scale, x3), self._per_value("shift", shift, x3)
        for block in self._blocks(x3):
            np.multiply(source2[block], scale, out=out2[block])
            out2[block] += shift
        return out

    # values of each array per block of samples: a few blocks' worth stay in a core's L2 cache
    BLOCK_VALUES = 1 << 17

    def _blocks(self, x3):
        """Slices of samples, about ``BLOCK_VALUES`` values each, that the passes go through one
        at a time.

        Each pass over a whole activation reads it from memory again; block by
        block, the second and later passes over a block find it in the cache
        (in a whole training step, where the activations have long left it).
        """
        n, per_sample = x3.shape[0], x3.shape[1] * x3.shape[2]
        step = max(1, self.BLOCK_VALUES // max(per_sample, 1))
        return [slice(first, min(first + step, n)) for first in range(0, n, step)]

    def _flat(self, a3):
        """``(N, C * S)``: the view in which per-channel constants are one vector of ``C * S``."""
        return a3.reshape(a3.shape[0], math.prod(a3.shape[1:]))

    def _per_value(self, name, per_channel, x3):
        """``per_channel`` (C,) repeated S times each, ``(C * S,)`` in x's dtype: the operand
        that broadcasts over the batch.

        Against a full vector numpy runs its fast loop over the ``C * S``
        contiguous values of a sample; against ``(C, 1)`` it takes its loop
        for a scalar operand, one call per ``S`` values, measured 1.45x slower
        (numpy 2.4, float32, S = 576).
        """
        per_sample = x3.shape[2]
        vector = self._scratch.get(name, (self.num_features * per_sample,), x3.dtype)
        np.copyto(vector.reshape(self.num_features, per_sample),
                  np.asarray(per_channel, dtype=x3.dtype).reshape(-1, 1))
        return vector

    def _channel_sums(self, a3):
        """Per channel, the sum of ``a3``'s values in float64, ``(C,)``: products with a vector of
        ones (BLAS, about twice as fast as ``a.sum(axis=...)``) per sample, then over the samples
        in float64."""
        n, channels, per_sample = a3.shape
        if per_sample == 1:
            return np.matmul(self._scratch.constant(1, n, a3.dtype),
                             a3[:, :, 0]).astype(np.float64)
        sums = np.matmul(a3.reshape(n * channels, per_sample),
                         self._scratch.constant(1, per_sample, a3.dtype))
        return sums.reshape(n, channels).sum(axis=0, dtype=np.float64)

    def _channel_dots(self, a3, b3):
        """Per channel, the sum of ``a3 * b3`` in float64, ``(C,)``: per sample in one pass, then
        over the samples in float64."""
        n, channels, per_sample = a3.shape
        if per_sample == 1:
            return np.einsum("nc,nc->c", a3[:, :, 0], b3[:, :, 0]).astype(np.float64)
        dots = np.einsum("ij,ij->i", a3.reshape(n * channels, per_sample),
                         b3.reshape(n * channels, per_sample))
        return dots.reshape(n, channels).sum(axis=0, dtype=np.float64)

    def _local_sums(self, x3):
        """What this rank adds to the global batch's statistics: ``[count, count * (mean - shift),
        m2 + count * (mean - shift)**2]`` per channel, in float64.

        This rank's values of each channel are centred on one float32 value
        within the spread of their mean, the mean of the first sample's values
        (one pass over the batch fewer than the batch's own mean), so that
        their squares do not cancel; ``centred`` is kept (backward and the
        output need it). The centre is then corrected exactly by the centred
        values' own sum: they sum to M * (mean - c), and sum((x - c)^2) = M2 +
        M * (mean - c)^2, both in float64. The ranks' statistics are combined
        about a shift they all share.
        """
        n, channels, per_sample = x3.shape
        count = n * per_sample   # this rank's values per channel
        if not count:
            self._centre, self._centred = np.zeros(channels), x3
            local_mean = local_m2 = np.zeros(channels)
        else:
            centre = (self._channel_sums(x3[:1]) / per_sample).astype(x3.dtype)
            centred = x3 if self.in_place else self._scratch.get("centred", x3.shape, x3.dtype)
            x2, centred2, centre_values = (self._flat(x3), self._flat(centred),
                                           self._per_value("centre", centre, x3))
            centred_sum, squares = np.zeros(channels), np.zeros(channels)
            for block in self._blocks(x3):
                np.subtract(x2[block], centre_values, out=centred2[block])
                centred_sum += self._channel_sums(centred[block])
                squares += self._channel_dots(centred[block], centred[block])
            # backward: x = centre + centred
            self._centre, self._centred = centre.astype(np.float64), centred
            local_mean = self._centre + centred_sum / count
            local_m2 = squares - centred_sum ** 2 / count
        shift = self.buffers["running_mean"].astype(np.float64)   # the same on every rank
        offset = local_mean - shift
        return np.concatenate([[count], count * offset, local_m2 + count * offset * offset])

    def _statistics(self, sums):
        """The mean and biased variance of each channel over the global batch, and its count, from
        ``_local_sums`` added over the ranks."""
        channels = self.num_features
        total, shifted_sum, m2 = sums[0], sums[1:channels + 1], sums[channels + 1:]
        mean_offset = shifted_sum / total
        var = np.maximum(m2 / total - mean_offset * mean_offset, 0.0)
        shift = self.buffers["running_mean"].astype(np.float64)
        return shift + mean_offset, var, total

    def _update_running_statistics(self, mean, var, count):
        momentum, unbiased = self.momentum, var * count / max(count - 1, 1)
        running_mean, running_var = self.buffers["running_mean"], self.buffers["running_var"]
        running_mean[...] = (1 - momentum) * running_mean + momentum * mean
        running_var[...] = (1 - momentum) * running_var + momentum * unbiased

    def backward(self, dout, need_input_grad=True):
        if not self.training:
            return self._backward_evaluating(dout, need_input_grad)
        if self.row_groups is not None:
            return normalization_groups.backward(self, dout, need_input_grad)
        dy3, inv_std = self._groups(dout), self._inv_std
        if self._centred is None:
            raise RuntimeError(f"{self.name or 'BatchNorm'}: backward once per training forward "
                               "(the last one's centred values became its input gradient)")
        # x_hat = (centred + offset) * inv_std, with centred = x - centre, offset = centre - mean.
        offset = self._centre - self._mean
        dy_sum, dy_centred = np.zeros(self.num_features), np.zeros(self.num_features)
        for block in self._blocks(dy3):   # the block still in the cache for its second sum
            dy_sum += self._channel_sums(dy3[block])
            dy_centred += self._channel_dots(dy3[block], self._centred[block])
        dy_xhat_sum = inv_std * (dy_centred + offset * dy_sum)
        # This rank's shares of the parameter gradients; the step's gradient Allreduce adds them up.
        self.grads["bias"][...] = dy_sum
        self.grads["weight"][...] = dy_xhat_sum
        if not need_input_grad:
            return None
        sums = np.concatenate([dy_sum, dy_xhat_sum])
        self.sum_over_ranks(sums)   # DDP: the two sums over the global batch
        scale = self.params["weight"] * inv_std
        mean_dy, mean_dy_xhat = (sums[:self.num_features] / self._count,
                                 sums[self.num_features:] / self._count)
        # dx = scale * (dy - mean_dy - x_hat * mean_dy_xhat)
        #    = scale * (dy + ratio * centred + constant),   per channel:
        ratio = -inv_std * mean_dy_xhat
        constant = ratio * offset - mean_dy
        # dx over the centred values, which nothing reads after this pass: one activation-sized
        # array fewer to stream through the cache. A second backward needs a forward first.
        centred, self._centred = self._centred, None
        dy2, dx2 = self._flat(dy3), self._flat(centred)
        ratio, constant, scale = (self._per_value("ratio", ratio, dy3),
                                  self._per_value("constant", constant, dy3),
                                  self._per_value("scale", scale, dy3))
        for block in self._blocks(dy3):
            part = np.multiply(dx2[block], ratio, out=dx2[block])   # the centred values, then dx
            part += dy2[block]
            part += constant
            part *= scale
        return centred.reshape(dout.shape)

    def _backward_evaluating(self, dout, need_input_grad):
        dy3, weight, inv_std = self._groups(dout), self.params["weight"], self._inv_std
        scale = weight * inv_std
        dy_sum = self._channel_sums(dy3)
        self.grads["bias"][...] = dy_sum
        # Running statistics: x_hat = (x - mean) * inv_std with constants, so dx is a plain
        # scaling.
        dy_x_sum = self._channel_dots(dy3, self._x3)
        self.grads["weight"][...] = inv_std * (dy_x_sum - self._mean * dy_sum)
        if not need_input_grad:
            return None
        dx = self._scratch.get("dx", dout.shape, dout.dtype)
        np.multiply(self._flat(dy3), self._per_value("scale", scale, dy3),
                    out=self._flat(self._groups(dx)))
        return dx
