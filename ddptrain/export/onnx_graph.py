"""A checkpoint's model as an ONNX graph, built with the ``onnx`` package's helpers.

The graph takes the images as the data file stores them and does what
ddptrain does to them before the first layer:

    images (uint8, batch x H x W or batch x C x H x W)
      -> Cast to float32 -> Div by 255            (data.format.read_rows: pixel / 255)
      -> Reshape to the shape the first layer takes (Sequential.as_input: 1 x H x W for a
         convolution; a Linear layer's Flatten is a layer of the model)
      -> one node per layer                         -> "logits" (batch x classes)
      -> Softmax                                    -> "probabilities"

A division, not a product with 1/255: IEEE division is correctly rounded, so
the exported model's inputs are bitwise ddptrain's (1/255 is not a float32,
and x * (1/255) differs from x / 255 in the last bit for some pixels).

Each ddptrain layer is one node, named as the layer, whose initializers bear
the checkpoint's names (``conv2d1.weight``): the graph reads like the model's
description. The layouts are ONNX's own, checked against ddptrain's:

* ``Linear``: ``y = x @ W + b`` with ``W`` of ``(in, out)``: ``Gemm`` without
  transposition (PyTorch's ``(out, in)`` weight would need ``transB=1``);
* ``Conv2d``: a cross-correlation with weights ``(out, in, k, k)``, zero
  padding on all four sides and one stride for both axes: ONNX's ``Conv``;
* ``MaxPool2d``, ``AvgPool2d``: no padding, windows that do not fit dropped
  (the floor rule): ``ceil_mode=0``, no ``pads``;
* ``BatchNorm`` in evaluation mode: the running statistics,
  ``BatchNormalization`` (inference: opset 15 on has no training outputs);
* ``Dropout``: the identity in evaluation (an ``Identity`` node);
* ``Flatten``: ``Flatten(axis=1)``; ``ReLU``: ``Relu``; ``Softmax`` (a layer
  over rows): ``Softmax(axis=1)``.

A layer of another type, a user's own or a subclass of one of these (whose
forward may differ), has no node: the export is refused naming it.
"""

from __future__ import annotations

import numpy as np

from ddptrain.data.format import PIXEL_MAX
from ddptrain.errors import UserError
from ddptrain.nn.conv import Conv2d
from ddptrain.nn.dropout import Dropout
from ddptrain.nn.layers import Flatten, Linear, ReLU, Softmax
from ddptrain.nn.model import input_shape_of, output_shape_of
from ddptrain.nn.normalization import BatchNorm
from ddptrain.nn.pooling import AvgPool2d, MaxPool2d

# The operator set of the graph: every operator used here has had its present form since opset 15
# at the latest; 17 (ONNX 1.12, 2022) is what onnxruntime 1.13 on, TensorRT 8.6 and OpenVINO read,
# and what torch.onnx.export wrote by default from PyTorch 2.0 to 2.4.
OPSET = 17
INPUT, LOGITS, PROBABILITIES = "images", "logits", "probabilities"
BATCH = "batch"   # the name of the dynamic first dimension


def require(module, extra):
    """The module ``module``, imported, or a UserError saying how to install it."""
    try:
        return __import__(module)
    except ImportError:
        raise UserError(f"export --format {extra} needs the {module} package, which is not "
                        f"installed: pip install 'ddptrain[{extra}]' (or pip install "
                        f"{module})") from None


def unsupported(layers):
    """The first layer that has no ONNX node here, as a line; None if every layer has one."""
    for layer in layers:
        if type(layer) not in _CONVERTERS:
            known = ", ".join(sorted(kind.__name__ for kind in _CONVERTERS))
            return (f"layer {layer.name} ({type(layer).__name__}) cannot be exported to ONNX: "
                    f"only ddptrain's own layers can ({known})")
    return None


