"""The HDF5 data file: its layout, its validation, and shard reads.

Layout (written by ``write_dataset``, checked by ``inspect``)::

    /train/images   (N, H, W) or (N, C, H, W) uint8, chunked by rows, uncompressed,
                    Fletcher-32 per chunk
    /train/labels   (N,)      uint8 (uint16 beyond 256 classes), Fletcher-32
    /test/images    (M, ...)  uint8, the same image shape as /train/images
    /test/labels    (M,)
    root attributes: format = "ddptrain-mnist", format_version = 3,
                     n_classes (labels are 0..n_classes-1), class_names (n_classes strings),
                     content_sha256 (of the four datasets' values, see ``content_sha256``),
                     plus provenance (dataset, source, md5 of each IDX file, ...), all fixed-length

Any image-classification set fits: one channel or several, any image size,
2 to ``MAX_CLASSES`` classes. The format keeps its first name,
"ddptrain-mnist", so that an older ddptrain meeting a newer file says that
its version is too new (update ddptrain) rather than that it is foreign.
Versions 1 and 2 (MNIST only) carry no class count: they are read as 10
classes named "0" to "9".

Images are stored uncompressed and chunked by whole rows so that a block of
consecutive rows (a virtual shard, see ``sampler``) is one cheap hyperslab
read. Every problem with a file becomes a one-line ``DataError`` that names
the file; no h5py exception escapes as a traceback.

**Damage is caught by HDF5 itself.** Format 2 is written in HDF5's newest
file format (superblock version 2 or later), in which every metadata
structure carries a checksum that HDF5 verifies before it parses it, with a
Fletcher-32 checksum on every chunk of data that HDF5 verifies on each read,
and with fixed-length attributes (a variable-length string lives in HDF5's
global heap, which has no checksum: a flipped bit there can hang HDF5). Each
rank so verifies exactly the rows it reads, and no flipped bit can hang a
reader or change a value unnoticed (the tests flip bits across a whole file).

Files without those checksums (format 1 of ddptrain 0.1, or written by other
tools) are still read, and may hold attributes in the global heap: so before
a run opens any data file, a child process reads its metadata with a time
limit (``check_readable``), and a file that would hang or crash HDF5 ends the
run with one line instead. Damage to the pixels of a file without checksums
cannot be detected.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import h5py
import numpy as np

from ddptrain.data.chunks import ChunkReader, ReadAhead
from ddptrain.errors import DataError
from ddptrain.files import check_regular_file

FORMAT = "ddptrain-mnist"
# 1: ddptrain 0.1, without checksums; 2: MNIST only (both still read)
FORMAT_VERSION = 3
CHECK_SECONDS = 10                # the time a child process may take to read a file's metadata
LEGACY_CLASSES = 10               # the class count of versions 1 and 2, which do not store it
MAX_CLASSES = 4096                # a confusion matrix of 4096 x 4096 counts is 128 MiB
MAX_CLASS_NAME = 200              # bytes of UTF-8 per class name
SPLITS = ("train", "test")
PIXEL_MAX = 255
ROWS_PER_CHUNK = 1024     # 1024 MNIST images = 784 KiB: fits HDF5's default 1 MiB chunk cache
CHUNK_BYTES = 2 ** 20     # larger images: as many rows as fit in that cache
# What h5py raises on damaged files, odd objects and bad reads.
_H5PY_ERRORS = (OSError, KeyError, ValueError, RuntimeError, TypeError)


@dataclass(frozen=True)
class DatasetInfo:
    """What ``inspect`` learned about a valid data file."""

    path: str
    n_train: int
    n_test: int
    image_shape: tuple   # one image: (H, W), (28, 28) for MNIST, or (C, H, W)
    n_classes: int
    attrs: dict          # the file's root attributes, as plain Python values
    class_names: tuple = ()   # n_classes names; "0", "1", ... where the file has none
    chunk_rows: int = 0       # rows per chunk of the training images (0: not chunked)

    def __post_init__(self):
        if not self.class_names:
            object.__setattr__(self, "class_names", tuple(str(c) for c in range(self.n_classes)))

    @property
    def n_features(self):
        """Values per image: H * W, or C * H * W (784 for MNIST)."""
        return math.prod(self.image_shape)

    @property
    def image_text(self):
        """``28x28`` or ``3x32x32``: one image's shape, for messages."""
        return _hw(self.image_shape)

    def read_rows(self, split, blocks, dtype=np.float32):
        """The rows ``blocks`` of ``split``: ``read_rows`` of this file (in-memory data overrides
        it)."""
        return read_rows(self.path, split, blocks, dtype)

    def stored_dtype(self, dtype):
        """What a rank keeps its rows as, for a model of ``dtype``: a file's uint8 pixels (a quarter
        of the memory of float32), scaled when a batch is taken (``batches.Split``)."""
        return np.dtype(np.uint8)


