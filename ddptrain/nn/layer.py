"""The layer base class: named parameters and buffers, a mode, a forward and a backward pass.

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

Layers write their outputs into scratch arrays they own and reuse on the next
call (grown only when a larger batch arrives). The array returned by
``forward`` or ``backward`` is therefore valid until the next call of the same
method: copy it if you need to keep it.

The matrix products go through ``self.backend`` (``backends.gemm.Backend``):
numpy's ``matmul`` unless the model was handed another library's
(``Sequential.use_backend``).
"""

from __future__ import annotations

import numpy as np

from ddptrain.backends.gemm import NUMPY
from ddptrain.errors import UserError

# Every Layer subclass, by class name: how a model description becomes a model again.
LAYER_TYPES = {}


class ShapeError(UserError):
    """An input whose shape does not fit a layer."""


def no_reduction(array):
    """Summing an array over the ranks in one process (or for per-rank statistics): the array as it
    is."""
    return array


class Scratch:
    """Arrays reused across calls, keyed by name; grown along the first (batch) axis on demand."""

    def __init__(self):
        self._arrays = {}
        self._layouts = {}   # name -> the layout of what its caller writes (zeroed_for)

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

    def zeroed_for(self, name, shape, dtype, layout):
        """``get(name, shape, dtype)``, all zeros whenever it is new or ``layout`` (where the caller
        writes in it) differs from the last call's: what the caller leaves unwritten stays zero.

        The layout is kept here, beside the array, so that a fresh scratch (a replica's) starts
        over rather than trusting zeros that were never written.
        """
        kept = self._arrays.get(name)
        array = self.get(name, shape, dtype, zeroed=True)
        if self._arrays[name] is kept and self._layouts.get(name) != layout:
            array[...] = 0
        self._layouts[name] = layout
        return array

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
    # the array forward returned is the layer's own and its backward never reads it, so that the
    # layer after may write over it (a ReLU, a BatchNorm's centring, a pooling's input gradient)
    output_is_scratch = False
    # nothing reads the array backward returned after the caller has it
    input_grad_is_scratch = False
    # works on (C, H, W) samples: (H, W) images gain a channel axis before it
    takes_channels = False
    takes_features = False          # works on rows of features: images are flattened before it
    # computes its products in fixed blocks of columns when handed a ``columns.ColumnSplit``
    # (``--reproducible``); a layer without runs on the whole batch on every rank instead
    splits_columns = False
    columns = None
    # computes each row of its output and of its input gradient from that row alone, with no sum
    # over rows and no product whose bits depend on the rows beside it: --reproducible's groups
    # of rows run it on all of a thread's rows at once (training/groups.py)
    rowwise = False
    # takes --reproducible's groups of rows itself (training/groups.py): told, for a training pass,
    # the groups' (start, stop) rows of its input (row_groups), where each group's parameter
    # gradients go (group_grads: {name: (groups, *shape)}) and how to add a sum over every group of
    # the batch (sum_groups: (groups, K) -> (K,)), it sums over each group's rows apart (BatchNorm,
    # Conv2d); a layer without runs once per group, on a copy
    sums_over_rows = False
    row_groups = group_grads = sum_groups = None
    # computes each value of its output and of its input gradient from the value at the same place
    # alone (no parameters): --reproducible's Linear layers then need only their own columns of
    # the gradient that passes through it (Sequential._plan_input_grads)
    elementwise = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        LAYER_TYPES[cls.__name__] = cls

    def __init__(self):
        self.name = None     # given by Sequential: "linear1", "relu2", ...
        self.params = {}     # name -> array (a view into the model's flat parameters)
        self.grads = {}      # name -> array of the same shape (a view into the flat gradients)
        self.buffers = {}    # name -> array (a view into the model's flat buffers)
        self.training = True
        # the library of the matrix products: Sequential.use_backend hands it on
        self.backend = NUMPY
        self._scratch = Scratch()

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
        """The shape of one sample's output for one sample's input shape; ShapeError if it does not
        fit."""
        return tuple(input_shape)

    def flops(self, input_shape):
        """Floating-point operations of the forward pass for one sample: those of matrix products
        (2 per multiply-add), where the time goes; element-wise layers count 0."""
        return 0

    def workspace(self, input_shape):
        """Values per sample this layer keeps in work arrays besides its output and input
        gradient."""
        return 0

    def block_bytes(self):
        """Bytes of work arrays whose size does not grow with the batch (a convolution's blocks)."""
        return 0

    def plan_in_place(self, before, after):
        """Called by ``Sequential`` with the layers on either side (None at an end): a layer
        that may write over its neighbours' arrays (see ``output_is_scratch``) decides here
        whether it does. The default writes over nothing."""

    def forward(self, x):
        raise NotImplementedError

    def backward(self, dout, need_input_grad=True):
        raise NotImplementedError


def shape_text(shape):
    return "x".join(map(str, shape)) if len(shape) != 1 else f"{shape[0]}"
