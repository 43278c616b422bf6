"""The ``export`` command: a checkpoint's model as ONNX, or its parameters and buffers as
safetensors.

    python -m ddptrain export CHECKPOINT --format onnx|safetensors [--output PATH] [--force]

The checkpoint is verified and checked as ``evaluate`` checks it (its
checksum, its metadata, its arrays against its model description), and the
data it was trained on (or ``--data``) gives the shape of the images the
model takes and the names of the classes: a model of the --model grammar
knows the pixels per image, not whether they are 28x28 or 784x1. Only the
data file's metadata is read.

* **ONNX** (``onnx_graph``): the model with the input scaling, taking the
  uint8 images as the data file stores them (``--input scaled``: float32
  values already divided by 255), with a dynamic batch; outputs ``logits``
  and ``probabilities``. Always float32: a float64 checkpoint's arrays are
  rounded to float32, as runtimes run float32 graphs everywhere and float64
  ones in few places (onnxruntime's CPU convolution and average pooling have
  no float64 kernels).
* **safetensors** (``safetensors_file``): the arrays as the checkpoint holds
  them, dtype included.

Both libraries are optional extras (``pip install 'ddptrain[onnx]'``,
``'ddptrain[safetensors]'``); without one, its format is refused with one
line, before anything is read. The file is written atomically
(``durable.write_atomically``), beside the checkpoint by default
(``best.h5`` -> ``best.onnx``); an existing file is replaced only with
``--force``, and the checkpoint itself never.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ddptrain import __version__
from ddptrain.commands import data_for
from ddptrain.data import format as data_format
from ddptrain.data.readable import check_readable
from ddptrain.durable import write_atomically
from ddptrain.errors import EXIT_OK, UserError
from ddptrain.export.onnx_graph import (
    BATCH,
    INPUT,
    LOGITS,
    OPSET,
    PROBABILITIES,
    onnx_model,
    require,
    unsupported,
)
from ddptrain.export.safetensors_file import safetensors_bytes
from ddptrain.nn.model import input_shape_of, layers_from_description
from ddptrain.run import checkpoint as ckpt_io
from ddptrain.run.preflight import check_fits_data
from ddptrain.run.resume import check_description_fits

FORMATS = {"onnx": ".onnx", "safetensors": ".safetensors"}
INPUTS = ("pixels", "scaled")


def default_output(checkpoint, kind):
    """Where an export goes unless --output says: beside the checkpoint, its suffix replaced."""
    return Path(checkpoint).with_suffix(FORMATS[kind])


def export(checkpoint, kind, output=None, data=None, force=False, input="pixels"):
    """Export the checkpoint at ``checkpoint`` as ``kind`` (``"onnx"`` or ``"safetensors"``) to
    ``output`` (default: ``default_output``); returns ``(path written, a line saying what it
    holds)``. UserError, one line, for anything the user can fix."""
    if kind not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {kind!r}")
    if input not in INPUTS:
        raise UserError(f"--input must be one of {', '.join(INPUTS)}, got {input!r}")
    if input != "pixels" and kind != "onnx":
        raise UserError(f"--input {input} is for --format onnx (a safetensors file holds arrays, "
                        "no input)")
    require("onnx" if kind == "onnx" else "safetensors", kind)   # before anything is read
    target = Path(output) if output else default_output(checkpoint, kind)
    _check_target(target, checkpoint, force)
    loaded = ckpt_io.load(checkpoint)
    layers = layers_from_description(loaded.model)
    check_description_fits(loaded, layers)
    if kind == "onnx" and unsupported(layers):
        raise UserError(f"{checkpoint}: {unsupported(layers)}")
    path = data_for(loaded, data)
    check_readable(path)
    info = data_format.inspect(path)
    check_fits_data(layers, info, f"{checkpoint}: model {loaded.model_summary}")
    arrays = {**loaded.params, **loaded.buffers}
    properties = _properties(loaded, layers, info)
    step = f"model {loaded.model_summary}, step {loaded.state.get('step')}"
    if kind == "onnx":
        scaled = input == "scaled"
        properties["description"] = _onnx_description(loaded, info, scaled)
        content = onnx_model(layers, arrays, info.image_shape, properties,
                             scaled_input=scaled).SerializeToString()
        dims = " x ".join(map(str, (BATCH, *info.image_shape)))
        said = (f"ONNX opset {OPSET}, input {INPUT!r} {'float32' if scaled else 'uint8'} {dims}, "
                f"outputs {LOGITS!r} and {PROBABILITIES!r} ({BATCH} x {info.n_classes}); {step}")
    else:
        properties["description"] = (f"the parameters and buffers of ddptrain model "
                                     f"{loaded.model_summary}, under their ddptrain names")
        content = safetensors_bytes(arrays, properties)
        said = f"{len(arrays)} arrays of {loaded.dtype} under their ddptrain names; {step}"
    try:
        write_atomically(target, content)
    except OSError as error:
        raise UserError(f"{target}: cannot write the export ({error.strerror or error})") from None
    return target, said


def _check_target(target, checkpoint, force):
    """Refuse to replace the checkpoint, a folder, or (without ``force``) any existing file."""
    if os.path.lexists(target):   # a link too, even one to nothing: it is replaced, not followed
        if os.path.isdir(target) and not os.path.islink(target):
            raise UserError(f"{target} is a folder: give the file to write with --output")
        if _same_file(target, checkpoint):
            raise UserError(f"{target} is the checkpoint itself: give another --output")
        if not force:
            raise UserError(f"{target} exists (--force replaces it)")


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _properties(loaded, layers, info):
    """The metadata both formats carry (strings: ONNX's metadata_props and safetensors' header hold
    nothing else)."""
    state = loaded.state
    return {
        "ddptrain_version": __version__,
        "model": loaded.model_summary,
        # the layers' names, types and arguments: ddptrain.nn.Sequential.from_description's input
        "model_description": json.dumps(loaded.model),
        "checkpoint": Path(loaded.path).name,
        "step": str(state.get("step")),
        "epoch": str(state.get("epoch")),
        "trained_dtype": loaded.dtype,
        "image_shape": json.dumps(list(info.image_shape)),
        "input_shape": json.dumps(list(input_shape_of(layers, info.image_shape))),
        "input_scaling": "pixel / 255 (uint8 pixels 0..255 to floats in [0, 1])",
        "classes": json.dumps(list(info.class_names)),
        "data": Path(info.path).name,
        "data_sha256": state.get("data_sha256") or "",
    }


def _onnx_description(loaded, info, scaled):
    shape = " x ".join(map(str, info.image_shape))
    given = ("float32 images already divided by 255" if scaled else
             "uint8 pixels as the data file stores them (the graph divides them by 255)")
    return (f"ddptrain model {loaded.model_summary} (checkpoint {Path(loaded.path).name}, step "
            f"{loaded.state.get('step')}): input {INPUT!r} {BATCH} x {shape}, {given}; outputs "
            f"{LOGITS!r} and {PROBABILITIES!r} (softmax of the logits), {BATCH} x "
            f"{info.n_classes}, for the classes {', '.join(info.class_names[:10])}"
            + (", ..." if len(info.class_names) > 10 else ""))


def run(args):
    """The command line's ``export``."""
    path, said = export(args.checkpoint, args.format, output=args.output, data=args.data,
                        force=args.force, input=args.input)
    print(f"wrote {path}: {said}")
    return EXIT_OK