# ---------------------------------------------------------------- inspect


def inspect(path, walk_chunks=False) -> DatasetInfo:
    """Validate the data file at ``path`` and describe it.

    Reads all labels (small) but only the shape, dtype and last row of each
    images dataset (``walk_chunks``: and where every chunk is). Raises
    ``DataError`` with a one-line message ``"{path}: <problem>"`` if
    anything is wrong.
    """
    path = os.fspath(path)
    try:
        with _open(path) as f:
            version = _check_format(f, path)
            n_classes, class_names = _classes(f, version, path)
            shapes = {split: _check_split(f, split, n_classes, path) for split in SPLITS}
            if walk_chunks:
                for split in SPLITS:
                    for name in ("images", "labels"):
                        _walk_chunk_index(f[f"{split}/{name}"])
            different = _different_image_shapes(shapes["train"], shapes["test"])
            if different:
                raise DataError(f"{path}: {different}")
            _check_storage_fits_in_file(f, path)
            attrs = _plain_attrs(f.attrs)
            chunks = f["train/images"].chunks
    except DataError:
        raise
    except _H5PY_ERRORS as e:
        raise _failure(path, "cannot read the file", e) from e
    return DatasetInfo(path=path, n_train=shapes["train"][0], n_test=shapes["test"][0],
                       image_shape=tuple(shapes["train"][1:]), n_classes=n_classes, attrs=attrs,
                       class_names=class_names, chunk_rows=chunks[0] if chunks else 0)


def _check_is_file(path):
    """A regular file this process may read: not missing, a folder, a FIFO or a device (which could
    block)."""
    check_regular_file(path, "data file", DataError)


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
            if _damaged(e):
                raise _failure(self.path, "cannot open it", e) from e
            if getattr(e, "errno", None) == 13 or "Permission denied" in str(e):
                raise DataError(f"{self.path}: cannot read it (permission denied)") from e
            raise DataError(f"{self.path}: not an HDF5 file (or truncated): {_one_line(e)}") from e
        return self.file

    def __exit__(self, *exc):
        self.file.close()
        return False


def _walk_chunk_index(dataset):
    """Visit every entry of a chunked dataset's chunk index (where a damaged index would mislead a
    read)."""
    if dataset.chunks is not None:
        for index in range(dataset.id.get_num_chunks()):
            dataset.id.get_chunk_info(index)


def _check_format(f, path):
    """Refuse files written for something else or by a newer ddptrain.

    A file without the ``format`` attribute is accepted: the layout alone is
    what the reader needs, and files converted by hand need not carry it.
    """
    file_format = _plain(f.attrs.get("format", FORMAT))
    if file_format != FORMAT:
        raise DataError(f"{path}: format is {file_format!r}, not {FORMAT!r}")
    version = _plain(f.attrs.get("format_version", FORMAT_VERSION))
    if not isinstance(version, int):
        raise DataError(f"{path}: format_version {version!r} is not a whole number")
    if version > FORMAT_VERSION:
        raise DataError(f"{path}: format_version {version} is newer than this ddptrain reads (1 to "
                        f"{FORMAT_VERSION}); update ddptrain")
    return version if "format_version" in f.attrs else None


