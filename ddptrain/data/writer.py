"""Writing a data file (the layout ``format.py`` describes), atomically, with its checksums, a block
of rows at a time.

The file is streamed to disk (``durable.write_streamed``): whatever the size
of the set, a conversion holds about one block of rows (``blocks.BLOCK_BYTES``)
and HDF5's chunk cache, and computes ``content_sha256`` as it writes. The file
is the one a writer holding everything in memory would make, byte for byte:
the same datasets, chunks, attributes and layout. Readers see the old file or
the new one, never half; an error or a stop signal on the way leaves no file
and no temporary file.
"""

from __future__ import annotations

import hashlib
import math
import os

import h5py
import numpy as np

from ddptrain.data.blocks import ArrayRows, block_rows, value_range
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
from ddptrain.durable import write_streamed

SHA256_HEX = 64   # characters of a SHA-256 in hex: the room kept for content_sha256


def write_dataset(path, train_images, train_labels, test_images, test_labels, attrs=None,
                  n_classes=None, class_names=None):
    """Write a data file atomically: readers see the old file or the new one, never half.

    Images are uint8 arrays of shape ``(N, H, W)`` or ``(N, C, H, W)``, the
    same image shape in both splits; labels are integer arrays of shape
    ``(N,)`` in ``0..n_classes-1``. ``n_classes`` defaults to the largest
    label + 1; ``class_names`` (``n_classes`` strings) default to "0", "1",
    .... ``attrs`` are extra root attributes (dataset, source, checksums...).
    Bad arguments raise ValueError.

    Written a block of rows at a time, without a copy of the arrays: they may
    be memory maps of sets larger than memory (``np.load(f, mmap_mode="r")``),
    which are read once, a block at a time. For a set in several pieces, see
    ``write_dataset_chunks``.
    """
    _write_chunks(path, {"train": [(train_images, train_labels)],
                         "test": [(test_images, test_labels)]},
                  lambda split, i: (f"{split} images", f"{split} labels"),
                  attrs, n_classes, class_names)


def write_dataset_chunks(path, train, test, attrs=None, n_classes=None, class_names=None, *,
                         names=None):
    """``write_dataset`` of a set given in chunks: ``train`` and ``test`` are sequences of
    ``(images, labels)`` pairs, each as ``write_dataset`` takes them, the rows of the split in
    order; every image has the same shape.

    Chunks may be memory maps (``np.load(f, mmap_mode="r")``): the set is read
    a block at a time, once to check the labels and once to write, and never
    whole. The file is the one ``write_dataset`` writes from the chunks joined.
    ``names(split, i)``: what messages call chunk ``i``'s images and labels
    (default: "train images (chunk 0)", "train labels (chunk 0)").
    """
    _write_chunks(path, {"train": train, "test": test}, names or _chunk_names, attrs, n_classes,
                  class_names)


def _chunk_names(split, i):
    return f"{split} images (chunk {i})", f"{split} labels (chunk {i})"


def _write_chunks(path, splits, names, attrs, n_classes, class_names):
    """Check ``{split: [(images, labels), ...]}`` (``names(split, i)`` names chunk ``i``'s arrays
    in messages) and write it: the images' shapes and types, and every label, before the file is
    begun."""
    chunks = {split: _checked_chunks(split, splits[split], names) for split in SPLITS}
    different = _different_image_shapes(chunks["train"][0][0].shape, chunks["test"][0][0].shape)
    if different:
        raise ValueError(different)
    largest, where = None, None
    for split in SPLITS:
        for i, (_, labels) in enumerate(chunks[split]):
            smallest, high, _ = value_range(ArrayRows([labels]))
            if smallest < 0:
                raise ValueError(f"label {smallest} in {names(split, i)[1]} is negative")
            if largest is None or high > largest:
                largest, where = high, names(split, i)[1]
    n_classes, class_names = classes_for(largest, where, n_classes, class_names)
    sources = {split: (ArrayRows([images for images, _ in pairs]),
                       ArrayRows([labels for _, labels in pairs]))
               for split, pairs in chunks.items()}
    write_sources(path, sources, n_classes, class_names, attrs)


def _checked_chunks(split, pairs, names):
    pairs = [(_array(images), _array(labels)) for images, labels in pairs]
    if not pairs:
        raise ValueError(f"the {split} split has no chunks")
    for i, (images, labels) in enumerate(pairs):
        check_layout(images, labels, *names(split, i))
        if images.shape[1:] != pairs[0][0].shape[1:]:
            raise ValueError(f"{names(split, i)[0]} holds images of shape {images.shape[1:]}, "
                             f"{names(split, 0)[0]} of shape {pairs[0][0].shape[1:]}")
    return pairs


def _array(values):
    """``values`` as an array, without a copy; a memory map stays one (np.asarray would make it a
    plain array, whose pages ``blocks.release`` could not let go), and a piece opened when read
    (``blocks.ArrayRows``) stays closed."""
    return values if isinstance(values, np.ndarray) or hasattr(values, "open") \
        else np.asarray(values)


class Later:
    """A root attribute whose value is known only once the data is written (the MD5 of a file read
    on the way): ``value()`` gives it then, a string of ``length`` characters. Its room is kept
    from the start, where a file written whole has it."""

    def __init__(self, value, length):
        self.value, self.length = value, length


