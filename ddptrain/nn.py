"""Layers with an explicit forward and backward, and a sequential model.

Shapes follow the batch-first convention: an input is ``(batch, features)``.
A layer caches what its backward needs during ``forward``; ``backward(dout)``
fills the layer's parameter gradients and returns the gradient with respect to
its input. Nothing here knows about MPI or about how the loss is normalised.

Two things exist for speed and are worth knowing before reading on:

* The model's parameters live in one flat array and its gradients in another;
  every layer's ``weight`` and ``bias`` are *views* into them. The optimiser
  then updates the whole model with a handful of vector operations, and a
  data-parallel trainer reduces all gradients with a single Allreduce.
* Layers write their outputs into buffers they own and reuse on the next
  call (grown only when a larger batch arrives). The array returned by
  ``forward`` or ``backward`` is therefore valid until the next call of the
  same method: copy it if you need to keep it. In the MLPs of
  ``Sequential.from_spec`` each ReLU works in place on the arrays the Linear
  layer before it returned (see ``ReLU``).
"""

from __future__ import annotations

import math

import numpy as np

from .errors import UserError


class _Buffers:
    """Scratch arrays reused across calls, keyed by name; rows grow on demand."""

    def __init__(self):
        self._arrays = {}

    def rows(self, name, n_rows, n_cols, dtype):
        array = self._arrays.get(name)
        if array is None or array.shape[0] < n_rows or array.shape[1] != n_cols or array.dtype != dtype:
            array = np.empty((n_rows, n_cols), dtype=dtype)
            self._arrays[name] = array
        return array[:n_rows]

    def constant(self, value, n, dtype):
        """A vector of ``n`` copies of ``value``, made once and kept (it must not be written to)."""
        name = ("constant", value)
        array = self._arrays.get(name)
        if array is None or array.shape[0] < n or array.dtype != dtype:
            array = np.full(n, value, dtype=dtype)
            self._arrays[name] = array
        return array[:n]


class Layer:
    """A layer has named parameters (possibly none) and a forward and backward pass."""

    def __init__(self):
        self.params = {}   # name -> array (a view into the model's flat buffer)
        self.grads = {}    # name -> array of the same shape
        self._buffers = _Buffers()

    def param_shapes(self):
        """The shapes of this layer's parameters, in a fixed order."""
        return {}

    def init_params(self, rng):
        """Fill ``self.params`` in place with initial values drawn from ``rng``."""

    def forward(self, x):
        raise NotImplementedError

    def backward(self, dout, need_input_grad=True):
        raise NotImplementedError


class Linear(Layer):
    """``y = x @ W + b`` with ``W`` of shape ``(n_in, n_out)``.

    ``init="he"`` draws ``W ~ N(0, 2/n_in)`` (for layers followed by ReLU);
    ``init="glorot"`` draws ``W ~ U(-a, a)`` with ``a = sqrt(6/(n_in + n_out))``.
    Biases start at zero.
    """

    def __init__(self, n_in, n_out, init="he"):
        super().__init__()
        if init not in ("he", "glorot"):
            raise ValueError(f"unknown init {init!r}")
        self.n_in, self.n_out, self.init = n_in, n_out, init
        self._x = None

    def param_shapes(self):
        return {"weight": (self.n_in, self.n_out), "bias": (self.n_out,)}

    def init_params(self, rng):
        weight = self.params["weight"]
        if self.init == "he":
            weight[...] = rng.standard_normal(weight.shape) * math.sqrt(2.0 / self.n_in)
        else:
            limit = math.sqrt(6.0 / (self.n_in + self.n_out))
            weight[...] = rng.uniform(-limit, limit, size=weight.shape)
        self.params["bias"][...] = 0

    def forward(self, x):
        self._x = x
        out = self._buffers.rows("out", x.shape[0], self.n_out, self.params["weight"].dtype)
        np.matmul(x, self.params["weight"], out=out)
        out += self.params["bias"]
        return out

    def backward(self, dout, need_input_grad=True):
        # dL/dW = x^T dout and dL/db = sum over the batch of dout: sums over
        # samples, so whatever normalisation the loss applied carries through.
        np.matmul(self._x.T, dout, out=self.grads["weight"])
        # The column sums of dout as a product with a vector of ones: BLAS
        # does it about twice as fast as np.sum(dout, axis=0).
        np.matmul(self._buffers.constant(1, dout.shape[0], dout.dtype), dout, out=self.grads["bias"])
        if not need_input_grad:
            # The first layer's input is the data: skipping dx saves a third
            # of that layer's (the largest) matrix products.
            return None
        dx = self._buffers.rows("dx", dout.shape[0], self.n_in, dout.dtype)
        return np.matmul(dout, self.params["weight"].T, out=dx)


class ReLU(Layer):
    """``y = max(x, 0)``; the gradient passes where the output is positive.

    With ``inplace=True`` the forward overwrites its input and the backward
    its incoming gradient, instead of writing into buffers of its own: two
    fewer activation-sized arrays to stream through the cache each step. Only
    for a caller that no longer needs either array, as in an MLP where the
    ReLU follows a Linear layer (whose backward needs neither its output nor
    the gradient it returned); ``Sequential.from_spec`` builds them so.
    """

    def __init__(self, inplace=False):
        super().__init__()
        self.inplace = inplace
        self._out = None

    def forward(self, x):
        out = x if self.inplace else self._buffers.rows("out", x.shape[0], x.shape[1], x.dtype)
        # Against a row of zeros, not the scalar 0: numpy's vectorised loop for
        # maximum wants two arrays, and with a scalar operand it takes a loop
        # about 2.5x slower (numpy 2.4, float32). The row broadcasts over the batch.
        self._out = np.maximum(x, self._buffers.constant(0, x.shape[1], x.dtype), out=out)
        return out

    def backward(self, dout, need_input_grad=True):
        dx = dout if self.inplace else self._buffers.rows("dx", dout.shape[0], dout.shape[1], dout.dtype)
        passes = np.greater(self._out, 0, out=self._buffers.rows("mask", *self._out.shape, bool))
        return np.multiply(dout, passes, out=dx)


