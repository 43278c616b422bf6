"""A checkpoint's parameters and buffers as a safetensors file, under their ddptrain names.

The arrays are the checkpoint's, value for value and in its dtype
(``linear1.weight``, ``batchnorm1.running_mean``, ...); the optimiser's state
is left out (a safetensors file is for inference, or for another framework).
The file's metadata (strings only, as the format wants) makes it describe
itself: the model's description as JSON (what
``ddptrain.nn.Sequential.from_description`` rebuilds), the image shape it
takes, the input scaling, the classes, and the layouts that differ from
PyTorch's (docs/export.md shows the loading into the equivalent PyTorch model).
"""

from __future__ import annotations

import numpy as np

from ddptrain.export.onnx_graph import require

# What differs from PyTorch's layout, for someone holding only the file.
LAYOUT = ("Linear weights are (in, out), y = x @ weight + bias: PyTorch's nn.Linear weight is "
          "their transpose; Conv2d weights are (out, in, k, k) as PyTorch's; BatchNorm's weight, "
          "bias, running_mean and running_var are nn.BatchNorm1d/2d's")


def safetensors_bytes(arrays, properties):
    """The bytes of a safetensors file of ``arrays`` (``{name: ndarray}``) and the string
    ``properties``."""
    require("safetensors", "safetensors")
    from safetensors.numpy import save

    tensors = {name: np.ascontiguousarray(array) for name, array in arrays.items()}
    return save(tensors, metadata={**properties, "layout": LAYOUT})
