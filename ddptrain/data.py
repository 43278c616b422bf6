"""The HDF5 data file: its layout, its validation, and shard reads.

Layout (written by ``write_dataset``, checked by ``inspect``)::

    /train/images   (N, H, W) uint8, chunked by rows, uncompressed
    /train/labels   (N,)      uint8
    /test/images    (M, H, W) uint8
    /test/labels    (M,)      uint8
    root attributes: format = "ddptrain-mnist", format_version = 1,
                     plus provenance (source, md5 of each IDX file, ...)

Images are stored uncompressed and chunked by whole rows so that a block of
consecutive rows (a virtual shard, see ``sampler``) is one cheap hyperslab
read. Every problem with a file becomes a one-line ``DataError`` that names
the file; no h5py exception escapes as a traceback.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass

import h5py
import numpy as np

from .durable import fsync_file, fsync_folder
from .errors import DataError

FORMAT = "ddptrain-mnist"
FORMAT_VERSION = 1
N_CLASSES = 10
SPLITS = ("train", "test")
PIXEL_MAX = 255
ROWS_PER_CHUNK = 1024     # 1024 MNIST images = 784 KiB: fits HDF5's default 1 MiB chunk cache

# What h5py raises on damaged files, odd objects and bad reads.
_H5PY_ERRORS = (OSError, KeyError, ValueError, RuntimeError, TypeError)


@dataclass(frozen=True)
class DatasetInfo:
    """What ``inspect`` learned about a valid data file."""

    path: str
    n_train: int
    n_test: int
    image_shape: tuple   # (H, W): (28, 28) for MNIST
    n_classes: int
    attrs: dict          # the file's root attributes, as plain Python values

    @property
    def n_features(self):
        """Pixels per image: H * W (784 for MNIST)."""
        return self.image_shape[0] * self.image_shape[1]


# ---------------------------------------------------------------- inspect


def inspect(path) -> DatasetInfo:
    """Validate the data file at ``path`` and describe it.

    Reads all labels (small) but only the shape, dtype and last row of each
    images dataset. Raises ``DataError`` with a one-line message
    ``"{path}: <problem>"`` if anything is wrong.
    """
    path = os.fspath(path)
    try:
        with _open(path) as f:
            _check_format(f, path)
            shapes = {split: _check_split(f, split, path) for split in SPLITS}
            different = _different_image_shapes(shapes["train"], shapes["test"])
            if different:
                raise DataError(f"{path}: {different}")
            _check_storage_fits_in_file(f, path)
            attrs = _plain_attrs(f.attrs)
    except DataError:
        raise
    except _H5PY_ERRORS as e:
        raise DataError(f"{path}: cannot read the file: {_one_line(e)}") from e
    return DatasetInfo(path=path, n_train=shapes["train"][0], n_test=shapes["test"][0],
                       image_shape=tuple(shapes["train"][1:]), n_classes=N_CLASSES, attrs=attrs)


def _check_is_file(path):
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a folder, not a data file")


class _open:
    """``h5py.File(path, "r")`` that turns a failure to open into a DataError."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        _check_is_file(self.path)
        try:
            self.file = h5py.File(self.path, "r")
        except _H5PY_ERRORS as e:
            # HDF5 itself notices a truncated file: its end-of-file address is
            # stored in the superblock and checked on open.
            raise DataError(f"{self.path}: not an HDF5 file (or truncated): {_one_line(e)}") from e
        return self.file

    def __exit__(self, *exc):
        self.file.close()
        return False


def _check_format(f, path):
    """Refuse files written for something else or by a newer ddptrain.

    A file without the ``format`` attribute is accepted: the layout alone is
    what the reader needs, and files converted by hand need not carry it.
    """
    file_format = _plain(f.attrs.get("format", FORMAT))
    if file_format != FORMAT:
        raise DataError(f"{path}: format is {file_format!r}, not {FORMAT!r}")
    version = _plain(f.attrs.get("format_version", FORMAT_VERSION))
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise DataError(f"{path}: format_version {version!r} is not supported "
                        f"(this ddptrain reads version {FORMAT_VERSION}); update ddptrain")


def _check_split(f, split, path):
    """Check one split's datasets; return the images' shape ``(N, H, W)``."""
    images = _dataset(f, f"{split}/images", path)
    labels = _dataset(f, f"{split}/labels", path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{path}: '{split}/images' must be 3-D uint8 (N, H, W), "
                        f"found {images.ndim}-D {images.dtype} of shape {images.shape}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{path}: '{split}/labels' must be 1-D integers, "
                        f"found {labels.ndim}-D {labels.dtype} of shape {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{path}: '{split}/images' has {images.shape[0]} rows "
                        f"but '{split}/labels' has {labels.shape[0]}")
    if images.shape[0] == 0:
        raise DataError(f"{path}: the '{split}' split is empty")
    _check_labels_in_range(labels[()], f"{split}/labels", path)
    _ = images[-1]    # makes HDF5 touch the end of the images' storage
    return images.shape


def _dataset(f, name, path):
    obj = f.get(name)
    if obj is None:
        raise DataError(f"{path}: dataset '{name}' is missing")
    if not isinstance(obj, h5py.Dataset):
        raise DataError(f"{path}: '{name}' is a {type(obj).__name__}, not a dataset")
    return obj


def _check_labels_in_range(labels, name, path):
    out_of_range = (labels < 0) | (labels >= N_CLASSES)
    if out_of_range.any():
        first_bad = labels[np.argmax(out_of_range)]
        raise DataError(f"{path}: label {first_bad} in '{name}' is outside 0..{N_CLASSES - 1}")


