"""The numpy network: layers with a hand-written forward and backward, a sequential model, the
losses, and gradient checks. Nothing here knows about MPI, nor how the loss is normalised across
ranks.

    layer.py          the Layer base class (parameters, buffers, scratch arrays)
    layers.py         Flatten, Linear, ReLU, and a standalone Softmax
    conv.py           Conv2d (im2col and one matrix product, wide rows)
    conv_channels_last.py, conv_shifts.py
                      its other ways: channels last (many channels), backward by shifted rows
    pooling.py        MaxPool2d, AvgPool2d
    normalization.py  BatchNorm (statistics over the global batch, through a sum handed in)
    dropout.py        Dropout (masks from a counter-based generator: the same on any rank count)
    model.py          Sequential: the layers, their flat parameter/gradient/buffer arrays
    losses.py         SoftmaxCrossEntropy (fused), CrossEntropy, log-sum-exp
    spec.py           --model strings ("784-512-256-10", "cnn") as layers
    gradcheck.py      a layer's gradients against finite differences
"""

from ddptrain.nn.conv import Conv2d
from ddptrain.nn.dropout import BatchContext, Dropout
from ddptrain.nn.layer import Layer, ShapeError
from ddptrain.nn.layers import Flatten, Linear, ReLU, Softmax
from ddptrain.nn.losses import CrossEntropy, SoftmaxCrossEntropy
from ddptrain.nn.model import Sequential
from ddptrain.nn.normalization import BatchNorm
from ddptrain.nn.pooling import AvgPool2d, MaxPool2d

__all__ = ["AvgPool2d", "BatchContext", "BatchNorm", "Conv2d", "CrossEntropy", "Dropout", "Flatten",
           "Layer", "Linear", "MaxPool2d", "ReLU", "Sequential", "ShapeError", "Softmax",
           "SoftmaxCrossEntropy"]