def _classes(f, version, path):
    """``(n_classes, class_names)`` from the root attributes; versions 1 and 2 (and files without a
    version) are MNIST's 10 classes unless they say otherwise."""
    count = _plain(f.attrs.get("n_classes")) if "n_classes" in f.attrs else None
    if count is None:
        if version is not None and version >= 3:
            raise DataError(f"{path}: the root attribute 'n_classes' (the class count, which "
                            f"format_version {version} requires) is missing")
        count = LEGACY_CLASSES
    if not isinstance(count, int) or isinstance(count, bool):
        raise DataError(f"{path}: n_classes {count!r} is not a whole number")
    if not 2 <= count <= MAX_CLASSES:
        raise DataError(f"{path}: n_classes is {count}; ddptrain handles 2 to "
                        f"{MAX_CLASSES} classes")
    if "class_names" not in f.attrs:
        return count, ()
    stored = f.attrs.get_id("class_names")   # its shape, before its values are read
    if len(stored.shape) != 1:
        raise DataError(f"{path}: class_names must be a list of {count} strings")
    if stored.shape[0] != count:
        raise DataError(f"{path}: class_names holds {stored.shape[0]} names for {count} classes")
    names = f.attrs["class_names"]
    if not isinstance(names, np.ndarray) or names.ndim != 1 or names.dtype.kind not in "SUO":
        raise DataError(f"{path}: class_names must be a list of {count} strings")
    names = tuple(_plain(name) for name in names.tolist())
    if len(names) != count or not all(isinstance(name, str) for name in names):
        raise DataError(f"{path}: class_names holds {len(names)} names for {count} classes")
    return count, names


def check_image_pair(images_shape, image_type, labels_shape, label_type, where, names, empty):
    """A DataError unless the images are uint8 ``(N, H, W)`` or ``(N, C, H, W)`` and the labels
    ``N`` integers, ``N > 0``. ``where``: the file (or source) the messages start with; ``names``:
    the images' and the labels' names in it; ``empty``: what to say when ``N == 0``. Shapes and
    types only: no value is read."""
    images_name, labels_name = names
    images_shape, labels_shape = tuple(images_shape), tuple(labels_shape)
    if len(images_shape) not in (3, 4) or image_type != np.uint8 or 0 in images_shape[1:]:
        raise DataError(f"{where}: {images_name} must be uint8 (N, H, W) or (N, C, H, W), "
                        f"found {len(images_shape)}-D {image_type} of shape {images_shape}")
    if len(labels_shape) != 1 or label_type.kind not in "iu":
        raise DataError(f"{where}: {labels_name} must be 1-D integers, "
                        f"found {len(labels_shape)}-D {label_type} of shape {labels_shape}")
    if images_shape[0] != labels_shape[0]:
        raise DataError(f"{where}: {images_name} has {images_shape[0]} images "
                        f"but {labels_name} has {labels_shape[0]} labels")
    if images_shape[0] == 0:
        raise DataError(f"{where}: {empty}")


def _check_split(f, split, n_classes, path):
    """Check one split's datasets; return the images' shape ``(N, H, W)`` or ``(N, C, H, W)``."""
    images = _dataset(f, f"{split}/images", path)
    labels = _dataset(f, f"{split}/labels", path)
    check_image_pair(images.shape, images.dtype, labels.shape, labels.dtype, path,
                     (f"'{split}/images'", f"'{split}/labels'"), f"the '{split}' split is empty")
    _check_labels_in_range(labels[()], n_classes, f"{split}/labels", path)
    _ = images[-1]    # makes HDF5 touch the end of the images' storage
    return images.shape


def _dataset(f, name, path):
    try:
        obj = f[name]
    except KeyError as e:
        if _damaged(e):
            raise _failure(path, f"cannot open '{name}'", e) from e
        obj = None
    if obj is None:
        raise DataError(f"{path}: dataset '{name}' is missing")
    if not isinstance(obj, h5py.Dataset):
        raise DataError(f"{path}: '{name}' is a {type(obj).__name__}, not a dataset")
    return obj


def _check_labels_in_range(labels, n_classes, name, path):
    out_of_range = (labels < 0) | (labels >= n_classes)
    if out_of_range.any():
        first_bad = labels[np.argmax(out_of_range)]
        raise DataError(f"{path}: label {first_bad} in '{name}' is outside 0..{n_classes - 1} "
                        f"(the file has {n_classes} classes)")


