"""IDX files (the format of MNIST and Fashion-MNIST): parsing, MD5 checks, and conversion to the
data file.

An IDX file is a big-endian header (two zero bytes, a type code, the number of
dimensions, then each dimension as a 32-bit count) followed by the values. The
files may come gzip-compressed; they are verified against known MD5s (where a
set's are known) before anything is converted, so a wrong or damaged download
never becomes a data file.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import pathlib
import struct
import zlib
from datetime import datetime, timezone

import numpy as np

from ddptrain.data.format import MAX_CLASSES
from ddptrain.data.writer import write_dataset
from ddptrain.errors import DataError

IDX_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
_GZIP_MAGIC = b"\x1f\x8b"

# IDX type codes (third byte of the magic number) and their big-endian dtypes.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class ChecksumMismatch(DataError):
    """A file is not the one a known set's MD5 names: damaged, or another set."""


# ---------------------------------------------------------------- IDX files


def read_idx(path) -> np.ndarray:
    """Read an IDX file, raw or gzipped, into a native-endian array of the shape its header
    gives."""
    return parse_idx(_read_uncompressed(path), os.fspath(path))


def parse_idx(data: bytes, name) -> np.ndarray:
    """Parse the bytes of an uncompressed IDX file; ``name`` is used in error messages.

    The format: two zero bytes, a type code, the number of dimensions ``d``,
    ``d`` big-endian uint32 sizes, then the values, big-endian, row-major.
    """
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_TYPES:
        raise DataError(f"{name}: not an IDX file (magic number 0x{data[:4].hex()})")
    n_dims = data[3]
    if n_dims == 0:
        raise DataError(f"{name}: IDX header declares no dimensions")
    header_size = 4 + 4 * n_dims
    if len(data) < header_size:
        raise DataError(f"{name}: truncated IDX header ({len(data)} bytes, {n_dims} dimensions)")
    shape = struct.unpack(f">{n_dims}I", data[4:header_size])
    dtype = np.dtype(_IDX_TYPES[data[2]])
    expected = math.prod(shape) * dtype.itemsize
    found = len(data) - header_size
    if found != expected:
        why = "truncated" if found < expected else "trailing bytes"
        raise DataError(f"{name}: header says shape {shape} ({expected} bytes of data) "
                        f"but the file holds {found} ({why})")
    values = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
    return values.astype(dtype.newbyteorder("="))   # a writable, native-endian copy


def _read_uncompressed(path) -> bytes:
    """The content of ``path``, gunzipped if it is gzip data (recognised by its magic, not its
    name)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from e
    return _gunzip_if_compressed(data, path)


def _gunzip_if_compressed(data: bytes, name) -> bytes:
    if not data.startswith(_GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{name}: corrupt gzip data: {e}") from e


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _verify_md5(data: bytes, expected: str, name, title="MNIST") -> str:
    """Return the MD5 of ``data``, or raise DataError if it is not ``expected``."""
    actual = _md5(data)
    if actual != expected:
        raise ChecksumMismatch(f"{name}: md5 is {actual}, expected {expected} (damaged, or not the "
                               f"{title} file)")
    return actual

# ---------------------------------------------------------------- conversion


def convert(contents, output, log, *, source, dataset, license=None, class_names=None,
            n_classes=None, classes_from=None) -> pathlib.Path:
    """Parse the four IDX files and write them as the data file ``output``.

    ``contents``: the uncompressed files, keyed like ``IDX_FILES``; their
    MD5s, ``dataset`` (the set's name), ``source`` and ``license`` become
    attributes of the file. The class count is ``len(class_names)`` if
    given, else ``n_classes`` if given, else the largest label + 1;
    ``classes_from`` names where a given count comes from ("--classes 10"),
    for the message about a label outside it.
    """
    arrays = parse_idx_set(contents, source)
    given = len(class_names) if class_names is not None else n_classes
    n_classes = _class_count(arrays, given, source, classes_from)
    attrs = {"dataset": dataset, "source": source,
             "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if license:
        attrs["license"] = license
    attrs.update({f"md5_{key}": _md5(data) for key, data in contents.items()})
    output = pathlib.Path(output)
    _write(output, arrays, attrs, n_classes, class_names, source)
    log(f"wrote {output} ({len(arrays['train_labels'])} training and "
        f"{len(arrays['test_labels'])} test images, {n_classes} classes)")
    return output


def _write(output, arrays, attrs, n_classes, class_names, source):
    try:
        write_dataset(output, arrays["train_images"], arrays["train_labels"], arrays["test_images"],
                      arrays["test_labels"], attrs=attrs, n_classes=n_classes,
                      class_names=class_names)
    # whatever the checks here let through: still one line, naming the source
    except ValueError as e:
        raise DataError(f"{source}: {e}") from e
    except OSError as e:
        raise DataError(f"{output}: cannot write it: {e.strerror or e}") from e


def parse_idx_set(contents, source) -> dict:
    """The arrays of the four IDX files (bytes keyed like ``IDX_FILES``), checked to make a data
    set."""
    arrays = {key: parse_idx(data, f"{source}: {IDX_FILES[key]}") for key, data in contents.items()}
    for split in ("train", "test"):
        _check_idx_pair(arrays[f"{split}_images"], arrays[f"{split}_labels"], split, source)
    train_shape, test_shape = arrays["train_images"].shape[1:], arrays["test_images"].shape[1:]
    if train_shape != test_shape:
        raise DataError(f"{source}: {IDX_FILES['train_images']} holds images of shape "
                        f"{train_shape} but {IDX_FILES['test_images']} of shape {test_shape}")
    return arrays


def _check_idx_pair(images, labels, split, source):
    images_name = IDX_FILES[f"{split}_images"]
    labels_name = IDX_FILES[f"{split}_labels"]
    if images.ndim not in (3, 4) or images.dtype != np.uint8 or 0 in images.shape[1:]:
        raise DataError(f"{source}: {images_name} must hold uint8 images (N, H, W) or "
                        f"(N, C, H, W), found {images.dtype} of shape {images.shape}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{source}: {labels_name} must hold integer labels (N,), "
                        f"found {labels.dtype} of shape {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{source}: {images_name} has {len(images)} images "
                        f"but {labels_name} has {len(labels)} labels")
    if len(images) == 0:
        raise DataError(f"{source}: {images_name} holds no images")
    if labels.min() < 0:
        raise DataError(f"{source}: {labels_name} holds the negative label {labels.min()}")


def _class_count(arrays, given, source, classes_from) -> int:
    """``given``, once every label is checked to lie below it; else the largest label + 1."""
    labels = {IDX_FILES[key]: arrays[key] for key in ("train_labels", "test_labels")}
    if given is not None:
        for name, values in labels.items():
            outside = values[values >= given]
            if outside.size:
                raise DataError(f"{source}: {name} holds label {outside[0]}, "
                                f"but {classes_from} allows only 0..{given - 1}")
        return given
    largest = max(int(values.max()) for values in labels.values())
    if largest == 0:
        raise DataError(f"{source}: every label is 0, a single class: give the class count "
                        "with --classes N")
    if largest >= MAX_CLASSES:
        raise DataError(f"{source}: the largest label is {largest}; ddptrain handles at most "
                        f"{MAX_CLASSES} classes")
    return largest + 1
