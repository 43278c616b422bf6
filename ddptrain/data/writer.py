"""Writing a data file (the layout ``format.py`` describes), atomically, with its checksums."""

from __future__ import annotations

import hashlib
import io
import math
import os

import h5py
import numpy as np

from ddptrain.data.format import (
    CHUNK_BYTES,
    FORMAT,
    FORMAT_VERSION,
    MAX_CLASS_NAME,
    MAX_CLASSES,
    ROWS_PER_CHUNK,
    SPLITS,
    _different_image_shapes,
)
from ddptrain.data.readable import mark_checked
from ddptrain.durable import write_atomically


def write_dataset(path, train_images, train_labels, test_images, test_labels, attrs=None,
                  n_classes=None, class_names=None):
    """Write a data file atomically: readers see the old file or the new one, never half.

    Images are uint8 arrays of shape ``(N, H, W)`` or ``(N, C, H, W)``, the
    same image shape in both splits; labels are integer arrays of shape
    ``(N,)`` in ``0..n_classes-1``. ``n_classes`` defaults to the largest
    label + 1; ``class_names`` (``n_classes`` strings) default to "0", "1",
    .... ``attrs`` are extra root attributes (dataset, source, checksums...).
    Bad arguments raise ValueError.
    """
    path = os.fspath(path)
    splits = {"train": _checked_split("train", train_images, train_labels),
              "test": _checked_split("test", test_images, test_labels)}
    different = _different_image_shapes(splits["train"][0].shape, splits["test"][0].shape)
    if different:
        raise ValueError(different)
    n_classes, class_names = check_classes({f"{split} labels": labels
                                            for split, (_, labels) in splits.items()}, n_classes,
                                           class_names)
    label_type = np.uint8 if n_classes <= 256 else np.uint16
    splits = {split: (images, labels.astype(label_type))
              for split, (images, labels) in splits.items()}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # built in memory, then written with plain writes (durable.write_atomically)
    buffer = io.BytesIO()
    # libver="latest": HDF5's newest file format, whose metadata all carries checksums.
    with h5py.File(buffer, "w", libver="latest") as f:
        f.attrs["format"] = _fixed(FORMAT)
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["n_classes"] = n_classes
        # fixed-length
        f.attrs["class_names"] = np.array([name.encode("utf-8") for name in class_names])
        f.attrs["content_sha256"] = _fixed(content_sha256(splits))
        for name, value in (attrs or {}).items():
            f.attrs[name] = _fixed(value)
        for split, (images, labels) in splits.items():
            _write_split(f, split, images, labels)
    # concurrent writers: the last rename wins, with a whole file
    write_atomically(path, buffer.getbuffer())
    mark_checked(path)   # written here: check_readable need not read it again


def content_sha256(splits):
    """SHA-256 of the values a file holds, ``{split: (images, labels)}`` in the order of SPLITS, as
    they are stored: what tells two copies of a data file from two files (ranks on several nodes
    compare it)."""
    digest = hashlib.sha256()
    for split in SPLITS:
        for array in splits[split]:
            digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    return digest.hexdigest()


def _checked_split(split, images, labels):
    images, labels = np.asarray(images), np.asarray(labels)
    check_split(images, labels, f"{split} images", f"{split} labels")
    return images, labels


def check_split(images, labels, x, y, floats=False):
    """One split's arrays, as a data file holds them (and, with ``floats``, floating-point images
    too): ValueError naming ``x`` (the images) or ``y`` (the labels) otherwise."""
    kinds = "uint8 or floating-point" if floats else "uint8"
    if (images.ndim not in (3, 4)
            or not (images.dtype == np.uint8 or floats and images.dtype.kind == "f")
            or 0 in images.shape[1:]):
        raise ValueError(f"{x} must be {kinds} images (N, H, W) or (N, C, H, W), got "
                         f"{images.dtype} of shape {images.shape}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"{y} must be 1-D integers, got {labels.dtype} of shape {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{x} has {len(images)} images but {y} has {len(labels)} labels")
    if len(images) == 0:
        raise ValueError(f"{x} holds no images")
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        raise ValueError(f"{x} holds NaN or infinite values")
    if labels.min() < 0:
        raise ValueError(f"label {labels.min()} in {y} is negative")


def check_classes(labels, n_classes=None, class_names=None):
    """``(n_classes, class_names)`` for labels ``{what: array}``: as given, or implied (the largest
    label
    + 1; "0", "1", ... as names), and consistent with the labels. ValueError otherwise."""
    largest, where = max((int(array.max()), what) for what, array in labels.items())
    if class_names is not None:
        class_names = list(class_names)
        n_classes = len(class_names) if n_classes is None else n_classes
    n_classes = largest + 1 if n_classes is None else n_classes
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) \
            or not 2 <= n_classes <= MAX_CLASSES:
        raise ValueError(f"the class count must be a whole number from 2 to {MAX_CLASSES}, got "
                         f"{n_classes!r}")
    n_classes = int(n_classes)
    if largest >= n_classes:
        raise ValueError(f"label {largest} in {where} is outside 0..{n_classes - 1} "
                         f"({n_classes} classes)")
    class_names = [str(c) for c in range(n_classes)] if class_names is None else class_names
    if len(class_names) != n_classes:
        raise ValueError(f"{len(class_names)} class names for {n_classes} classes")
    for name in class_names:
        if not isinstance(name, str) or not name or len(name.encode("utf-8")) > MAX_CLASS_NAME:
            raise ValueError(f"a class name must be a non-empty string of at most {MAX_CLASS_NAME} "
                             f"bytes, got {name!r}")
    return n_classes, class_names


def _fixed(value):
    """Strings as fixed-length bytes: stored in the (checksummed) object header, not in the global
    heap."""
    return np.bytes_(value.encode("utf-8")) if isinstance(value, str) else value


def _write_split(f, split, images, labels):
    group = f.create_group(split)
    image_bytes = math.prod(images.shape[1:])
    chunk_rows = min(len(images), ROWS_PER_CHUNK, max(1, CHUNK_BYTES // image_bytes))
    group.create_dataset("images", data=images, chunks=(chunk_rows, *images.shape[1:]),
                         fletcher32=True)
    group.create_dataset("labels", data=labels, chunks=(min(len(labels), 64 * ROWS_PER_CHUNK),),
                         fletcher32=True)
