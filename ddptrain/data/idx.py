"""IDX files (the format of MNIST and Fashion-MNIST): parsing, MD5 checks, and conversion to the
data file.

An IDX file is a big-endian header (two zero bytes, a type code, the number of
dimensions, then each dimension as a 32-bit count) followed by the values. The
files may come gzip-compressed; they are verified against known MD5s (where a
set's are known) before anything is converted, so a wrong or damaged download
never becomes a data file.

A file is read a block of rows at a time (``IdxFile``), gzipped or not, and
its header is checked against the file's size before any row is read, so a
conversion takes little memory whatever the set's size, and a header that
claims more rows than the file holds is refused at once.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import math
import os
import pathlib
import struct
import zlib
from datetime import datetime, timezone

import numpy as np

from ddptrain.data.blocks import block_rows, value_range
from ddptrain.data.format import MAX_CLASSES, check_image_pair
from ddptrain.data.writer import Later, classes_for, write_sources
from ddptrain.errors import DataError
from ddptrain.files import open_regular

IDX_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
_GZIP_MAGIC = b"\x1f\x8b"
# Deflate's best: 258 bytes from 2 bits. No gzip file holds more than this many bytes per byte.
_GZIP_MAX_RATIO = 1032
_READ_BYTES = 2 ** 20   # what is read at a time where rows do not matter (a checksum)
MD5_HEX = 32

# IDX type codes (third byte of the magic number) and their big-endian dtypes.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class ChecksumMismatch(DataError):
    """A file is not the one a known set's MD5 names: damaged, or another set."""


# ---------------------------------------------------------------- IDX files


def read_idx(path) -> np.ndarray:
    """Read an IDX file, raw or gzipped, into a native-endian array of the shape its header
    gives."""
    return IdxFile(path, os.fspath(path)).read()


def parse_idx(data: bytes, name) -> np.ndarray:
    """Parse the bytes of an uncompressed IDX file; ``name`` is used in error messages.

    The format: two zero bytes, a type code, the number of dimensions ``d``,
    ``d`` big-endian uint32 sizes, then the values, big-endian, row-major.
    """
    return IdxFile(data, name).read()


class IdxFile:
    """An IDX file read a block of rows at a time: a source of rows (``blocks``) for
    ``writer.write_sources``.

    ``content``: the file's path (raw or gzipped, told by its first bytes), or
    its uncompressed bytes; ``name`` names it in messages. The header is read
    when the object is made, and the data it announces checked against the
    file's size (a gzipped file's against the most its compressed size can
    hold) before any row is read: ``shape`` and ``dtype`` (big-endian) are
    then the header's. ``md5`` is that of the uncompressed file, known after a
    pass of ``blocks``; if ``expected_md5`` is given, a pass whose MD5 differs
    ends with ChecksumMismatch (the file changed since it was verified).
    """

    def __init__(self, content, name, expected_md5=None, title="MNIST"):
        self.content, self.name = content, name
        self.expected_md5, self.title = expected_md5, title
        self.md5 = None
        with _uncompressed(content) as (stream, size, compressed):
            error = _reading_error(name, compressed)
            self.header = _read_all(stream, 4, error)
            if (len(self.header) < 4 or self.header[:2] != b"\0\0"
                    or self.header[2] not in _IDX_TYPES):
                raise DataError(f"{name}: not an IDX file (magic number 0x{self.header.hex()})")
            n_dims = self.header[3]
            if n_dims == 0:
                raise DataError(f"{name}: IDX header declares no dimensions")
            self.header += _read_all(stream, 4 * n_dims, error)
            if len(self.header) < 4 + 4 * n_dims:
                raise DataError(f"{name}: truncated IDX header ({len(self.header)} bytes, "
                                f"{n_dims} dimensions)")
        self.shape = struct.unpack(f">{n_dims}I", self.header[4:])
        self.dtype = np.dtype(_IDX_TYPES[self.header[2]])
        self._data_bytes = math.prod(self.shape) * self.dtype.itemsize
        if size is not None and size - len(self.header) != self._data_bytes:
            raise self._wrong_size(size - len(self.header))
        if compressed is not None and size is None \
                and len(self.header) + self._data_bytes > compressed * _GZIP_MAX_RATIO:
            raise DataError(f"{name}: header says shape {self.shape} ({self._data_bytes} bytes "
                            f"of data), more than a gzip file of {compressed} bytes can hold")

    def _wrong_size(self, found):
        why = "truncated" if found < self._data_bytes else "trailing bytes"
        return DataError(f"{self.name}: header says shape {self.shape} ({self._data_bytes} bytes "
                         f"of data) but the file holds {found} ({why})")

    def blocks(self, rows):
        """The rows, ``rows`` at a time (the last block fewer), in one buffer filled again for
        each block; DataError if the data is cut short or followed by more."""
        row_values = math.prod(self.shape[1:])
        digest = hashlib.md5(self.header)
        buffer = np.empty(min(rows, self.shape[0]) * row_values * self.dtype.itemsize, np.uint8)
        with _uncompressed(self.content) as (stream, _, compressed):
            error = _reading_error(self.name, compressed)
            _read_all(stream, len(self.header), error)
            done = 0
            while done < self.shape[0]:
                count = min(rows, self.shape[0] - done)
                view = memoryview(buffer)[:count * row_values * self.dtype.itemsize]
                got = _fill(stream, view, error)
                if got < len(view):
                    raise self._wrong_size(done * row_values * self.dtype.itemsize + got)
                digest.update(view)
                yield buffer[:len(view)].view(self.dtype).reshape(count, *self.shape[1:])
                done += count
            extra = _drain(stream, digest, error)
            if extra:
                raise self._wrong_size(self._data_bytes + extra)
        self.md5 = digest.hexdigest()
        if self.expected_md5 is not None:
            _check_md5(self.md5, self.expected_md5, self.name, self.title)

    def read(self) -> np.ndarray:
        """All of it: a writable, native-endian array of the header's shape."""
        values = np.empty(self.shape, self.dtype.newbyteorder("="))
        start = 0
        for block in self.blocks(block_rows(self.shape, self.dtype.itemsize)):
            values[start:start + len(block)] = block
            start += len(block)
        return values


