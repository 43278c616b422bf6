"""Layers with an explicit forward and backward, and a sequential model.

Shapes follow the batch-first convention: an input is ``(batch, ...)``. A
layer caches what its backward needs during ``forward``; ``backward(dout)``
fills the layer's parameter gradients and returns the gradient with respect to
its input. Nothing here knows about MPI or about how the loss is normalised.

What a layer may hold, each under a name:

* **parameters** (``params``), trained by the optimiser, with their gradients
  (``grads``) of the same shapes;
* **buffers**: state that is not trained but belongs to the model (running
  statistics, say). Saved in checkpoints and compared across ranks like the
  parameters;
* a **mode**: ``training`` is True while training and False in evaluation
  (``Sequential.train()`` / ``Sequential.eval()``), for layers that behave
  differently in the two.

Two things exist for speed and are worth knowing before reading on:

* The model's parameters live in one flat array, its gradients in another and
  its buffers in a third; every layer's arrays are *views* into them. The
  optimiser then updates the whole model with a handful of vector operations,
  and a data-parallel trainer reduces all gradients with a single Allreduce.
* Layers write their outputs into scratch arrays they own and reuse on the
  next call (grown only when a larger batch arrives). The array returned by
  ``forward`` or ``backward`` is therefore valid until the next call of the
  same method: copy it if you need to keep it. Where it is safe, ``Sequential``
  lets a ReLU work in place on its neighbours' arrays (see ``ReLU``).
"""

from __future__ import annotations

import math

import numpy as np

from . import gemm
from .errors import UserError

# Every Layer subclass, by class name: how a model description becomes a model again.
LAYER_TYPES = {}


class ShapeError(UserError):
    """An input whose shape does not fit a layer."""


def no_reduction(array):
    """Summing an array over the ranks in one process (or for per-rank statistics): the array as it is."""
    return array


class _Scratch:
    """Arrays reused across calls, keyed by name; grown along the first (batch) axis on demand."""

    def __init__(self):
        self._arrays = {}

    def get(self, name, shape, dtype, zeroed=False):
        """An array of ``shape``, the same memory as last time when it fits.

        Uninitialised, or with ``zeroed`` all zeros when it is (re)allocated: what
        the caller never writes then stays zero from one call to the next.
        """
        array = self._arrays.get(name)
        if array is None or array.shape[0] < shape[0] or array.shape[1:] != tuple(shape[1:]) \
                or array.dtype != dtype:
            array = (np.zeros if zeroed else np.empty)(shape, dtype=dtype)
            self._arrays[name] = array
        return array[:shape[0]]

    def constant(self, value, n, dtype):
        """A vector of ``n`` copies of ``value``, made once and kept (it must not be written to)."""
        name = ("constant", value)
        array = self._arrays.get(name)
        if array is None or array.shape[0] < n or array.dtype != dtype:
            array = np.full(n, value, dtype=dtype)
            self._arrays[name] = array
        return array[:n]