def _different_image_shapes(train_shape, test_shape):
    """What is wrong when the two splits' images (shapes ``(N, H, W)``) differ in size, else None."""
    train, test = tuple(train_shape[1:]), tuple(test_shape[1:])
    return None if train == test else f"train images are {_hw(train)} but test images are {_hw(test)}"


def _check_storage_fits_in_file(f, path):
    """Refuse files whose image bytes were never written or lie past the end.

    Unwritten chunks would silently read as zeros; a file cut short is
    normally caught on open, but comparing sizes is cheap.
    """
    needed = 0
    for split in SPLITS:
        images = f[f"{split}/images"]
        stored = images.id.get_storage_size()
        if stored < images.size and images.compression is None:
            raise DataError(f"{path}: '{split}/images' is incomplete: only {stored} of its "
                            f"{images.size} bytes were written")
        needed += stored + f[f"{split}/labels"].id.get_storage_size()
    file_size = os.path.getsize(path)
    if file_size < needed:
        raise DataError(f"{path}: truncated: {file_size} bytes, but its datasets need {needed}")


def _hw(shape):
    return "x".join(str(n) for n in shape)


def _plain_attrs(attrs):
    return {name: _plain(value) for name, value in attrs.items()}


def _plain(value):
    """An attribute value as a plain Python value (str, int, float, list)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _one_line(error):
    return " ".join(str(error).split())


# ---------------------------------------------------------------- read_rows


def read_rows(path, split, blocks, dtype=np.float32):
    """Read the rows ``blocks`` (a list of ``(start, stop)``) of one split.

    One contiguous hyperslab read per block, concatenated in the given order.
    Returns ``x`` of shape ``(rows, H, W)``, C-contiguous, of ``dtype``, with
    pixel/255 in [0, 1], and ``y`` of shape ``(rows,)``, int64.
    """
    path = os.fspath(path)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise ValueError(f"dtype must be a floating type, got {dtype}")
    blocks = [(int(start), int(stop)) for start, stop in blocks]
    try:
        with _open(path) as f:
            images = _dataset(f, f"{split}/images", path)
            labels = _dataset(f, f"{split}/labels", path)
            _check_blocks(blocks, images.shape[0], f"{split}/images", path)
            return _read_blocks(images, labels, blocks, dtype)
    except DataError:
        raise
    except _H5PY_ERRORS as e:
        raise DataError(f"{path}: cannot read '{split}' rows: {_one_line(e)}") from e


def _check_blocks(blocks, n_rows, name, path):
    for start, stop in blocks:
        if not 0 <= start <= stop <= n_rows:
            raise DataError(f"{path}: rows {start}:{stop} are outside '{name}' ({n_rows} rows)")


def _read_blocks(images, labels, blocks, dtype):
    """Read each block into its slice of preallocated outputs.

    The uint8 pixels of one block go through a scratch buffer reused for
    every block, so the peak extra memory is one block of bytes, not a
    uint8 copy of the whole shard.
    """
    n_rows = sum(stop - start for start, stop in blocks)
    image_shape = images.shape[1:]
    x = np.empty((n_rows, *image_shape), dtype=dtype)
    y = np.empty(n_rows, dtype=np.int64)
    largest = max((stop - start for start, stop in blocks), default=0)
    scratch = np.empty((largest, *image_shape), dtype=np.uint8)
    at = 0
    for start, stop in blocks:
        rows = stop - start
        if rows == 0:
            continue
        images.read_direct(scratch, np.s_[start:stop], np.s_[0:rows])
        np.divide(scratch[:rows], PIXEL_MAX, out=x[at:at + rows], dtype=dtype)
        y[at:at + rows] = labels[start:stop]
        at += rows
    return x, y


# ---------------------------------------------------------------- write_dataset


def write_dataset(path, train_images, train_labels, test_images, test_labels, attrs=None):
    """Write a data file atomically: readers see the old file or the new one, never half.

    Images are uint8 arrays of shape ``(N, H, W)`` (the same ``H, W`` for both
    splits), labels integer arrays of shape ``(N,)`` in 0..255 (stored uint8).
    ``attrs`` are extra root attributes (source, checksums, ...).
    """
    path = os.fspath(path)
    splits = {"train": _checked_split("train", train_images, train_labels),
              "test": _checked_split("test", test_images, test_labels)}
    different = _different_image_shapes(splits["train"][0].shape, splits["test"][0].shape)
    if different:
        raise ValueError(different)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # Same folder as the target, so that os.replace is a rename within one
    # file system; unique per writer, so concurrent writers do not collide
    # (the last rename wins, with a whole file). Made by h5py rather than
    # mkstemp so that it gets the usual permissions, not 0600.
    tmp = f"{path}.tmp.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        with h5py.File(tmp, "w-") as f:
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            for name, value in (attrs or {}).items():
                f.attrs[name] = value
            for split, (images, labels) in splits.items():
                _write_split(f, split, images, labels)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove_if_exists(tmp)
        raise
    fsync_folder(folder)


def _checked_split(split, images, labels):
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{split} images must be uint8 of shape (N, H, W), "
                         f"got {images.dtype} of shape {images.shape}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"{split} labels must be 1-D integers, got {labels.dtype} of shape {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise ValueError(f"{split}: no images")
    if labels.min() < 0 or labels.max() > 255:
        raise ValueError(f"{split} labels must fit in uint8 (0..255)")
    return images, labels.astype(np.uint8, copy=False)


def _write_split(f, split, images, labels):
    group = f.create_group(split)
    chunk_rows = min(len(images), ROWS_PER_CHUNK)
    group.create_dataset("images", data=images, chunks=(chunk_rows, *images.shape[1:]))
    group.create_dataset("labels", data=labels)


def _remove_if_exists(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
