"""The basic layers: ``Flatten``, ``Linear``, ``ReLU``, and a standalone ``Softmax``."""

from __future__ import annotations

import math

import numpy as np

from ddptrain.nn.columns import disown
from ddptrain.nn.layer import Layer, ShapeError, shape_text


class Flatten(Layer):
    """``(batch, d1, d2, ...)`` -> ``(batch, d1 * d2 * ...)``: a view, no copy, for contiguous
    input."""

    rowwise = True

    def __init__(self):
        super().__init__()
        self._input_shape = None

    def output_shape(self, input_shape):
        return (math.prod(input_shape),)

    def forward(self, x):
        self._input_shape = x.shape
        return x.reshape(x.shape[0], math.prod(x.shape[1:]))   # not -1: a batch may be empty

    def backward(self, dout, need_input_grad=True):
        return dout.reshape(self._input_shape) if need_input_grad else None


class Linear(Layer):
    """``y = x @ W + b`` with ``W`` of shape ``(n_in, n_out)``.

    ``init="he"`` draws ``W ~ N(0, 2/n_in)`` (for layers followed by ReLU);
    ``init="glorot"`` draws ``W ~ U(-a, a)`` with ``a = sqrt(6/(n_in + n_out))``.
    Biases start at zero; ``bias=False`` leaves them out (before a BatchNorm,
    which would cancel them).
    """

    takes_features = True
    splits_columns = True

    def __init__(self, n_in, n_out, init="he", bias=True):
        super().__init__()
        if init not in ("he", "glorot"):
            raise ValueError(f"unknown init {init!r}")
        self.n_in, self.n_out, self.init, self.bias = int(n_in), int(n_out), init, bool(bias)
        self._x = None

    def config(self):
        return {"n_in": self.n_in, "n_out": self.n_out, "init": self.init, "bias": self.bias}

    @property
    def output_is_scratch(self):
        # backward needs the input and the weights, not the output; but in blocks of columns
        # shared through the node's memory (columns.output) every rank reads the same array, which
        # one rank must not write over (a BatchNorm's centring) while another reads it
        columns = self.columns
        return columns is None or not columns.shares_memory or columns.everywhere(self.n_out)

    input_grad_is_scratch = output_is_scratch   # the same: the input gradient may be shared too

    def label(self):
        return f"Linear {self.n_in}->{self.n_out}"

    def param_shapes(self):
        return {"weight": (self.n_in, self.n_out), **({"bias": (self.n_out,)} if self.bias else {})}

    def init_params(self, rng):
        weight = self.params["weight"]
        if self.init == "he":
            weight[...] = rng.standard_normal(weight.shape) * math.sqrt(2.0 / self.n_in)
        else:
            limit = math.sqrt(6.0 / (self.n_in + self.n_out))
            weight[...] = rng.uniform(-limit, limit, size=weight.shape)
        if self.bias:
            self.params["bias"][...] = 0

    def output_shape(self, input_shape):
        if tuple(input_shape) != (self.n_in,):
            raise ShapeError(f"{self.name or 'Linear'} ({self.label()}) takes {self.n_in} features "
                             f"per sample, not {shape_text(input_shape)}")
        return (self.n_out,)

    def flops(self, input_shape):
        return 2 * self.n_in * self.n_out

    def forward(self, x):
        self._x = x
        if self.columns is not None:
            return self._forward_in_blocks(x)
        out = self._scratch.get("out", (x.shape[0], self.n_out), self.params["weight"].dtype)
        self.backend.matmul(x, self.params["weight"], out=out)
        if self.bias:
            out += self.params["bias"]
        return out

    def backward(self, dout, need_input_grad=True):
        if self.columns is not None:
            return self._backward_in_blocks(dout, need_input_grad)
        # dL/dW = x^T dout and dL/db = sum over the batch of dout: sums over
        # samples, so whatever normalisation the loss applied carries through.
        self.backend.matmul(self._x.T, dout, out=self.grads["weight"])
        if self.bias:
            # The column sums of dout as a product with a vector of ones: BLAS
            # does it about twice as fast as np.sum(dout, axis=0).
            self.backend.matmul(self._scratch.constant(1, dout.shape[0], dout.dtype), dout,
                                out=self.grads["bias"])
        if not need_input_grad:
            # The first layer's input is the data: skipping dx saves a third
            # of that layer's (the largest) matrix products.
            return None
        dx = self._scratch.get("dx", (dout.shape[0], self.n_in), dout.dtype)
        return self.backend.matmul(dout, self.params["weight"].T, out=dx)

    # -- in fixed blocks of columns (--reproducible: nn/columns.py) ----------------------------

    def _forward_in_blocks(self, x):
        columns, matmul = self.columns, self.backend.matmul
        weight, bias = self.params["weight"], self.params.get("bias")
        everywhere = columns.everywhere(self.n_out)
        shape = (x.shape[0], self.n_out)
        out = (self._scratch.get("out", shape, weight.dtype) if everywhere
               else columns.output(self._scratch, "out", shape, weight.dtype, self.name))

        def block(start, stop):
            matmul(x, weight[:, start:stop], out=out[:, start:stop])
            if bias is not None:
                out[:, start:stop] += bias[start:stop]

        spans = columns.blocks(self.n_out) if everywhere else columns.my_blocks(self.n_out)
        columns.run([lambda a=a, b=b: block(a, b) for a, b in spans],
                    flops=2 * x.shape[0] * self.n_in * _width(spans))
        return out if everywhere else columns.share(out)

    # whether the input gradient must reach every rank whole; Sequential._plan_input_grads clears it
    # when the layers below read only this rank's own columns of it
    share_input_grad = True

    def _backward_in_blocks(self, dout, need_input_grad):
        """This rank's blocks of the weight gradient (every row of the global batch in one call per
        block) and of the input gradient; the gradient of the columns it does not own is zero.

        The input gradient is whole on every rank, unless ``share_input_grad``
        is off: then only this rank's blocks of it are computed and the rest is
        zero (the layer below reads its own blocks alone)."""
        columns, matmul, weight = self.columns, self.backend.matmul, self.params["weight"]
        grad_w, grad_b = self.grads["weight"], self.grads.get("bias")
        ones = self._scratch.constant(1, dout.shape[0], dout.dtype)
        mine = columns.my_blocks(self.n_out)
        everywhere = columns.everywhere(self.n_out)

        def weight_block(start, stop):
            matmul(self._x.T, dout[:, start:stop], out=grad_w[:, start:stop])
            if grad_b is not None:
                matmul(ones, dout[:, start:stop], out=grad_b[start:stop])

        shape = (dout.shape[0], self.n_in)
        shared = need_input_grad and not everywhere and self.share_input_grad
        dx = (columns.output(self._scratch, "dx", shape, dout.dtype, self.name) if shared
              else self._scratch.get("dx", shape, dout.dtype))

        def input_block(start, stop):
            matmul(dout, weight[start:stop].T, out=dx[:, start:stop])

        calls = [lambda a=a, b=b: weight_block(a, b) for a, b in mine]
        flops = 2 * dout.shape[0] * self.n_in * _width(mine)
        if need_input_grad:
            inputs = columns.blocks(self.n_in) if everywhere else columns.my_blocks(self.n_in)
            calls += [lambda a=a, b=b: input_block(a, b) for a, b in inputs]
            flops += 2 * dout.shape[0] * self.n_out * _width(inputs)
        columns.run(calls, flops)
        _disown_others(grad_w, grad_b, *columns.columns_of(self.n_out, columns.rank))
        if not need_input_grad or everywhere:
            return dx if need_input_grad else None
        if shared:
            return columns.share(dx)
        first, stop = columns.columns_of(self.n_in, columns.rank)
        dx[:, :first], dx[:, stop:] = 0, 0   # not this rank's: nothing below reads them
        return dx