class Layer:
    """A layer: named parameters and buffers (possibly none), a mode, a forward and a backward pass.

    A subclass declares the shapes of its parameters and buffers, fills them
    in ``init_params`` / ``init_buffers``, and says in ``config`` which
    constructor arguments rebuild it. Every subclass is registered by its
    class name, so that a model description saved in a checkpoint can be
    turned back into the model.
    """

    # What Sequential may do around this layer without breaking it (see Sequential._plan_in_place):
    output_is_scratch = False       # backward never reads the array forward returned
    input_grad_is_scratch = False   # nothing reads the array backward returned after the caller has it
    takes_channels = False          # works on (C, H, W) samples: (H, W) images gain a channel axis before it
    takes_features = False          # works on rows of features: images are flattened before it

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        LAYER_TYPES[cls.__name__] = cls

    def __init__(self):
        self.name = None     # given by Sequential: "linear1", "relu2", ...
        self.params = {}     # name -> array (a view into the model's flat parameters)
        self.grads = {}      # name -> array of the same shape (a view into the flat gradients)
        self.buffers = {}    # name -> array (a view into the model's flat buffers)
        self.training = True
        self._scratch = _Scratch()

    def config(self):
        """The constructor arguments that rebuild this layer (JSON values)."""
        return {}

    def label(self):
        """A short human description, such as ``Linear 784->512``."""
        return type(self).__name__

    def param_shapes(self):
        """The shapes of this layer's parameters, in a fixed order."""
        return {}

    def buffer_shapes(self):
        """The shapes of this layer's buffers, in a fixed order."""
        return {}

    def init_params(self, rng):
        """Fill ``self.params`` in place with initial values drawn from ``rng``."""

    def init_buffers(self):
        """Fill ``self.buffers`` in place with their initial values."""

    def output_shape(self, input_shape):
        """The shape of one sample's output for one sample's input shape; ShapeError if it does not fit."""
        return tuple(input_shape)

    def flops(self, input_shape):
        """Floating-point operations of the forward pass for one sample: those of matrix products
        (2 per multiply-add), where the time goes; element-wise layers count 0."""
        return 0

    def workspace(self, input_shape):
        """Values per sample this layer keeps in work arrays besides its output and input gradient."""
        return 0

    def block_bytes(self):
        """Bytes of work arrays whose size does not grow with the batch (a convolution's blocks)."""
        return 0

    def forward(self, x):
        raise NotImplementedError

    def backward(self, dout, need_input_grad=True):
        raise NotImplementedError


class Flatten(Layer):
    """``(batch, d1, d2, ...)`` -> ``(batch, d1 * d2 * ...)``: a view, no copy, for contiguous input."""

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

    output_is_scratch = True        # backward needs the input and the weights, not the output
    input_grad_is_scratch = True
    takes_features = True

    def __init__(self, n_in, n_out, init="he", bias=True):
        super().__init__()
        if init not in ("he", "glorot"):
            raise ValueError(f"unknown init {init!r}")
        self.n_in, self.n_out, self.init, self.bias = int(n_in), int(n_out), init, bool(bias)
        self._x = None

    def config(self):
        return {"n_in": self.n_in, "n_out": self.n_out, "init": self.init, "bias": self.bias}

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
            raise ShapeError(f"{self.name or 'Linear'} ({self.label()}) takes {self.n_in} features per sample, "
                             f"not {shape_text(input_shape)}")
        return (self.n_out,)

    def flops(self, input_shape):
        return 2 * self.n_in * self.n_out

    def forward(self, x):
        self._x = x
        out = self._scratch.get("out", (x.shape[0], self.n_out), self.params["weight"].dtype)
        gemm.matmul(x, self.params["weight"], out=out)
        if self.bias:
            out += self.params["bias"]
        return out

    def backward(self, dout, need_input_grad=True):
        # dL/dW = x^T dout and dL/db = sum over the batch of dout: sums over
        # samples, so whatever normalisation the loss applied carries through.
        gemm.matmul(self._x.T, dout, out=self.grads["weight"])
        if self.bias:
            # The column sums of dout as a product with a vector of ones: BLAS
            # does it about twice as fast as np.sum(dout, axis=0).
            gemm.matmul(self._scratch.constant(1, dout.shape[0], dout.dtype), dout, out=self.grads["bias"])
        if not need_input_grad:
            # The first layer's input is the data: skipping dx saves a third
            # of that layer's (the largest) matrix products.
            return None
        dx = self._scratch.get("dx", (dout.shape[0], self.n_in), dout.dtype)
        return gemm.matmul(dout, self.params["weight"].T, out=dx)


class ReLU(Layer):
    """``y = max(x, 0)``; the gradient passes where the output is positive.

    ``in_place`` is decided by ``Sequential``, never by hand: when the layer
    before this one does not read its own output again (``output_is_scratch``)
    and the layer after it does not read the gradient it returned
    (``input_grad_is_scratch``), the forward overwrites its input and the
    backward its incoming gradient instead of writing into arrays of its own:
    two fewer activation-sized arrays to stream through the cache each step.
    """

    def __init__(self):
        super().__init__()
        self.in_place = False
        self._out = None

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


def shape_text(shape):
    return "x".join(map(str, shape)) if len(shape) != 1 else f"{shape[0]}"


