"""Batch normalisation whose statistics are those of the whole global batch, however it is split.

In training mode ``BatchNorm`` normalises each channel by the mean and the
(biased) variance of the batch. In data-parallel training each rank holds only
part of the global batch: with its own rows' statistics (what plain PyTorch
DDP does), the model trained would depend on how many ranks there are. Here
the layer is handed ``sum_over_ranks``, a function that sums an array over the
ranks in place (``comm.allreduce_``; the identity in one process, or for
``--batchnorm local``), and uses it twice:

* **forward**: each rank computes, per channel, its row count, its rows' mean
  and their centred sum of squares (two passes, exact), shifts its mean by a
  value every rank shares (the running mean), and one Allreduce of
  ``[count, count * (mean - shift), centred + count * (mean - shift)**2]``, in
  float64, gives the global mean and variance. Summing centred squares about
  a shared shift, in float64, does not cancel catastrophically the way
  ``sum(x**2) - count * mean**2`` in float32 does.
* **backward**: with ``x_hat = (x - mean) / sqrt(var + eps)`` and
  ``y = weight * x_hat + bias``, the input gradient over the global batch of
  ``M`` values per channel is the three-term formula

      dx = weight / sqrt(var + eps) * (dy - sum(dy) / M - x_hat * sum(dy * x_hat) / M)

  whose two sums run over the *global* batch: one more Allreduce of those two
  per-channel sums. The parameter gradients need no Allreduce of their own
  (``dbias = sum(dy)``, ``dweight = sum(dy * x_hat)`` over this rank's rows
  are its shares, which the step's gradient Allreduce adds up).

Running statistics follow PyTorch: ``running = (1 - momentum) * running +
momentum * batch``, with the unbiased variance ``var * M / (M - 1)``; they are
the same on every rank (computed from global values) and evaluation uses them.
"""

from __future__ import annotations

import math

import numpy as np

from .nn import Layer, ShapeError, no_reduction


class BatchNorm(Layer):
    """Batch normalisation over ``(N, C)`` or, per channel over N, H and W, ``(N, C, H, W)`` inputs."""

    output_is_scratch = True        # backward reads x_hat, kept apart from the output
    input_grad_is_scratch = True

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        if not (int(num_features) > 0 and eps > 0 and 0 <= momentum <= 1):
            raise ValueError(f"BatchNorm({num_features}, eps={eps}, momentum={momentum}): needs a positive number "
                             f"of features, eps > 0 and 0 <= momentum <= 1")
        self.num_features, self.eps, self.momentum = int(num_features), float(eps), float(momentum)
        self.sum_over_ranks = no_reduction   # comm.allreduce_ for statistics of the global batch
        self._x_hat = self._inv_std = None
        self._count = 0

    def config(self):
        return {"num_features": self.num_features, "eps": self.eps, "momentum": self.momentum}

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
            raise ShapeError(f"{self.name or 'BatchNorm'} ({self.label()}) takes {self.num_features} features or "
                             f"channels per sample, not {'x'.join(map(str, input_shape))}")
        return tuple(input_shape)

    def values_per_channel(self, sample_shape):
        """How many values of each channel one sample contributes to the statistics (H * W, or 1)."""
        return math.prod(sample_shape[1:])

    def _axes(self, x):
        return (0,) if x.ndim == 2 else (0, 2, 3)

    def _per_channel(self, array, x):
        """A per-channel vector shaped to broadcast against ``x``."""
        return array.reshape((1, -1) + (1,) * (x.ndim - 2))

    def forward(self, x):
        if self.training:
            mean, var, self._count = self._batch_statistics(x)
            self._update_running_statistics(mean, var, self._count)
        else:
            mean, var = self.buffers["running_mean"], self.buffers["running_var"]
        inv_std = (1.0 / np.sqrt(var + self.eps)).astype(x.dtype)
        x_hat = self._scratch.get("x_hat", x.shape, x.dtype)
        np.subtract(x, self._per_channel(mean.astype(x.dtype), x), out=x_hat)
        x_hat *= self._per_channel(inv_std, x)
        out = self._scratch.get("out", x.shape, x.dtype)
        np.multiply(x_hat, self._per_channel(self.params["weight"], x), out=out)
        out += self._per_channel(self.params["bias"], x)
        self._x_hat, self._inv_std = x_hat, inv_std
        return out

    def _batch_statistics(self, x):
        """The mean and biased variance of each channel over the global batch, and its count: one Allreduce."""
        axes, channels = self._axes(x), self.num_features
        count = x.size // channels   # this rank's values per channel
        if count:
            local_mean = x.mean(axis=axes, dtype=np.float64)
            centred = self._scratch.get("x_hat", x.shape, x.dtype)   # free until forward fills it
            np.subtract(x, self._per_channel(local_mean.astype(x.dtype), x), out=centred)
            np.square(centred, out=centred)
            local_m2 = centred.sum(axis=axes, dtype=np.float64)
        else:
            local_mean = local_m2 = np.zeros(channels)
        shift = self.buffers["running_mean"].astype(np.float64)   # the same on every rank
        offset = local_mean - shift
        sums = np.concatenate([[count], count * offset, local_m2 + count * offset * offset])
        self.sum_over_ranks(sums)   # DDP: counts, shifted sums and centred squares of every rank
        total, shifted_sum, m2 = sums[0], sums[1:channels + 1], sums[channels + 1:]
        mean_offset = shifted_sum / total
        var = np.maximum(m2 / total - mean_offset * mean_offset, 0.0)
        return shift + mean_offset, var, total

    def _update_running_statistics(self, mean, var, count):
        momentum, unbiased = self.momentum, var * count / max(count - 1, 1)
        running_mean, running_var = self.buffers["running_mean"], self.buffers["running_var"]
        running_mean[...] = (1 - momentum) * running_mean + momentum * mean
        running_var[...] = (1 - momentum) * running_var + momentum * unbiased

    def backward(self, dout, need_input_grad=True):
        axes, x_hat = self._axes(dout), self._x_hat
        dy_sum = dout.sum(axis=axes, dtype=np.float64)
        product = self._scratch.get("product", dout.shape, dout.dtype)
        dy_xhat_sum = np.multiply(dout, x_hat, out=product).sum(axis=axes, dtype=np.float64)
        # This rank's shares of the parameter gradients; the step's gradient Allreduce adds them up.
        self.grads["bias"][...] = dy_sum
        self.grads["weight"][...] = dy_xhat_sum
        if not need_input_grad:
            return None
        scale = self._per_channel(self.params["weight"] * self._inv_std, dout)
        dx = self._scratch.get("dx", dout.shape, dout.dtype)
        if not self.training:   # running statistics: constants, so the gradient is a plain scaling
            return np.multiply(dout, scale, out=dx)
        sums = np.concatenate([dy_sum, dy_xhat_sum])
        self.sum_over_ranks(sums)   # DDP: the two sums over the global batch
        mean_dy = (sums[:self.num_features] / self._count).astype(dout.dtype)
        mean_dy_xhat = (sums[self.num_features:] / self._count).astype(dout.dtype)
        np.multiply(x_hat, self._per_channel(mean_dy_xhat, dout), out=dx)
        np.subtract(dout, dx, out=dx)
        dx -= self._per_channel(mean_dy, dout)
        dx *= scale
        return dx
