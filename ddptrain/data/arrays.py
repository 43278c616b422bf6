"""Data held in memory: ``Arrays``, checked like a data file and read like one.

``ddptrain.train(model, data=(x_train, y_train, x_test, y_test))`` trains on
arrays a script made, with everything a data file gets: the same checks
(one line per problem), the same shards (each rank copies out only its own
rows; the arrays themselves stay the caller's) and the same values. uint8
images become ``pixel / 255`` exactly as the file's do, so arrays and the
file written from them train bitwise the same run; floating-point images are
taken as they are.

Every rank must pass the same arrays, as every rank of a run reads the same
file: a fingerprint of them (shapes, types and a CRC-32 of their bytes) is
compared across the ranks before training (``fingerprint``).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from ddptrain.data.format import PIXEL_MAX, SPLITS, DatasetInfo
from ddptrain.data.writer import check_classes, check_split
from ddptrain.errors import DataError

WHAT = "in-memory arrays"   # where a DatasetInfo names its file


class Arrays:
    """Training and test images with their labels, in memory.

    Images: ``(N, H, W)`` or ``(N, C, H, W)``, uint8 (pixels 0..255, scaled
    by 1/255 as a data file's) or floating point (used as they are; they must
    be finite). Labels: integers ``0..n_classes-1``. ``n_classes`` defaults to
    the largest label + 1, or to the number of ``class_names``.
    """

    def __init__(self, x_train, y_train, x_test, y_test, n_classes=None, class_names=None):
        self.splits = {"train": _checked_split("train", x_train, y_train),
                       "test": _checked_split("test", x_test, y_test)}
        shapes = [self.splits[split][0].shape[1:] for split in SPLITS]
        if shapes[0] != shapes[1]:
            raise DataError(f"data: train images are {_text(shapes[0])} but test images are "
                            f"{_text(shapes[1])}")
        kinds = {images.dtype.kind == "u" for images, _ in self.splits.values()}
        if len(kinds) > 1:
            raise DataError("data: train and test images must both be uint8 or both floating "
                            "point, not one of each")
        self.n_classes, self.class_names = _classes(self.splits, n_classes, class_names)

    @classmethod
    def of(cls, data):
        """``data`` as Arrays: an Arrays, or a tuple ``(x_train, y_train, x_test, y_test)``."""
        if isinstance(data, cls):
            return data
        if isinstance(data, (tuple, list)) and len(data) == 4:
            return cls(*data)
        raise DataError("data must be a data file's path, a data set's name, or the arrays "
                        f"(x_train, y_train, x_test, y_test); got {type(data).__name__}"
                        + (f" of {len(data)} items" if isinstance(data, (tuple, list)) else ""))

    def inspect(self):
        """The description a data file would have (``format.inspect``), from these arrays."""
        return ArrayInfo(path=WHAT, n_train=len(self.splits["train"][1]),
                         n_test=len(self.splits["test"][1]),
                         image_shape=tuple(self.splits["train"][0].shape[1:]),
                         n_classes=self.n_classes, attrs={"source": WHAT},
                         class_names=tuple(self.class_names), arrays=self)

    def fingerprint(self):
        """Shapes, types, class names and a CRC-32 of every array's bytes: equal on every rank, or
        the ranks were given different data."""
        parts = [self.n_classes, tuple(self.class_names)]
        for images, labels in self.splits.values():
            for array in (images, labels):
                parts += [array.shape, str(array.dtype),
                          zlib.crc32(memoryview(np.ascontiguousarray(array)))]
        return tuple(parts)

    def read_rows(self, split, blocks, dtype=np.float32):
        """The rows ``blocks`` of ``split`` as ``format.read_rows`` gives a file's: a copy, of
        ``dtype``."""
        images, labels = self.splits[split]
        blocks = [(int(start), int(stop)) for start, stop in blocks]
        for start, stop in blocks:
            if not 0 <= start <= stop <= len(labels):
                raise DataError(f"data: rows {start}:{stop} are outside the {split} images "
                                f"({len(labels)} rows)")
        n_rows = sum(stop - start for start, stop in blocks)
        x = np.empty((n_rows, *images.shape[1:]), dtype=dtype)
        y = np.empty(n_rows, dtype=np.int64)
        at = 0
        for start, stop in blocks:
            rows = stop - start
            # the file's scaling: the same values
            if images.dtype == np.uint8 and dtype != np.uint8:
                np.divide(images[start:stop], PIXEL_MAX, out=x[at:at + rows], dtype=dtype)
            else:   # floats, or the pixels as they are (stored_dtype)
                x[at:at + rows] = images[start:stop]
            y[at:at + rows] = labels[start:stop]
            at += rows
        return x, y


@dataclass(frozen=True)
class ArrayInfo(DatasetInfo):
    """A DatasetInfo whose rows come from ``Arrays``, not from a file."""

    arrays: Arrays = None

    def read_rows(self, split, blocks, dtype=np.float32):
        return self.arrays.read_rows(split, blocks, dtype)

    def stored_dtype(self, dtype):
        """uint8 pixels stay pixels, as a file's do; floating-point images are kept as the model's
        floats."""
        return (np.dtype(np.uint8) if self.arrays.splits["train"][0].dtype == np.uint8
                else np.dtype(dtype))


def _text(shape):
    return "x".join(map(str, shape))


def _checked_split(split, images, labels):
    x, y = f"x_{split}", f"y_{split}"
    if not isinstance(images, np.ndarray) or not isinstance(labels, np.ndarray):
        raise DataError(f"data: {x} and {y} must be numpy arrays, got {type(images).__name__} and "
                        f"{type(labels).__name__}")
    try:
        check_split(images, labels, x, y, floats=True)
    except ValueError as problem:
        raise DataError(f"data: {problem}") from None
    return images, labels


def _classes(splits, n_classes, class_names):
    try:
        return check_classes({f"y_{split}": labels for split, (_, labels) in splits.items()},
                             n_classes, class_names)
    except ValueError as problem:
        raise DataError(f"data: {problem}") from None