def file_md5(path) -> str:
    """The MD5 of a file's uncompressed content (gunzipped if it is gzip data), read a megabyte at
    a time; DataError if it cannot be read."""
    digest = hashlib.md5()
    with _uncompressed(path) as (stream, _, compressed):
        _drain(stream, digest, _reading_error(os.fspath(path), compressed))
    return digest.hexdigest()


@contextlib.contextmanager
def _uncompressed(content):
    """``(stream of the uncompressed content, its size or None, the compressed size or None)`` of
    a path or of bytes: the size is known for bytes and for a raw file, not for a gzipped one."""
    if not isinstance(content, (str, os.PathLike)):
        yield io.BytesIO(content), len(content), None
        return
    with open_regular(content, "IDX file", DataError) as f:
        size = os.fstat(f.fileno()).st_size
        packed = f.read(2) == _GZIP_MAGIC   # gzip data is told by its content, not its name
        f.seek(0)
        if not packed:
            yield f, size, None
            return
        with gzip.GzipFile(fileobj=f, mode="rb") as unpacked:
            yield unpacked, None, size


def _reading_error(name, compressed):
    """What a failed read of the file ``name`` becomes: a one-line DataError."""
    def error(problem):
        if compressed is not None:
            return DataError(f"{name}: corrupt gzip data: {problem}")
        return DataError(f"{name}: cannot read: {getattr(problem, 'strerror', None) or problem}")
    return error