def _different_image_shapes(train_shape, test_shape):
    """What is wrong when the two splits' images (shapes ``(N, ...)``) differ, else None."""
    train, test = tuple(train_shape[1:]), tuple(test_shape[1:])
    if train == test:
        return None
    channels = [shape[0] if len(shape) == 3 else 1 for shape in (train, test)]
    if channels[0] != channels[1]:
        return f"train images have {channels[0]} channel(s) but test images have {channels[1]}"
    return f"train images are {_hw(train)} but test images are {_hw(test)}"


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
        return [_plain(item) for item in value.tolist()]
    return value


def _damaged(error):
    """Whether HDF5 refused to use a structure because its checksum did not match."""
    text = str(error)
    return "checksum" in text or "filter returned failure" in text


def _failure(path, doing, error):
    """The DataError for an h5py exception: a damaged file said so, anything else as it is."""
    if _damaged(error):
        return DataError(f"{path}: damaged: a checksum does not match "
                         f"({doing}: {_one_line(error)})")
    return DataError(f"{path}: {doing}: {_one_line(error)}")


def _one_line(error):
    return " ".join(str(error).split())


# ---------------------------------------------------------------- read_rows


def read_rows(path, split, blocks, dtype=np.float32):
    """Read the rows ``blocks`` (a list of ``(start, stop)``) of one split.

    One contiguous hyperslab read per block, concatenated in the given order.
    Returns ``x`` of shape ``(rows, H, W)``, C-contiguous, of ``dtype``, with
    pixel/255 in [0, 1] (for ``dtype`` uint8: the stored pixels, unscaled),
    and ``y`` of shape ``(rows,)``, int64.
    """
    path = os.fspath(path)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    dtype = np.dtype(dtype)
    if dtype.kind != "f" and dtype != np.uint8:
        raise ValueError(f"dtype must be a floating type or uint8, got {dtype}")
    blocks = [(int(start), int(stop)) for start, stop in blocks]
    try:
        with _open(path) as f:
            images = _dataset(f, f"{split}/images", path)
            labels = _dataset(f, f"{split}/labels", path)
            _check_blocks(blocks, images.shape[0], f"{split}/images", path)
            # whole chunks straight into place, checked by numpy (None: HDF5 reads them)
            return _read_blocks(images, labels, blocks, dtype, ChunkReader.of(images))
    except DataError:
        raise
    except _H5PY_ERRORS as e:
        raise _failure(path, f"cannot read '{split}' rows", e) from e


def _check_blocks(blocks, n_rows, name, path):
    for start, stop in blocks:
        if not 0 <= start <= stop <= n_rows:
            raise DataError(f"{path}: rows {start}:{stop} are outside '{name}' ({n_rows} rows)")


def _read_blocks(images, labels, blocks, dtype, chunks=None):
    """Read each block into its slice of preallocated outputs.

    The uint8 pixels of one block go through a scratch buffer reused for
    every block, so the peak extra memory is one block of bytes, not a
    uint8 copy of the whole shard.
    """
    n_rows = sum(stop - start for start, stop in blocks)
    image_shape = images.shape[1:]
    x = np.empty((n_rows, *image_shape), dtype=dtype)
    y = np.empty(n_rows, dtype=np.int64)
    largest = max((stop - start for start, stop in blocks), default=0) if dtype != np.uint8 else 0
    scratch = np.empty((largest, *image_shape), dtype=np.uint8)
    ahead = ReadAhead(chunks, blocks) if chunks is not None else None
    at = 0
    for start, stop in blocks:
        rows = stop - start
        if rows == 0:
            continue
        into = x[at:at + rows] if dtype == np.uint8 else scratch[:rows]
        if chunks is not None:
            chunks.read(start, stop, into, ahead)
        else:
            images.read_direct(into, np.s_[start:stop])
        if dtype != np.uint8:
            np.divide(scratch[:rows], PIXEL_MAX, out=x[at:at + rows], dtype=dtype)
        y[at:at + rows] = labels[start:stop]
        at += rows
    return x, y