class Softmax(Layer):
    """``s = exp(x - max x) / sum exp(x - max x)`` row by row.

    Backward is the batched Jacobian-vector product. For one row the Jacobian
    is ``J = diag(s) - s s^T``, so ``J^T g = s * g - s (s . g)``; for the batch
    ``dx = s * (g - sum(g * s, axis=1, keepdims=True))``. That costs O(B*C)
    and never builds a ``(B, C, C)`` Jacobian (nor an identity matrix).
    """

    def __init__(self):
        super().__init__()
        self._s = None

    def forward(self, x):
        s = self._buffers.rows("out", x.shape[0], x.shape[1], x.dtype)
        np.subtract(x, x.max(axis=1, keepdims=True), out=s)   # exp never overflows
        np.exp(s, out=s)
        s /= s.sum(axis=1, keepdims=True)
        self._s = s
        return s

    def backward(self, dout, need_input_grad=True):
        s = self._s
        dx = self._buffers.rows("dx", dout.shape[0], dout.shape[1], dout.dtype)
        np.subtract(dout, np.sum(dout * s, axis=1, keepdims=True), out=dx)
        dx *= s
        return dx


def parse_spec(spec):
    """``"784-512-256-10"`` -> ``[784, 512, 256, 10]``, or a UserError saying what is wrong."""
    parts = str(spec).split("-")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise UserError(f"--model {spec!r}: expected layer sizes joined by '-', such as 784-512-256-10") from None
    if len(sizes) < 2 or any(s <= 0 for s in sizes):
        raise UserError(f"--model {spec!r}: needs at least an input and an output size, all positive")
    return sizes


class Sequential:
    """Layers applied in order, with all parameters in one flat buffer.

    ``params`` and ``grads`` are 1-D arrays; ``named_params()`` lists the
    per-layer views as ``("0.weight", array)`` and so on, in a fixed order that
    is also the layout of the flat buffers and the keys of a checkpoint.
    """

    def __init__(self, layers, dtype=np.float32, seed=0):
        self.layers = list(layers)
        self.dtype = np.dtype(dtype)
        shapes = [(i, name, shape) for i, layer in enumerate(self.layers)
                  for name, shape in layer.param_shapes().items()]
        total = sum(math.prod(shape) for _, _, shape in shapes)
        self.params = np.zeros(total, dtype=self.dtype)
        self.grads = np.zeros(total, dtype=self.dtype)
        offset = 0
        for i, name, shape in shapes:
            size = math.prod(shape)
            self.layers[i].params[name] = self.params[offset:offset + size].reshape(shape)
            self.layers[i].grads[name] = self.grads[offset:offset + size].reshape(shape)
            offset += size
        # One generator for the whole model, consumed layer by layer, so the
        # initial parameters are a pure function of (spec, seed); the draws are
        # made in float64 and rounded, so float32 and float64 models agree.
        rng = np.random.default_rng(seed)
        for layer in self.layers:
            layer.init_params(rng)

    @classmethod
    def from_spec(cls, spec, dtype=np.float32, seed=0):
        """An MLP from ``"784-512-256-10"``: Linear layers with ReLU between them.

        The output layer gives logits (no softmax): pair it with the fused
        ``SoftmaxCrossEntropy`` loss. Hidden layers use He init, the output
        layer Glorot.
        """
        sizes = parse_spec(spec)
        layers = []
        for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            last = k == len(sizes) - 2
            layers.append(Linear(n_in, n_out, init="glorot" if last else "he"))
            if not last:
                layers.append(ReLU(inplace=True))   # after a Linear: see ReLU
        model = cls(layers, dtype=dtype, seed=seed)
        model.spec = "-".join(map(str, sizes))
        return model

    def named_params(self):
        return [(f"{i}.{name}", array) for i, layer in enumerate(self.layers)
                for name, array in layer.params.items()]

    def named_grads(self):
        return [(f"{i}.{name}", array) for i, layer in enumerate(self.layers)
                for name, array in layer.grads.items()]

    def load_params(self, named):
        """Copy parameters in from a ``{"0.weight": array, ...}`` mapping (a checkpoint's)."""
        for name, array in self.named_params():
            array[...] = named[name]

    @property
    def n_inputs(self):
        return self.layers[0].n_in

    @property
    def n_outputs(self):
        return next(layer.n_out for layer in reversed(self.layers) if isinstance(layer, Linear))

    # Called as observer("forward" | "backward", index, layer, array) after every
    # layer when set; --debug uses it to name the layer where a NaN appears.
    observer = None

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer.forward(x)
            if self.observer is not None:
                self.observer("forward", i, layer, x)
        return x

    def backward(self, dout, need_input_grad=False):
        """Fill ``self.grads`` from the gradient of the loss w.r.t. the output.

        Returns the gradient w.r.t. the input when ``need_input_grad``.
        """
        for i in range(len(self.layers) - 1, -1, -1):
            dout = self.layers[i].backward(dout, need_input_grad=need_input_grad or i > 0)
            if self.observer is not None:
                self.observer("backward", i, self.layers[i], dout)
        return dout