def _gunzip_if_compressed(data: bytes, name) -> bytes:
    """``data`` (a download, in memory), gunzipped if it is gzip data."""
    if not data.startswith(_GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{name}: corrupt gzip data: {e}") from e


def _fill(stream, view, error):
    """Read into ``view`` until it is full or the stream ends; returns the bytes read."""
    got = 0
    try:
        while got < len(view):
            count = stream.readinto(view[got:])
            if not count:
                break
            got += count
    except (OSError, EOFError, zlib.error) as e:
        raise error(e) from e
    return got


def _read_all(stream, size, error):
    """Up to ``size`` bytes (fewer only at the end of the stream)."""
    buffer = bytearray(size)
    return bytes(buffer[:_fill(stream, memoryview(buffer), error)])


def _drain(stream, digest, error):
    """Read the rest of ``stream`` into ``digest``; returns how many bytes there were."""
    buffer = bytearray(_READ_BYTES)
    total = 0
    while count := _fill(stream, memoryview(buffer), error):
        digest.update(memoryview(buffer)[:count])
        total += count
    return total


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _verify_md5(data: bytes, expected: str, name, title="MNIST") -> str:
    """Return the MD5 of ``data``, or raise DataError if it is not ``expected``."""
    return _check_md5(_md5(data), expected, name, title)


def _check_md5(actual: str, expected: str, name, title="MNIST") -> str:
    if actual != expected:
        raise ChecksumMismatch(f"{name}: md5 is {actual}, expected {expected} (damaged, or not the "
                               f"{title} file)")
    return actual

# ---------------------------------------------------------------- conversion


def convert(contents, output, log, *, source, dataset, license=None, class_names=None,
            n_classes=None, classes_from=None, checksums=None, title="MNIST") -> pathlib.Path:
    """Parse the four IDX files and write them as the data file ``output``, a block of rows at a
    time.

    ``contents``: the files, keyed like ``IDX_FILES``: each a path (raw or
    gzipped) or the uncompressed bytes. Their MD5s (of the uncompressed
    files, computed as they are read), ``dataset`` (the set's name),
    ``source`` and ``license`` become attributes of the file. The class count
    is ``len(class_names)`` if given, else ``n_classes`` if given, else the
    largest label + 1; ``classes_from`` names where a given count comes from
    ("--classes 10"), for the message about a label outside it.
    ``checksums`` (MD5s keyed like ``IDX_FILES``, of files verified before):
    a file whose content is not that one any more is refused, and no data file
    is left.
    """
    files = open_idx_set(contents, source, checksums, title)
    labels = {IDX_FILES[key]: files[key] for key in ("train_labels", "test_labels")}
    given = len(class_names) if class_names is not None else n_classes
    ranges = {name: value_range(values, given) for name, values in labels.items()}
    for name, (smallest, _, _) in ranges.items():
        if smallest < 0:
            raise DataError(f"{source}: {name} holds the negative label {smallest}")
    n_classes = _class_count(ranges, given, source, classes_from)
    largest = max((high, name) for name, (_, high, _) in ranges.items())
    attrs = {"dataset": dataset, "source": source,
             "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if license:
        attrs["license"] = license
    # known once each file is read through, while the data file is written
    attrs.update({f"md5_{key}": Later(lambda idx_file=idx_file: idx_file.md5, MD5_HEX)
                  for key, idx_file in files.items()})
    output = pathlib.Path(output)
    _write(output, files, attrs, largest, n_classes, class_names, source)
    log(f"wrote {output} ({files['train_labels'].shape[0]} training and "
        f"{files['test_labels'].shape[0]} test images, {n_classes} classes)")
    return output


def _write(output, files, attrs, largest, n_classes, class_names, source):
    try:
        n_classes, class_names = classes_for(*largest, n_classes, class_names)
        write_sources(output, {split: (files[f"{split}_images"], files[f"{split}_labels"])
                               for split in ("train", "test")},
                      n_classes, class_names, attrs)
    # whatever the checks here let through: still one line, naming the source
    except ValueError as e:
        raise DataError(f"{source}: {e}") from e
    except OSError as e:
        raise DataError(f"{output}: cannot write it: {e.strerror or e}") from e


def open_idx_set(contents, source, checksums=None, title="MNIST") -> dict:
    """The four IDX files (``IdxFile``, keyed like ``IDX_FILES``), their headers checked to make a
    data set; no row is read."""
    files = {key: IdxFile(content, f"{source}: {IDX_FILES[key]}",
                          None if checksums is None else checksums[key], title)
             for key, content in contents.items()}
    for split in ("train", "test"):
        _check_idx_pair(files[f"{split}_images"], files[f"{split}_labels"], split, source)
    train_shape, test_shape = files["train_images"].shape[1:], files["test_images"].shape[1:]
    if train_shape != test_shape:
        raise DataError(f"{source}: {IDX_FILES['train_images']} holds images of shape "
                        f"{train_shape} but {IDX_FILES['test_images']} of shape {test_shape}")
    return files


def _check_idx_pair(images, labels, split, source):
    images_name = IDX_FILES[f"{split}_images"]
    labels_name = IDX_FILES[f"{split}_labels"]
    image_type, label_type = images.dtype.newbyteorder("="), labels.dtype.newbyteorder("=")
    check_image_pair(images.shape, image_type, labels.shape, label_type, source,
                     (images_name, labels_name), f"{images_name} holds no images")


def _class_count(ranges, given, source, classes_from) -> int:
    """``given``, once every label is checked to lie below it; else the largest label + 1.
    ``ranges``: ``{file name: value_range(labels, given)}``."""
    if given is not None:
        for name, (_, _, outside) in ranges.items():
            if outside is not None:
                raise DataError(f"{source}: {name} holds label {outside}, "
                                f"but {classes_from} allows only 0..{given - 1}")
        return given
    largest = max(high for _, high, _ in ranges.values())
    if largest == 0:
        raise DataError(f"{source}: every label is 0, a single class: give the class count "
                        "with --classes N")
    if largest >= MAX_CLASSES:
        raise DataError(f"{source}: the largest label is {largest}; ddptrain handles at most "
                        f"{MAX_CLASSES} classes")
    return largest + 1