def write_sources(path, splits, n_classes, class_names, attrs=None, chunk_rows=None):
    """Write the data file ``path`` from sources of rows (``blocks``): ``{split: (images,
    labels)}``, each split's images uint8 of the same shape, labels integers of
    ``0..n_classes-1`` (checked again block by block: ValueError), ``class_names`` checked
    (``classes_for``). ``attrs`` are extra root attributes; a value may be a ``Later``.
    ``chunk_rows``: the images' rows per chunk (default: about ``CHUNK_BYTES``, at most
    ``ROWS_PER_CHUNK``)."""
    path = os.fspath(path)
    label_type = np.dtype(np.uint8 if n_classes <= 256 else np.uint16)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    size = sum(math.prod(images.shape) + labels.shape[0] * label_type.itemsize
               for images, labels in splits.values())
    digest = hashlib.sha256()   # content_sha256: of the values as stored, in the order of SPLITS
    # concurrent writers: the last rename wins, with a whole file
    with write_streamed(path, size) as out:
        # libver="latest": HDF5's newest file format, whose metadata all carries checksums.
        with h5py.File(out, "w", libver="latest") as f:
            later = _write_attributes(f, n_classes, class_names, attrs)
            for split in SPLITS:
                images, labels = splits[split]
                group = f.create_group(split)
                image_rows = min(images.shape[0], chunk_rows or ROWS_PER_CHUNK,
                                 chunk_rows or max(1, CHUNK_BYTES // math.prod(images.shape[1:])))
                _write_rows(group, "images", images, np.dtype(np.uint8), image_rows, digest, out)
                _write_rows(group, "labels", labels, label_type,
                            min(labels.shape[0], 64 * ROWS_PER_CHUNK), digest, out,
                            _labels_within(n_classes, f"{split} labels"))
            # In place, in the room kept for them: the file written whole has them there.
            f.attrs.modify("content_sha256", _fixed(digest.hexdigest()))
            for name, value in later.items():
                text = value.value()
                if len(text) != value.length:
                    raise ValueError(f"the attribute {name} is {text!r}, not {value.length} long")
                f.attrs.modify(name, _fixed(text))
    mark_checked(path)   # written here: check_readable need not read it again


def _write_attributes(f, n_classes, class_names, attrs):
    """The root attributes, in the order a file written whole has them; returns those that are
    ``Later``."""
    f.attrs["format"] = _fixed(FORMAT)
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["n_classes"] = n_classes
    # fixed-length
    f.attrs["class_names"] = np.array([name.encode("utf-8") for name in class_names])
    f.attrs["content_sha256"] = _fixed("0" * SHA256_HEX)   # its room: known once all is written
    later = {}
    for name, value in (attrs or {}).items():
        if isinstance(value, Later):
            later[name], value = value, "0" * value.length
        f.attrs[name] = _fixed(value)
    return later


def _write_rows(group, name, source, dtype, chunk_rows, digest, out, check=None):
    """The dataset ``name`` of ``group`` from a source of rows, a block of whole chunks at a time,
    each hashed into ``digest`` as stored; ``check(block)`` raises on a bad one."""
    n = source.shape[0]
    dataset = group.create_dataset(name, shape=source.shape, dtype=dtype,
                                   chunks=(chunk_rows, *source.shape[1:]), fletcher32=True)
    itemsize = max(np.dtype(source.dtype).itemsize, dtype.itemsize)
    start = 0
    for block in source.blocks(block_rows(source.shape, itemsize, chunk_rows)):
        if start + len(block) > n:
            raise ValueError(f"{group.name[1:]} {name}: more than the {n} rows announced")
        if check is not None:
            check(block)
        block = np.ascontiguousarray(block, dtype=dtype)
        digest.update(memoryview(block).cast("B"))
        dataset[start:start + len(block)] = block
        start += len(block)
        out.check()   # a failed write or a stop signal ends the conversion here
    if start != n:
        raise ValueError(f"{group.name[1:]} {name}: {start} rows, not the {n} announced")
    # Its chunks go to the disk now, before the next dataset's, as in a file written whole (HDF5
    # keeps the last ones in its chunk cache until then).
    dataset.flush()


def _labels_within(n_classes, what):
    def check(block):
        smallest, largest = int(block.min()), int(block.max())
        if smallest < 0 or largest >= n_classes:
            label = smallest if smallest < 0 else largest
            raise ValueError(f"label {label} in {what} is outside 0..{n_classes - 1} "
                             f"({n_classes} classes)")
    return check


def content_sha256(splits):
    """SHA-256 of the values a file holds, ``{split: (images, labels)}`` in the order of SPLITS, as
    they are stored: what tells two copies of a data file from two files (ranks on several nodes
    compare it). ``write_sources`` computes the same while it writes."""
    digest = hashlib.sha256()
    for split in SPLITS:
        for array in splits[split]:
            digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    return digest.hexdigest()


def check_split(images, labels, x, y, floats=False):
    """One split's arrays, as a data file holds them (and, with ``floats``, floating-point images
    too): ValueError naming ``x`` (the images) or ``y`` (the labels) otherwise."""
    check_layout(images, labels, x, y, floats)
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        raise ValueError(f"{x} holds NaN or infinite values")
    if labels.min() < 0:
        raise ValueError(f"label {labels.min()} in {y} is negative")


def check_layout(images, labels, x, y, floats=False):
    """``check_split`` but for the values: the shapes and types alone, read from no row."""
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


def check_classes(labels, n_classes=None, class_names=None):
    """``(n_classes, class_names)`` for labels ``{what: array}``: as given, or implied (the largest
    label + 1; "0", "1", ... as names), and consistent with the labels. ValueError otherwise."""
    largest, where = max((int(array.max()), what) for what, array in labels.items())
    return classes_for(largest, where, n_classes, class_names)


def classes_for(largest, where, n_classes=None, class_names=None):
    """``check_classes`` of labels whose largest is ``largest``, found in ``where``."""
    if class_names is not None:
        class_names = list(class_names)
        n_classes = len(class_names) if n_classes is None else n_classes
    if n_classes is None and largest == 0:
        raise ValueError("every label is 0, a single class: give the class count")
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