def layers_from_description(description):
    """The layers of a model description (``Sequential.describe()``), named, without their arrays: what
    they would allocate can be checked first. UserError for a type or arguments that do not build."""
    from . import conv, dropout, normalization, pooling   # noqa: F401 - their layer types, registered
    layers = []
    for entry in description:
        kind = LAYER_TYPES.get(entry.get("type"))
        if kind is None:
            raise UserError(f"unknown layer type {entry.get('type')!r} (import the module that defines it)")
        try:
            layer = kind(**entry.get("args", {}))
        except (TypeError, ValueError) as error:
            raise UserError(f"layer {entry.get('name')!r} ({kind.__name__}) cannot be built: {error}") from None
        layer.name = entry.get("name")
        layers.append(layer)
    try:
        name_layers(layers)
    except ValueError as error:
        raise UserError(str(error)) from None
    return layers


def name_layers(layers):
    """Name the unnamed layers: their type and their number among the layers of that type."""
    counts, seen = {}, set()
    for layer in layers:
        kind = type(layer).__name__.lower()
        counts[kind] = counts.get(kind, 0) + 1
        layer.name = layer.name or f"{kind}{counts[kind]}"
        if layer.name in seen or "." in layer.name or "/" in layer.name:
            raise ValueError(f"layer name {layer.name!r} is repeated or holds '.' or '/'")
        seen.add(layer.name)


def input_shape_of(layers, image_shape):
    """One sample's shape as ``layers`` take it: ``(H, W)`` images gain a channel axis, ``(1, H, W)``, when
    the first layer works on channels (a convolution), and are flattened to ``(H * W,)`` (``(C * H * W,)``)
    when it works on rows of features (a Linear layer)."""
    image_shape = tuple(image_shape)
    if len(image_shape) == 2 and layers and layers[0].takes_channels:
        return (1, *image_shape)
    if layers and layers[0].takes_features:
        return (math.prod(image_shape),)
    return image_shape


def output_shape_of(layers, image_shape):
    """One sample's output shape for one image of ``image_shape``; ShapeError naming the first layer that
    does not fit."""
    shape = input_shape_of(layers, image_shape)
    for layer in layers:
        shape = layer.output_shape(shape)
    return shape


def layer_flops(layers, image_shape):
    """``(layer, output shape, FLOPs)`` of the forward pass for one image of ``image_shape``, layer by layer:
    the matrix products' (2 per multiply-add); element-wise layers count 0. ShapeError naming the first
    layer that does not fit."""
    shape, counts = input_shape_of(layers, image_shape), []
    for layer in layers:
        output = layer.output_shape(shape)
        counts.append((layer, output, layer.flops(shape)))
        shape = output
    return counts


def training_flops(counts):
    """FLOPs of a training step per sample from ``layer_flops``' counts: each matrix product's forward, its
    weight gradient and its input gradient (the same count each), but no input gradient for the first
    layer with parameters (nothing needs it)."""
    total = 3 * sum(f for *_, f in counts)
    first = next((f for layer, _, f in counts if layer.param_shapes()), 0)
    return total - first


def _flat_views(owners, array):
    """Slice ``array`` into consecutive views of the shapes ``owners`` (``(layer, name, shape)``) lists."""
    offset = 0
    for layer, name, shape in owners:
        size = math.prod(shape)
        yield layer, name, array[offset:offset + size].reshape(shape)
        offset += size


