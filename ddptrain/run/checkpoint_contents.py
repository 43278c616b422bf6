"""What a checkpoint may hold, checked before any of it is used: the metadata against a schema,
and every array's link, storage, type and shape before its values are read.

The checksum proves that the bytes are the ones written, not that ddptrain
wrote them: a file crafted by hand, with its checksum recomputed, passes it.
Such a file must still be refused with one line, and must not make ddptrain
allocate more than the model it describes, nor read values from anywhere but
the verified bytes. Hence, before ``checkpoint.load`` reads an array:

* the metadata (JSON) matches ``SCHEMA``: types, ranges, nothing nested where
  a number belongs;
* each array is a dataset reached by a hard link, stored contiguously or in
  unfiltered chunks *inside the file*: a virtual dataset, external storage or
  an external link would have HDF5 read another file (or nothing, as zeros),
  and a compact or unallocated one is not covered by the check either;
* its type is the checkpoint's dtype and its shape the one the model
  description gives it, so that nothing larger than the model is allocated.
"""

from __future__ import annotations

import math
import typing

import h5py
import numpy as np

from ddptrain.errors import UserError
from ddptrain.nn.model import layers_from_description
from ddptrain.run.config import Config
from ddptrain.run.schema import (
    SCALAR,
    Boolean,
    Integer,
    ListOf,
    MapOf,
    Number,
    OneOf,
    Record,
    Text,
    problems,
)
from ddptrain.training.early_stopping import METRICS as EARLY_STOP_METRICS

SHA256 = Text(r"[0-9a-f]{64}", 64, "64 hexadecimal digits")
NAME = Text(r"[A-Za-z_][A-Za-z0-9_]{0,199}", 200, "a name (letters, digits, _)")


def _config_schema():
    """Config's fields with their types (any may be absent: older versions had fewer); keys of
    other ddptrain versions as plain values."""
    simple = {int: (Integer(-2 ** 53), "an integer"), float: (Number(), "a finite number"),
              str: (Text(), "a string"), bool: (Boolean(), "true or false")}
    keys = {}
    for name, kind in typing.get_type_hints(Config).items():
        optional = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        if optional:   # Optional[...]
            schema, words = simple[optional[0]]
            keys[name] = OneOf((schema, None), f"{words} or null")
        else:
            keys[name] = simple[kind][0]
    return Record(keys, optional=tuple(keys), others=SCALAR)


SCHEMA = {
    "dtype": Text("float32|float64", what="float32 or float64"),
    "model_summary": Text(),
    # a null name: the layer's type and number (nn.model.name_layers)
    "model": ListOf(Record({"name": OneOf((NAME, None), "a name or null"), "type": NAME,
                            "args": MapOf(SCALAR, 100)}), 1, 100_000),
    "optimizer": Record({"type": NAME, "steps": Integer()}),
    "state": Record({
        "epoch": Integer(), "step_in_epoch": Integer(), "step": Integer(),
        "train_sums": Record({"loss_sum": Number(0), "correct": Integer(), "samples": Integer()}),
        "n_train": Integer(1), "best_accuracy": Number(-1, 1), "world_size": Integer(1),
        # the data file's content_sha256 (null: it had none); absent from older checkpoints
        "data_sha256": OneOf((SHA256, None), "64 hexadecimal digits or null"),
        # early stopping's state (training/early_stopping.py): absent without --early-stop, and
        # from older checkpoints
        "early_stop": Record({
            "metric": Text("|".join(EARLY_STOP_METRICS), what=" or ".join(EARLY_STOP_METRICS)),
            "min_delta": Number(0), "best": OneOf((Number(), None), "a finite number or null"),
            "best_epoch": Integer(), "bad_epochs": Integer(),
        }),
        # the streamed order (data/stream_order.py): absent in memory, and from older checkpoints
        "data_order": Record({"window_blocks": Integer(1), "block_rows": Integer(1)}),
    }, optional=("data_sha256", "early_stop", "data_order")),
    "config": _config_schema(),
    "metrics": ListOf(MapOf(SCALAR, 100)),
}

KINDS = {"params": "parameter", "buffers": "buffer", "optimizer": "optimiser state"}
# The arrays each optimiser keeps (state_dict): none before its first step, else all of them.
OPTIMIZER_ARRAYS = {"SGD": ("velocity",), "Adam": ("exp_avg", "exp_avg_sq"),
                    "AdamW": ("exp_avg", "exp_avg_sq")}


def metadata_problems(metadata):
    """Every departure of the parsed attributes from ``SCHEMA``."""
    return [problem for key, schema in SCHEMA.items()
            for problem in problems(metadata[key], schema, key)]