def _width(spans):
    """How many columns the ``(start, stop)`` ranges ``spans`` cover."""
    return sum(stop - start for start, stop in spans)


def _disown_others(grad_w, grad_b, first, stop):
    """The weight and bias gradients of the columns outside this rank's ``[first, stop)``: not its
    own (``columns.disown``)."""
    for grad in (grad_w, grad_b):
        if grad is not None:
            disown(grad[..., :first])
            disown(grad[..., stop:])


class ReLU(Layer):
    """``y = max(x, 0)``; the gradient passes where the output is positive.

    ``in_place`` is decided by ``Sequential``, never by hand: when the layer
    before this one does not read its own output again (``output_is_scratch``)
    and the layer after it does not read the gradient it returned
    (``input_grad_is_scratch``), the forward overwrites its input and the
    backward its incoming gradient instead of writing into arrays of its own:
    two fewer activation-sized arrays to stream through the cache each step.
    """

    rowwise = True
    elementwise = True

    def __init__(self):
        super().__init__()
        self.in_place = False
        self._out = None

    def plan_in_place(self, before, after):
        self.in_place = (before is not None and before.output_is_scratch
                         and after is not None and after.input_grad_is_scratch)

    def forward(self, x):
        out = x if self.in_place else self._scratch.get("out", x.shape, x.dtype)
        # Against zeros of one sample's shape, not the scalar 0: numpy's vectorised
        # loop for maximum wants two arrays, and with a scalar operand it takes a loop
        # about 2.5x slower (numpy 2.4, float32). The zeros broadcast over the batch.
        zeros = self._scratch.constant(0, math.prod(x.shape[1:]), x.dtype).reshape(x.shape[1:])
        self._out = np.maximum(x, zeros, out=out)
        return out

    def backward(self, dout, need_input_grad=True):
        dx = dout if self.in_place else self._scratch.get("dx", dout.shape, dout.dtype)
        passes = np.greater(self._out, 0, out=self._scratch.get("mask", self._out.shape, bool))
        return np.multiply(dout, passes, out=dx)


class Softmax(Layer):
    """``s = exp(x - max x) / sum exp(x - max x)`` row by row.

    Backward is the batched Jacobian-vector product. For one row the Jacobian
    is ``J = diag(s) - s s^T``, so ``J^T g = s * g - s (s . g)``; for the batch
    ``dx = s * (g - sum(g * s, axis=1, keepdims=True))``. That costs O(B*C)
    and never builds a ``(B, C, C)`` Jacobian (nor an identity matrix).
    """

    rowwise = True

    def __init__(self):
        super().__init__()
        self._s = None

    def forward(self, x):
        s = self._scratch.get("out", x.shape, x.dtype)
        np.subtract(x, x.max(axis=1, keepdims=True), out=s)   # exp never overflows
        np.exp(s, out=s)
        s /= s.sum(axis=1, keepdims=True)
        self._s = s
        return s

    def backward(self, dout, need_input_grad=True):
        s = self._s
        dx = self._scratch.get("dx", dout.shape, dout.dtype)
        np.subtract(dout, np.sum(dout * s, axis=1, keepdims=True), out=dx)
        dx *= s
        return dx