class Sequential:
    """Layers applied in order, with all parameters, gradients and buffers in flat arrays.

    ``params``, ``grads`` and ``buffers`` are 1-D arrays. ``named_params()``
    lists the per-layer views as ``("linear1.weight", array)`` and so on, in
    the order of the flat arrays. A layer's name is the one it was given, or
    its type and its number among the layers of that type (``linear2``,
    ``relu1``): inserting a layer of another type renames nothing.
    """

    def __init__(self, layers, dtype=np.float32, seed=0, spec=None):
        self.layers = list(layers)
        self.dtype = np.dtype(dtype)
        self.spec = spec   # the --model string it was built from, if any
        name_layers(self.layers)
        buffer_owners = [(layer, name, shape) for layer in self.layers for name, shape in layer.buffer_shapes().items()]
        params = np.zeros(sum(math.prod(shape) for *_, shape in self._param_owners()), dtype=self.dtype)
        self._bind(params, np.zeros_like(params))
        self.buffers = np.zeros(sum(math.prod(shape) for *_, shape in buffer_owners), dtype=self.dtype)
        for layer, name, view in _flat_views(buffer_owners, self.buffers):
            layer.buffers[name] = view
        # One generator for the whole model, consumed layer by layer, so the
        # initial parameters are a pure function of (layers, seed); the draws are
        # made in float64 and rounded, so float32 and float64 models agree.
        rng = np.random.default_rng(seed)
        for layer in self.layers:
            layer.init_params(rng)
            layer.init_buffers()
        # Without a request for the input gradient, backward stops at the first layer with
        # parameters, and that layer skips its input gradient: nothing before it needs one.
        self._first_trained = next((i for i, layer in enumerate(self.layers) if layer.params), 0)
        self._plan_in_place()

    def _plan_in_place(self):
        """Let each ReLU work in place where neither neighbour reads the array it would overwrite."""
        for i, layer in enumerate(self.layers):
            if isinstance(layer, ReLU):
                layer.in_place = (0 < i < len(self.layers) - 1 and self.layers[i - 1].output_is_scratch
                                  and self.layers[i + 1].input_grad_is_scratch)

    def use_arrays(self, params, grads):
        """From now on keep the parameters in ``params`` and the gradient in ``grads``: flat arrays of this
        model's size and dtype, whose values are taken as they are (the layers' views are made anew). What
        ``node_memory`` uses to put them in memory that the ranks of a node share."""
        for array in (params, grads):
            if array.shape != self.params.shape or array.dtype != self.dtype or not array.flags.c_contiguous:
                raise ValueError(f"use_arrays needs contiguous {self.params.size} {self.dtype} values, "
                                 f"got {array.shape} {array.dtype}")
        self._bind(params, grads)

    def _param_owners(self):
        return [(layer, name, shape) for layer in self.layers for name, shape in layer.param_shapes().items()]

    def _bind(self, params, grads):
        """Keep the flat ``params`` and ``grads``, and give every layer its views of them."""
        self.params, self.grads = params, grads
        owners = self._param_owners()
        for layer, name, view in _flat_views(owners, params):
            layer.params[name] = view
        for layer, name, view in _flat_views(owners, grads):
            layer.grads[name] = view

    def replica(self):
        """A model of copies of these layers holding the same parameters and buffers, in arrays of its own
        (what each simulated rank trains). The layers' work arrays are not copied, nor what they were told
        from outside (``set_sum_over_ranks``): a replica starts with fresh ones."""
        import copy
        memo = {}
        for layer in self.layers:
            memo[id(layer._scratch)] = _Scratch()
            if "sum_over_ranks" in vars(layer):
                memo[id(layer.sum_over_ranks)] = no_reduction
        clone = Sequential(copy.deepcopy(self.layers, memo), dtype=self.dtype, spec=self.spec)
        clone.params[...] = self.params
        clone.buffers[...] = self.buffers
        return clone

    @classmethod
    def from_spec(cls, spec, dtype=np.float32, seed=0, input_shape=None):
        """A model from a --model string: an MLP such as ``"784-512-bn-drop0.2-256-10"``, a CNN such as
        ``"conv32k3p1-bn-maxpool2-flatten-128-10"``, or a name (``"cnn"``); see ``spec.py``.

        A CNN takes its input size from ``input_shape``, one image's shape
        (``(H, W)`` or ``(C, H, W)``). The output layer gives logits (no
        softmax): pair it with the fused ``SoftmaxCrossEntropy`` loss.
        """
        from .spec import parse_spec
        parsed = parse_spec(spec)
        return cls(parsed.layers(input_shape), dtype=dtype, seed=seed, spec=parsed.describe())

    # -- description -------------------------------------------------------------------------

    def describe(self):
        """The layers' names, types and arguments (JSON values): what ``from_description`` rebuilds."""
        return [{"name": layer.name, "type": type(layer).__name__, "args": layer.config()}
                for layer in self.layers]

    @classmethod
    def from_description(cls, description, dtype=np.float32, seed=0, spec=None):
        return cls(layers_from_description(description), dtype=dtype, seed=seed, spec=spec)

    def summary(self):
        """The --model spec it was built from, or its layers in a line."""
        return self.spec or " -> ".join(layer.label() for layer in self.layers)

    def input_shape(self, image_shape):
        """The shape of one sample as this model takes it (see ``input_shape_of``)."""
        return input_shape_of(self.layers, image_shape)

    def as_input(self, images):
        """``images`` (``(N, *image shape)``) shaped as this model takes them: a view, no copy."""
        return images.reshape(images.shape[0], *self.input_shape(images.shape[1:]))

    def output_shape(self, image_shape):
        """The shape of one sample's output for one image; ShapeError naming the layer that does not fit."""
        return output_shape_of(self.layers, image_shape)

    # -- named state ---------------------------------------------------------------------------

    def named_params(self):
        return [(f"{layer.name}.{name}", array) for layer in self.layers for name, array in layer.params.items()]

    def named_grads(self):
        return [(f"{layer.name}.{name}", array) for layer in self.layers for name, array in layer.grads.items()]

    def named_buffers(self):
        return [(f"{layer.name}.{name}", array) for layer in self.layers for name, array in layer.buffers.items()]

    def load_state(self, params, buffers):
        """Copy parameters and buffers in from ``{"linear1.weight": array, ...}`` mappings (a checkpoint's)."""
        for name, array in self.named_params():
            array[...] = params[name]
        for name, array in self.named_buffers():
            array[...] = buffers[name]

    # -- what layers learn from outside --------------------------------------------------------------

    sum_over_ranks = staticmethod(no_reduction)   # what set_sum_over_ranks handed the layers last

    def set_sum_over_ranks(self, sum_over_ranks):
        """Hand every layer that needs batch-wide sums (BatchNorm) the function that sums an array
        over the ranks in place: ``comm.allreduce_`` for statistics of the global batch."""
        self.sum_over_ranks = sum_over_ranks
        for layer in self.layers:
            if hasattr(layer, "sum_over_ranks"):
                layer.sum_over_ranks = sum_over_ranks

    def set_batch_context(self, context):
        """Tell the layers that draw per-sample randomness (Dropout) the step and the rows' positions."""
        for layer in self.layers:
            if hasattr(layer, "batch_context"):
                layer.batch_context = context

    # -- modes -------------------------------------------------------------------------------------

    def train(self, mode=True):
        """Training mode (the default); ``train(False)`` is ``eval()``."""
        for layer in self.layers:
            layer.training = mode
        return self

    def eval(self):
        return self.train(False)

    @property
    def training(self):
        return all(layer.training for layer in self.layers)

    # -- passes ------------------------------------------------------------------------------------

    # Called as observer("forward" | "backward", layer, array) after every layer when set;
    # --debug uses it to name the layer where a NaN appears, the benchmark to time the layers.
    observer = None
    # Called as gradient_ready(index) once backward has filled the gradients of layers[index] (and of every
    # layer after it): --overlap-allreduce starts reducing the ones that are final (overlap.GradientBuckets).
    gradient_ready = None

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
            if self.observer is not None:
                self.observer("forward", layer, x)
        return x

    def backward(self, dout, need_input_grad=False):
        """Fill ``self.grads`` from the gradient of the loss w.r.t. the output.

        Returns the gradient w.r.t. the input when ``need_input_grad``.
        """
        last = 0 if need_input_grad else self._first_trained
        for i in range(len(self.layers) - 1, last - 1, -1):
            layer = self.layers[i]
            dout = layer.backward(dout, need_input_grad=need_input_grad or i > last)
            if self.observer is not None:
                self.observer("backward", layer, dout)
            if self.gradient_ready is not None:
                self.gradient_ready(i)
        return dout if need_input_grad else None


# Layers defined in modules of their own (which import this one), reachable as nn.<name> too.
_ELSEWHERE = {"BatchNorm": "normalization", "Dropout": "dropout", "BatchContext": "dropout", "Conv2d": "conv",
              "MaxPool2d": "pooling", "AvgPool2d": "pooling"}


def __getattr__(name):
    if name in _ELSEWHERE:
        import importlib
        return getattr(importlib.import_module(f".{_ELSEWHERE[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