def expected_shapes(metadata):
    """``({group: {name: shape}}, problems)``: the arrays the model description and the optimiser's
    type call for (optimiser arrays: those it may hold), or why they cannot be known."""
    try:
        layers = layers_from_description(metadata["model"])
        params = {f"{layer.name}.{name}": tuple(shape) for layer in layers
                  for name, shape in layer.param_shapes().items()}
        buffers = {f"{layer.name}.{name}": tuple(shape) for layer in layers
                   for name, shape in layer.buffer_shapes().items()}
        size = sum(math.prod(shape) for shape in params.values())
    except UserError as error:
        return {}, [f"its model description does not build ({error})"]
    except (TypeError, ValueError, OverflowError, AttributeError) as error:
        return {}, [f"its model description does not build ({type(error).__name__}: {error})"]
    kind = metadata["optimizer"]["type"]
    if kind not in OPTIMIZER_ARRAYS:
        return {}, [f"optimizer.type must be one of {', '.join(OPTIMIZER_ARRAYS)}, got {kind!r}"]
    return {"params": params, "buffers": buffers,
            "optimizer": {name: (size,) for name in OPTIMIZER_ARRAYS[kind]}}, []


def array_problems(f, expected, dtype, file_size):
    """Every array of the open file ``f`` that is not where, what and as large as ``expected``
    says, checked from HDF5's metadata alone (no value read)."""
    found = []
    for group, shapes in expected.items():
        link = f.get(group, getlink=True)
        if not isinstance(link, h5py.HardLink) or not isinstance(f[group], h5py.Group):
            found.append(f"/{group} is not a group of the file")
            continue
        names, kind = set(f[group]), KINDS[group]
        found += [f"it has no {kind} {name}" for name in sorted(set(shapes) - names)
                  if group != "optimizer"]
        found += [f"it holds {kind} {name}, which its model description has not"
                  for name in sorted(names - set(shapes))]
        if group == "optimizer" and names and names != set(shapes):
            found.append(f"/optimizer holds {', '.join(sorted(names))}, not "
                         f"{' and '.join(sorted(shapes))}")
        for name in sorted(names & set(shapes)):
            where = f"/{group}/{name}"
            if not isinstance(f[group].get(name, getlink=True), h5py.HardLink):
                found.append(f"{where} is a link, not an array stored in the file")
                continue
            found += _dataset_problems(f[group][name], f"{kind} {name}", shapes[name], dtype,
                                       file_size)
    return found


def _dataset_problems(dataset, where, shape, dtype, file_size):
    if not isinstance(dataset, h5py.Dataset):
        return [f"{where} is not an array"]
    if dataset.dtype != np.dtype(dtype):
        return [f"{where} holds {dataset.dtype}, not {dtype}"]
    if dataset.shape != shape:
        shown = "x".join(map(str, dataset.shape)) or "a scalar"
        return [f"{where} is {shown} there, {'x'.join(map(str, shape)) or 'a scalar'} in its "
                "model description"]
    storage = _storage_problem(dataset, file_size)
    return [f"{where} {storage}"] if storage else []


def _storage_problem(dataset, file_size):
    """Why the dataset's values are not all bytes of the file (which the checksum covers), or
    None."""
    plist = dataset.id.get_create_plist()
    layout = plist.get_layout()
    if layout == h5py.h5d.VIRTUAL:
        return "is a virtual dataset (its values would come from other files)"
    if plist.get_external_count():
        return "is stored in external files"
    if plist.get_nfilters():
        return "is compressed or filtered (ddptrain writes plain arrays)"
    itemsize = dataset.dtype.itemsize
    if layout == h5py.h5d.CONTIGUOUS:
        extents = [(dataset.id.get_offset(), dataset.id.get_storage_size())]
        wanted = [(dataset.size * itemsize)] if dataset.size else []
    elif layout == h5py.h5d.CHUNKED:
        extents = [(chunk.byte_offset, chunk.size) for chunk in
                   map(dataset.id.get_chunk_info, range(dataset.id.get_num_chunks()))]
        # every chunk the shape needs, each whole (edge chunks are stored whole too)
        count = math.prod(-(-n // c) for n, c in zip(dataset.shape, dataset.chunks))
        wanted = [math.prod(dataset.chunks) * itemsize] * count
    else:
        return "has a compact layout (only contiguous or chunked arrays are read)"
    if not wanted:
        return None
    if (len(extents) != len(wanted) or [size for _, size in extents] != wanted
            or any(offset is None or offset + size > file_size for offset, size in extents)):
        return ("is not stored whole in the file (values not stored would be read as a fill "
                "value)")
    return None
