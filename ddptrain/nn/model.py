"""A sequential model: layers applied in order, with all parameters, gradients and buffers in flat
arrays.

Two things exist for speed and are worth knowing before reading on:

* The model's parameters live in one flat array, its gradients in another and
  its buffers in a third; every layer's arrays are *views* into them. The
  optimiser then updates the whole model with a handful of vector operations,
  and a data-parallel trainer reduces all gradients with a single Allreduce.
* Where it is safe, ``Sequential`` lets a layer work in place on its
  neighbours' arrays (``Layer.plan_in_place``: a ReLU, a BatchNorm, a pooling).
"""

from __future__ import annotations

import copy
import math

import numpy as np

from ddptrain.backends.gemm import NUMPY
from ddptrain.errors import UserError
from ddptrain.nn.columns import disown
from ddptrain.nn.layer import LAYER_TYPES, Scratch, no_reduction
from ddptrain.nn.spec import parse_spec


def layers_from_description(description):
    """The layers of a model description (``Sequential.describe()``), named, without their arrays:
    what they would allocate can be checked first. UserError for a type or arguments that do not
    build."""
    layers = []
    for entry in description:
        kind = LAYER_TYPES.get(entry.get("type"))
        if kind is None:
            raise UserError(f"unknown layer type {entry.get('type')!r} (import the module "
                            "that defines it)")
        try:
            layer = kind(**entry.get("args", {}))
        except (TypeError, ValueError) as error:
            raise UserError(f"layer {entry.get('name')!r} ({kind.__name__}) cannot be built: "
                            f"{error}") from None
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
    """One sample's shape as ``layers`` take it: ``(H, W)`` images gain a channel axis,
    ``(1, H, W)``, when the first layer works on channels (a convolution), and are flattened to
    ``(H * W,)`` (``(C * H * W,)``) when it works on rows of features (a Linear layer)."""
    image_shape = tuple(image_shape)
    if len(image_shape) == 2 and layers and layers[0].takes_channels:
        return (1, *image_shape)
    if layers and layers[0].takes_features:
        return (math.prod(image_shape),)
    return image_shape


def output_shape_of(layers, image_shape):
    """One sample's output shape for one image of ``image_shape``; ShapeError naming the first layer
    that does not fit."""
    shape = input_shape_of(layers, image_shape)
    for layer in layers:
        shape = layer.output_shape(shape)
    return shape


def layer_flops(layers, image_shape):
    """``(layer, output shape, FLOPs)`` of the forward pass for one image of ``image_shape``, layer
    by layer: the matrix products' (2 per multiply-add); element-wise layers count 0. ShapeError
    naming the first layer that does not fit."""
    shape, counts = input_shape_of(layers, image_shape), []
    for layer in layers:
        output = layer.output_shape(shape)
        counts.append((layer, output, layer.flops(shape)))
        shape = output
    return counts


def training_flops(counts):
    """FLOPs of a training step per sample from ``layer_flops``' counts: each matrix product's
    forward, its weight gradient and its input gradient (the same count each), but no input gradient
    for the first layer with parameters (nothing needs it)."""
    total = 3 * sum(f for *_, f in counts)
    first = next((f for layer, _, f in counts if layer.param_shapes()), 0)
    return total - first


def flat_views(owners, array):
    """Slice ``array`` along its last axis into consecutive views of the shapes ``owners``
    (``(layer, name, shape)``) lists: ``shape`` itself from a flat array, ``(rows, *shape)`` from
    a ``(rows, values)`` one."""
    offset, rows = 0, array.shape[:-1]
    for layer, name, shape in owners:
        size = math.prod(shape)
        yield layer, name, array[..., offset:offset + size].reshape(*rows, *shape)
        offset += size