def onnx_model(layers, arrays, image_shape, properties, scaled_input=False):
    """The ONNX ModelProto of ``layers`` (named, with their parameters and buffers in ``arrays``,
    ``{"linear1.weight": array}``) for images of ``image_shape``, checked by
    ``onnx.checker.check_model``. ``properties``: the model's metadata (strings). With
    ``scaled_input`` the input is float32, already divided by 255 (no Cast and Div)."""
    onnx = require("onnx", "onnx")
    from onnx import TensorProto, helper

    problem = unsupported(layers)
    if problem:
        raise UserError(problem)
    graph = _Graph(arrays)
    x = INPUT
    if not scaled_input:
        x = graph.node("Cast", [x], "scale.cast", to=TensorProto.FLOAT)
        x = graph.node("Div", [x, graph.constant("scale.pixel_max", np.float32(PIXEL_MAX))],
                       "scale.divide")
    taken = input_shape_of(layers, image_shape)
    if tuple(taken) != tuple(image_shape):
        # 0: the batch, copied from the input (Reshape's default, allowzero=0): any batch size
        x = graph.node("Reshape", [x, graph.constant("scale.shape", np.array([0, *taken]))],
                       "scale.reshape")
    for layer in layers:
        x = _CONVERTERS[type(layer)](graph, layer, x)
    graph.nodes[-1].output[0] = LOGITS   # the last layer's output is the model's
    graph.node("Softmax", [LOGITS], "output.softmax", axis=1)
    graph.nodes[-1].output[0] = PROBABILITIES
    classes = output_shape_of(layers, image_shape)
    dims = [BATCH, *image_shape]
    inputs = [helper.make_tensor_value_info(
        INPUT, TensorProto.FLOAT if scaled_input else TensorProto.UINT8, dims)]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [BATCH, *classes])
               for name in (LOGITS, PROBABILITIES)]
    opsets = [helper.make_opsetid("", OPSET)]
    model = helper.make_model(
        helper.make_graph(graph.nodes, properties.get("model", "ddptrain"), inputs, outputs,
                          graph.initializers),
        opset_imports=opsets, producer_name="ddptrain",
        producer_version=properties.get("ddptrain_version", ""),
        # the oldest IR version that holds this opset: what older runtimes can still load
        ir_version=helper.find_min_ir_version_for(opsets))
    model.doc_string = properties.get("description", "")
    helper.set_model_props(model, properties)
    onnx.checker.check_model(model, full_check=True)
    return model


class _Graph:
    """The nodes and initializers of a graph being built; values are named after the layers."""

    def __init__(self, arrays):
        from onnx import helper, numpy_helper

        self._helper, self._numpy_helper = helper, numpy_helper
        self.arrays = arrays
        self.nodes, self.initializers = [], []

    def node(self, op, inputs, name, **attributes):
        """Add node ``name`` of operator ``op``; returns the name of its output."""
        output = f"{name}.output"
        self.nodes.append(self._helper.make_node(op, inputs, [output], name=name, **attributes))
        return output

    def constant(self, name, value):
        self.initializers.append(self._numpy_helper.from_array(np.asarray(value), name))
        return name

    def parameter(self, layer, name):
        """The initializer of ``layer``'s array ``name``, in float32 whatever the checkpoint's
        dtype (see the export command's docstring)."""
        full = f"{layer.name}.{name}"
        return self.constant(full, np.asarray(self.arrays[full], dtype=np.float32))

    def parameters(self, layer, names):
        return [self.parameter(layer, name) for name in names if name in layer.param_shapes()]


def _linear(graph, layer, x):
    return graph.node("Gemm", [x, *graph.parameters(layer, ("weight", "bias"))], layer.name)


def _conv(graph, layer, x):
    k, s, p = layer.kernel_size, layer.stride, layer.padding
    return graph.node("Conv", [x, *graph.parameters(layer, ("weight", "bias"))], layer.name,
                      kernel_shape=[k, k], strides=[s, s], pads=[p, p, p, p])


def _pool(op):
    def convert(graph, layer, x):
        k, s = layer.kernel_size, layer.stride
        return graph.node(op, [x], layer.name, kernel_shape=[k, k], strides=[s, s], ceil_mode=0)
    return convert


def _batchnorm(graph, layer, x):
    inputs = [graph.parameter(layer, name)
              for name in ("weight", "bias", "running_mean", "running_var")]
    return graph.node("BatchNormalization", [x, *inputs], layer.name, epsilon=layer.eps)


def _simple(op, **attributes):
    def convert(graph, layer, x):
        return graph.node(op, [x], layer.name, **attributes)
    return convert


# Exact types: a subclass of one of these may compute something else.
_CONVERTERS = {
    Linear: _linear, Conv2d: _conv, MaxPool2d: _pool("MaxPool"), AvgPool2d: _pool("AveragePool"),
    BatchNorm: _batchnorm, ReLU: _simple("Relu"), Flatten: _simple("Flatten", axis=1),
    Dropout: _simple("Identity"), Softmax: _simple("Softmax", axis=1),
}
