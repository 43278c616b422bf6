"""A set as a folder of ``.npy`` chunks, converted to a data file a block at a time.

    python -m ddptrain prepare --npy-dir DIR --name NAME [--classes N] [--class-names A,B,...]

The folder holds each split's images and labels in numbered chunks::

    train_images_000.npy  train_labels_000.npy
    train_images_001.npy  train_labels_001.npy
    ...
    test_images_000.npy   test_labels_000.npy

Chunk ``i`` of a split's images goes with chunk ``i`` of its labels (as many
rows in both), and the chunks follow one another in the order of their
numbers, which run from 0 without a gap (any number of digits: ``7`` and
``007`` are the same chunk, and both at once are refused). A split in one
piece may be ``train_images.npy`` and ``train_labels.npy``. Images are uint8,
``(N, H, W)`` or ``(N, C, H, W)``, one image shape throughout; labels are
integers ``(N,)``. Any other ``.npy`` file in the folder is refused (a
misspelt chunk would otherwise be left out silently); other files are ignored.

Each file's header is read and checked before anything is mapped: a format
version numpy writes (1.0 or 2.0), numbers rather than Python objects (nothing
is unpickled), C order, and exactly the data it announces: a header that
claims more rows than its file holds is refused. The chunks are then memory
maps, opened one at a time, read a block at a time (``blocks.ArrayRows``).
"""

from __future__ import annotations

import math
import os
import pathlib
import re
from datetime import datetime, timezone

import numpy as np

from ddptrain.data.format import SPLITS
from ddptrain.data.writer import write_dataset_chunks
from ddptrain.errors import DataError
from ddptrain.files import open_regular

_CHUNK_NAME = re.compile(r"(train|test)_(images|labels)(?:_([0-9]+))?\.npy")
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}


class NpyChunk:
    """A ``.npy`` file whose header was checked (``shape``, ``dtype``): ``open()`` maps it,
    read-only, when its rows are read."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        with open_regular(path, ".npy file", DataError) as f:
            try:
                version = np.lib.format.read_magic(f)
                if version not in _HEADER_READERS:
                    raise DataError(f"{path}: .npy format version {version[0]}.{version[1]}: "
                                    "ddptrain reads 1.0 and 2.0, which numpy writes")
                self.shape, fortran, self.dtype = _HEADER_READERS[version](f)
            except (ValueError, EOFError) as e:   # numpy's words for a header it cannot read
                raise DataError(f"{path}: not a .npy file ({e})") from e
            self._offset, size = f.tell(), os.fstat(f.fileno()).st_size
        if self.dtype.hasobject:
            raise DataError(f"{path}: holds Python objects ({self.dtype}), not numbers")
        expected, found = math.prod(self.shape) * self.dtype.itemsize, size - self._offset
        if found != expected:
            why = "truncated" if found < expected else "trailing bytes"
            raise DataError(f"{path}: header says shape {self.shape} of {self.dtype} ({expected} "
                            f"bytes of data) but the file holds {found} ({why})")
        if not self.shape or self.shape[0] == 0:
            raise DataError(f"{path}: holds no rows (shape {self.shape})")
        if fortran and len(self.shape) > 1:
            raise DataError(f"{path}: its values are in Fortran order; save them in C order "
                            "(np.save(path, np.ascontiguousarray(values)))")

    @property
    def ndim(self):
        return len(self.shape)

    def __len__(self):
        return self.shape[0]

    def open(self):
        return np.memmap(self.path, self.dtype, "r", self._offset, self.shape)


def chunk_paths(folder) -> dict:
    """``{split: [(images path, labels path), ...]}`` of the chunks in ``folder``, in order;
    DataError if they do not follow the naming rules (see the module's docstring)."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    found = {}   # (split, kind) -> {number or None: name}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".npy"):
            continue
        match = _CHUNK_NAME.fullmatch(name)
        if match is None:
            raise DataError(f"{folder}: {name} is not a chunk's name (train_images_000.npy, "
                            "train_labels_000.npy, ..., test_images_000.npy, ...)")
        split, kind, number = match.groups()
        numbers = found.setdefault((split, kind), {})
        number = None if number is None else int(number)
        if number in numbers:
            raise DataError(f"{folder}: {numbers[number]} and {name} are the same chunk")
        numbers[number] = name
    return {split: _split_chunks(folder, split, found) for split in SPLITS}


def _split_chunks(folder, split, found):
    images, labels = found.get((split, "images"), {}), found.get((split, "labels"), {})
    if not images or not labels:
        missing = "images" if not images else "labels"
        raise DataError(f"{folder}: no {split} {missing} ({split}_{missing}_000.npy, ... or "
                        f"{split}_{missing}.npy)")
    for kind, numbers in (("images", images), ("labels", labels)):
        if None in numbers and len(numbers) > 1:
            raise DataError(f"{folder}: both {split}_{kind}.npy and numbered {split}_{kind} "
                            "chunks: give one or the other")
        if None not in numbers and sorted(numbers) != list(range(len(numbers))):
            gap = min(set(range(len(numbers) + 1)) - set(numbers))
            raise DataError(f"{folder}: {split}_{kind} chunks are numbered from 0 without a "
                            f"gap, and chunk {gap} is missing")
    if set(images) != set(labels):
        only = min(set(images) ^ set(labels), key=lambda n: -1 if n is None else n)
        has, lacks = ("images", "labels") if only in images else ("labels", "images")
        name = (images if only in images else labels)[only]
        raise DataError(f"{folder}: {name} has no matching {split} {lacks} chunk "
                        f"(the {has} and {lacks} of a chunk go together)")
    return [(folder / images[number], folder / labels[number])
            for number in sorted(images, key=lambda n: -1 if n is None else n)]


def convert(folder, output, log, *, dataset, n_classes=None, class_names=None) -> pathlib.Path:
    """Write the chunks in ``folder`` as the data file ``output`` (a set of ``n_classes``
    classes, named ``class_names``: see ``writer.write_dataset``), a block at a time."""
    source = os.path.abspath(folder)
    paths = chunk_paths(folder)
    chunks = {split: [(NpyChunk(images), NpyChunk(labels)) for images, labels in pairs]
              for split, pairs in paths.items()}
    attrs = {"dataset": dataset, "source": source,
             "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    output = pathlib.Path(output)
    try:
        write_dataset_chunks(output, chunks["train"], chunks["test"], attrs, n_classes,
                             class_names,
                             names=lambda split, i: tuple(path.name for path in paths[split][i]))
    # one line, naming the folder
    except ValueError as e:
        raise DataError(f"{source}: {e}") from e
    except OSError as e:
        raise DataError(f"{output}: cannot write it: {e.strerror or e}") from e
    counts = {split: sum(len(images) for images, _ in pairs) for split, pairs in chunks.items()}
    log(f"wrote {output} ({counts['train']} training and {counts['test']} test images in "
        f"{len(paths['train'])} + {len(paths['test'])} chunks)")
    return output