class Sequential:
    """Layers applied in order, with all parameters, gradients and buffers in flat arrays.

    ``params``, ``grads`` and ``buffers`` are 1-D arrays. ``named_params()``
    lists the per-layer views as ``("linear1.weight", array)`` and so on, in
    the order of the flat arrays. A layer's name is the one it was given, or
    its type and its number among the layers of that type (``linear2``,
    ``relu1``): inserting a layer of another type renames nothing.
    """

    def __init__(self, layers, dtype=np.float32, seed=0, spec=None, backend=NUMPY):
        self.layers = list(layers)
        self.dtype = np.dtype(dtype)
        self.spec = spec   # the --model string it was built from, if any
        self.use_backend(backend)
        name_layers(self.layers)
        buffer_owners = [(layer, name, shape) for layer in self.layers
                         for name, shape in layer.buffer_shapes().items()]
        params = np.zeros(sum(math.prod(shape) for *_, shape in self.param_owners()),
                          dtype=self.dtype)
        self._bind(params, np.zeros_like(params))
        self.buffers = np.zeros(sum(math.prod(shape) for *_, shape in buffer_owners),
                                dtype=self.dtype)
        for layer, name, view in flat_views(buffer_owners, self.buffers):
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
        """Let each layer work in place where no neighbour reads the array it would overwrite
        (``Layer.plan_in_place``)."""
        ends = [None]
        for before, layer, after in zip(ends + self.layers, self.layers, self.layers[1:] + ends):
            layer.plan_in_place(before, after)

    def use_backend(self, backend):
        """Multiply with ``backend`` (``backends.gemm.Backend``) from now on: every layer's
        products."""
        self.backend = backend
        for layer in self.layers:
            layer.backend = backend

    def use_arrays(self, params, grads):
        """From now on keep the parameters in ``params`` and the gradient in ``grads``: flat arrays
        of this model's size and dtype, whose values are taken as they are (the layers' views are
        made anew). What ``node_memory`` uses to put them in memory that the ranks of a node
        share."""
        for array in (params, grads):
            if (array.shape != self.params.shape or array.dtype != self.dtype
                    or not array.flags.c_contiguous):
                raise ValueError(f"use_arrays needs contiguous {self.params.size} {self.dtype} "
                                 f"values, got {array.shape} {array.dtype}")
        self._bind(params, grads)

    def param_owners(self):
        """``(layer, name, shape)`` of every parameter, in the order of the flat arrays."""
        return [(layer, name, shape) for layer in self.layers
                for name, shape in layer.param_shapes().items()]

    def _bind(self, params, grads):
        """Keep the flat ``params`` and ``grads``, and give every layer its views of them."""
        self.params, self.grads = params, grads
        owners = self.param_owners()
        for layer, name, view in flat_views(owners, params):
            layer.params[name] = view
        for layer, name, view in flat_views(owners, grads):
            layer.grads[name] = view

    def replica(self):
        """A model of copies of these layers holding the same parameters and buffers, in arrays of
        its own (what each simulated rank trains). The layers' work arrays are not copied, nor what
        they were told from outside (``set_sum_over_ranks``): a replica starts with fresh ones."""
        memo = {}
        for layer in self.layers:
            memo[id(layer._scratch)] = Scratch()
            if "sum_over_ranks" in vars(layer):
                memo[id(layer.sum_over_ranks)] = no_reduction
            if layer.columns is not None:
                memo[id(layer.columns)] = None
            memo[id(layer.backend)] = layer.backend   # a library's functions, shared, never copied
        clone = Sequential(copy.deepcopy(self.layers, memo), dtype=self.dtype, spec=self.spec,
                           backend=self.backend)
        clone.params[...] = self.params
        clone.buffers[...] = self.buffers
        return clone

    def follow(self, model, training):
        """This replica as ``model`` is: its parameters (the exchange may have moved them into
        shared memory), its buffers (BatchNorm's running statistics, also the shift its sums are
        taken about), its library of products, and ``training`` mode."""
        if self.params is not model.params:
            self.use_arrays(model.params, self.grads)
        self.buffers[...] = model.buffers
        if self.backend is not model.backend:
            self.use_backend(model.backend)
        self.train(training)

    @classmethod
    def from_spec(cls, spec, dtype=np.float32, seed=0, input_shape=None):
        """A model from a --model string: an MLP such as ``"784-512-bn-drop0.2-256-10"``, a CNN such
        as ``"conv32k3p1-bn-maxpool2-flatten-128-10"``, or a name (``"cnn"``); see ``spec.py``.

        A CNN takes its input size from ``input_shape``, one image's shape
        (``(H, W)`` or ``(C, H, W)``). The output layer gives logits (no
        softmax): pair it with the fused ``SoftmaxCrossEntropy`` loss.
        """
        parsed = parse_spec(spec)
        return cls(parsed.layers(input_shape), dtype=dtype, seed=seed, spec=parsed.describe())

    # -- description -------------------------------------------------------------------------

    def describe(self):
        """The layers' names, types and arguments (JSON values): what ``from_description``
        rebuilds."""
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
        """The shape of one sample's output for one image; ShapeError naming the layer that does not
        fit."""
        return output_shape_of(self.layers, image_shape)

    # -- named state ---------------------------------------------------------------------------

    def named_params(self):
        return [(f"{layer.name}.{name}", array) for layer in self.layers
                for name, array in layer.params.items()]

    def named_grads(self):
        return [(f"{layer.name}.{name}", array) for layer in self.layers
                for name, array in layer.grads.items()]

    def named_buffers(self):
        return [(f"{layer.name}.{name}", array) for layer in self.layers
                for name, array in layer.buffers.items()]

    def load_state(self, params, buffers):
        """Copy parameters and buffers in from ``{"linear1.weight": array, ...}`` mappings (a
        checkpoint's)."""
        for name, array in self.named_params():
            array[...] = params[name]
        for name, array in self.named_buffers():
            array[...] = buffers[name]

    # -- what layers learn from outside ------------------------------------------------------------

    sum_over_ranks = staticmethod(no_reduction)   # what set_sum_over_ranks handed the layers last

    def set_sum_over_ranks(self, sum_over_ranks):
        """Hand every layer that needs batch-wide sums (BatchNorm) the function that sums an array
        over the ranks in place: ``comm.allreduce_`` for statistics of the global batch."""
        self.sum_over_ranks = sum_over_ranks
        for layer in self.layers:
            if hasattr(layer, "sum_over_ranks"):
                layer.sum_over_ranks = sum_over_ranks

    columns = None   # the columns.ColumnSplit that set_column_split handed the layers, if any

    def set_column_split(self, split):
        """Compute in fixed blocks of columns (``columns.ColumnSplit``; None: as usual): the same
        bits on any number of ranks. Layers that cannot split run on the whole batch, and only the
        split's ``owns_whole_batch_layers`` rank keeps their gradients (the others send
        ``-0.0``: ``columns.disown``)."""
        self.columns = split
        for layer in self.layers:
            layer.columns = split if layer.splits_columns else None
        self._plan_in_place()   # a layer's arrays may be shared with the other ranks now

    def _plan_input_grads(self, last, need_input_grad):
        """In blocks of columns, which splitting layers must share their input gradient whole
        (``share_input_grad``). Not one whose gradient passes only through elementwise layers to
        the last layer backward runs, a splitting one that returns no input gradient: that layer
        reads its own blocks of columns alone, which are the blocks this rank computed above it
        (the same blocks of the same number of columns), so the allgather would bring nothing
        read."""
        own_columns_enough = False   # whether the layers below read only this rank's columns
        for i in range(last, len(self.layers)):
            layer = self.layers[i]
            if layer.splits_columns:
                layer.share_input_grad = not own_columns_enough
                own_columns_enough = i == last and not need_input_grad
            elif not layer.elementwise:
                own_columns_enough = False

    def set_batch_context(self, context):
        """Tell the layers that draw per-sample randomness (Dropout) the step and the rows'
        positions."""
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
    # Called as gradient_ready(index) once backward has filled the gradients of layers[index] (and
    # of every layer after it): --overlap-allreduce starts reducing the ones that are final
    # (distributed.overlap.GradientBuckets).
    gradient_ready = None

    def forward(self, x, first=0):
        """The output of ``layers[first:]`` for ``x``."""
        for layer in self.layers[first:]:
            x = layer.forward(x)
            if self.observer is not None:
                self.observer("forward", layer, x)
        return x

    def backward(self, dout, need_input_grad=False, first=0):
        """Fill ``self.grads`` of ``layers[first:]`` from the gradient of the loss w.r.t. the
        output.

        Returns the gradient w.r.t. the input of ``layers[first]`` when ``need_input_grad``.
        """
        last = first if need_input_grad else max(first, self._first_trained)
        if self.columns is not None:
            self._plan_input_grads(last, need_input_grad)
        for i in range(len(self.layers) - 1, last - 1, -1):
            layer = self.layers[i]
            dout = layer.backward(dout, need_input_grad=need_input_grad or i > last)
            if (self.columns is not None and not layer.splits_columns
                    and not self.columns.owns_whole_batch_layers):
                for grad in layer.grads.values():   # one owner per gradient: see columns.py
                    disown(grad)
            if self.observer is not None:
                self.observer("backward", layer, dout)
            if self.gradient_ready is not None:
                self.gradient_ready(i)
        return dout if need_input_grad else None
