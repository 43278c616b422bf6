"""Converters that stream: a data file is written a block of rows at a time, from arrays, memory
maps, IDX files or a folder of .npy chunks, and is the file a writer holding everything in memory
would make, byte for byte; what goes wrong on the way leaves no file behind."""

import errno
import gzip
import hashlib
import io
import math
import os
import re
import resource
import signal
import struct
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from ddptrain import cli, durable
from ddptrain.data import blocks, datasets, fetch, format as data, idx, npy
from ddptrain.data.writer import write_dataset, write_dataset_chunks
from ddptrain.errors import DataError, UserError
from helpers import clean_env
from test_mnist import idx_bytes, md5, quiet, write_idx_dir


def splits_of(n_train=300, n_test=70, image_shape=(5, 4), n_classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return {split: (rng.integers(0, 256, (n, *image_shape), dtype=np.uint8),
                    rng.integers(0, n_classes, n))
            for split, n in (("train", n_train), ("test", n_test))}


def written_whole(splits, attrs=None, n_classes=10, class_names=None):
    """The file as the writer of earlier versions made it, everything in memory and written by
    h5py at once: what a streamed file must equal, byte for byte. Its content_sha256 is the
    SHA-256 of the four arrays, whole, one after the other."""
    label_type = np.uint8 if n_classes <= 256 else np.uint16
    stored = {split: (images, labels.astype(label_type)) for split, (images, labels) in
              splits.items()}
    whole = hashlib.sha256(b"".join(array.tobytes() for split in ("train", "test")
                                    for array in stored[split])).hexdigest()
    names = class_names or [str(c) for c in range(n_classes)]
    buffer = io.BytesIO()
    with h5py.File(buffer, "w", libver="latest") as f:
        f.attrs["format"] = np.bytes_(b"ddptrain-mnist")
        f.attrs["format_version"] = 3
        f.attrs["n_classes"] = n_classes
        f.attrs["class_names"] = np.array([name.encode() for name in names])
        f.attrs["content_sha256"] = np.bytes_(whole.encode())
        for name, value in (attrs or {}).items():
            f.attrs[name] = np.bytes_(value.encode())
        for split, (images, labels) in stored.items():
            group = f.create_group(split)
            rows = min(len(images), 1024, max(1, 2 ** 20 // math.prod(images.shape[1:])))
            group.create_dataset("images", data=images, chunks=(rows, *images.shape[1:]),
                                 fletcher32=True)
            group.create_dataset("labels", data=labels, chunks=(min(len(labels), 65536),),
                                 fletcher32=True)
    return buffer.getvalue()


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of about 1 KiB: the small arrays of a test cross many blocks and chunks."""
    monkeypatch.setattr(blocks, "BLOCK_BYTES", 1024)


def args(splits):
    return (*splits["train"], *splits["test"])


def leftovers(folder):
    return sorted(name for name in os.listdir(folder) if ".tmp-" in name)


# ---------------------------------------------------------------- the same file, byte for byte


@pytest.mark.parametrize("block_bytes", [1024, 5000, blocks.BLOCK_BYTES])
def test_a_file_written_a_block_at_a_time_is_the_file_written_whole(
        tmp_path, monkeypatch, block_bytes):
    monkeypatch.setattr(blocks, "BLOCK_BYTES", block_bytes)
    splits = splits_of(n_train=3000, image_shape=(3, 8, 8))   # 3 chunks of 1024 rows, and a part
    write_dataset(tmp_path / "out.h5", *args(splits), attrs={"source": "test"})
    assert (tmp_path / "out.h5").read_bytes() == written_whole(splits, {"source": "test"})


def test_content_sha256_computed_while_writing_is_that_of_the_whole_arrays(tmp_path, small_blocks):
    splits = splits_of(n_classes=300)   # labels stored as uint16
    write_dataset(tmp_path / "out.h5", *args(splits))
    whole = hashlib.sha256()
    for split in ("train", "test"):
        images, labels = splits[split]
        whole.update(images.tobytes() + labels.astype(np.uint16).tobytes())
    assert data.inspect(tmp_path / "out.h5").attrs["content_sha256"] == whole.hexdigest()


def test_chunks_of_any_sizes_make_the_file_of_the_arrays_joined(tmp_path, small_blocks):
    splits = splits_of()
    (x, y), (xt, yt) = splits["train"], splits["test"]
    cuts = [0, 1, 2, 50, 51, 217, 300]
    train = [(x[a:b], y[a:b]) for a, b in zip(cuts, cuts[1:])]
    write_dataset_chunks(tmp_path / "out.h5", train, [(xt, yt)])
    assert (tmp_path / "out.h5").read_bytes() == written_whole(splits)


def test_a_chunk_that_does_not_fit_is_refused_by_its_number(tmp_path):
    (x, y), test = splits_of()["train"], splits_of()["test"]
    with pytest.raises(ValueError, match=r"train images \(chunk 1\) has 3 images but train "
                                         r"labels \(chunk 1\) has 2 labels"):
        write_dataset_chunks(tmp_path / "out.h5", [(x[:5], y[:5]), (x[5:8], y[5:7])], [test])
    with pytest.raises(ValueError, match=r"the test split has no chunks"):
        write_dataset_chunks(tmp_path / "out.h5", [(x, y)], [])
    assert os.listdir(tmp_path) == []


def test_memory_maps_are_written_as_the_arrays_they_map(tmp_path, small_blocks):
    splits = splits_of()
    maps = []
    for split in ("train", "test"):
        for kind, array in zip(("images", "labels"), splits[split]):
            np.save(tmp_path / f"{split}_{kind}.npy", array)
            maps.append(np.load(tmp_path / f"{split}_{kind}.npy", mmap_mode="r"))
    write_dataset(tmp_path / "out.h5", *maps)
    assert (tmp_path / "out.h5").read_bytes() == written_whole(splits)


def idx_set(folder, splits, compress=False):
    """``splits`` as the four IDX files in ``folder`` (labels as uint8); returns the MD5s of their
    uncompressed content."""
    contents = {f"{split}_{kind}": idx_bytes(array.astype(np.uint8))
                for split, pair in splits.items()
                for kind, array in zip(("images", "labels"), pair)}
    write_idx_dir(folder, contents, compress=compress)
    return {key: md5(content) for key, content in contents.items()}


@pytest.mark.parametrize("compress", [False, True])
def test_idx_files_become_the_file_written_whole_with_their_md5s(tmp_path, small_blocks, compress):
    splits = splits_of(n_train=3000, image_shape=(3, 8, 8))
    checksums = idx_set(tmp_path / "idx", splits, compress)
    datasets.prepare("mine", tmp_path / "out.h5", tmp_path / "idx", log=quiet)
    attrs = data.inspect(tmp_path / "out.h5").attrs
    assert {key: attrs[f"md5_{key}"] for key in checksums} == checksums
    provenance = {"dataset": "mine", "source": str(tmp_path / "idx"), "created": attrs["created"],
                  **{f"md5_{key}": value for key, value in checksums.items()}}
    assert (tmp_path / "out.h5").read_bytes() == written_whole(splits, provenance)


@pytest.mark.parametrize("change, problem", [
    (lambda splits: {**splits, "test": (splits["test"][0][:, 0], splits["test"][1])},
     "t10k-images-idx3-ubyte must be uint8 (N, H, W) or (N, C, H, W), found 2-D uint8 of shape "
     "(70, 4)"),
    (lambda splits: {**splits, "test": (splits["test"][0][:0], splits["test"][1][:0])},
     "t10k-images-idx3-ubyte holds no images"),
])
def test_idx_images_of_the_wrong_shape_or_none_are_refused_naming_the_file(
        tmp_path, change, problem):
    """The same checks as an HDF5 file's splits get (``data.check_image_pair``; counts that
    differ: test_mnist.py), with the IDX files' names; nothing is written."""
    idx_set(tmp_path / "idx", change(splits_of()))
    with pytest.raises(DataError, match=re.escape(problem)):
        datasets.prepare("mine", tmp_path / "out.h5", tmp_path / "idx", log=quiet)
    assert not (tmp_path / "out.h5").exists()


# ---------------------------------------------------------------- nothing left when it fails


def test_a_write_that_fails_midway_raises_it_and_leaves_the_old_file_and_no_temporary(
        tmp_path, small_blocks, monkeypatch):
    """A full disk: HDF5 never sees the error (which could leave it in a state that crashes the
    process); the conversion ends at the next block with the OSError."""
    splits = splits_of()
    write_dataset(tmp_path / "out.h5", *args(splits), attrs={"source": "old"})
    writes = []

    def full_after_a_few(self, view, offset):
        writes.append(offset)
        if len(writes) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        os.pwrite(self._fd, view, offset)
    monkeypatch.setattr(durable.StreamedFile, "_write_at", full_after_a_few)
    with pytest.raises(OSError, match="No space left on device"):
        write_dataset(tmp_path / "out.h5", *args(splits_of(seed=1)), attrs={"source": "new"})
    assert data.inspect(tmp_path / "out.h5").attrs["source"] == "old"
    assert leftovers(tmp_path) == []
    monkeypatch.undo()
    write_dataset(tmp_path / "out.h5", *args(splits), attrs={"source": "again"})   # HDF5 is fine
    assert data.inspect(tmp_path / "out.h5").attrs["source"] == "again"


def test_a_disk_without_room_for_the_file_is_refused_before_it_is_begun(tmp_path, monkeypatch):
    monkeypatch.setattr(durable.shutil, "disk_usage", lambda folder: type(
        "usage", (), {"free": 1000})())
    # (1000 + 70) images of 20 bytes, and as many labels of 1 byte
    with pytest.raises(OSError, match=r"the file needs about 22,470 bytes, .* has 1,000 bytes "
                                      r"free"):
        write_dataset(tmp_path / "out.h5", *args(splits_of(n_train=1000, image_shape=(4, 5))))
    assert os.listdir(tmp_path) == []


def test_ctrl_c_while_hdf5_writes_ends_the_conversion_with_no_file_and_no_temporary(
        tmp_path, small_blocks, monkeypatch):
    """The signal arrives inside one of HDF5's writes: KeyboardInterrupt, once the temporary file
    is gone, and HDF5 writes the next file as if nothing had happened."""
    splits = splits_of(n_train=3000, image_shape=(3, 8, 8))   # 3 blocks of 1024 rows
    write_at, writes = durable.StreamedFile._write_at, []

    def interrupted(self, view, offset):
        writes.append(offset)
        if len(writes) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        write_at(self, view, offset)
    monkeypatch.setattr(durable.StreamedFile, "_write_at", interrupted)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)   # as `prepare` runs
    try:
        with pytest.raises(KeyboardInterrupt):
            write_dataset(tmp_path / "out.h5", *args(splits))
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    write_dataset(tmp_path / "out.h5", *args(splits))   # and HDF5 is fine
    assert (tmp_path / "out.h5").read_bytes() == written_whole(splits)


def test_a_gzipped_idx_file_cut_short_is_found_late_and_leaves_no_file(tmp_path, small_blocks):
    splits = splits_of(n_train=3000, image_shape=(3, 8, 8))
    idx_set(tmp_path / "idx", splits, compress=True)
    images = tmp_path / "idx" / "train-images-idx3-ubyte.gz"
    whole = gzip.decompress(images.read_bytes())
    images.write_bytes(gzip.compress(whole[:len(whole) * 2 // 3]))   # a valid gzip, too short
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: header says shape "
                                        r"\(3000, 3, 8, 8\) \(576000 bytes of data\) but the file "
                                        r"holds 383993 \(truncated\)"):
        datasets.prepare("mine", tmp_path / "out" / "out.h5", tmp_path / "idx", log=quiet)
    assert os.listdir(tmp_path / "out") == []


def test_a_known_set_whose_file_changes_after_it_was_verified_is_refused(
        tmp_path, monkeypatch):
    splits = splits_of(n_train=60, image_shape=(28, 28))
    checksums = idx_set(tmp_path / "idx", splits)
    known = datasets.KnownDataset(name="mnist", title="MNIST", md5=checksums, md5_gz={},
                                  mirrors=(), class_names=tuple("0123456789"), license="-")
    read_idx_dir = fetch.read_idx_dir

    def changed_after_verification(*arguments):
        contents = read_idx_dir(*arguments)
        labels = splits["test"][1].astype(np.uint8)
        (tmp_path / "idx" / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes((labels + 1) % 10))
        return contents
    monkeypatch.setattr(fetch, "read_idx_dir", changed_after_verification)
    with pytest.raises(idx.ChecksumMismatch, match=r"t10k-labels-idx1-ubyte: md5 is [0-9a-f]{32}, "
                                                   f"expected {checksums['test_labels']}"):
        datasets.prepare_known(known, tmp_path / "out.h5", tmp_path / "idx", quiet)
    assert not (tmp_path / "out.h5").exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------- hostile headers


def test_an_idx_header_that_claims_more_rows_than_the_file_holds_is_refused_before_reading(
        tmp_path):
    header = bytes([0, 0, 8, 3]) + struct.pack(">3I", 10 ** 9, 28, 28)
    (tmp_path / "huge").write_bytes(header + bytes(784))
    with pytest.raises(DataError, match=r"huge: header says shape \(1000000000, 28, 28\) "
                                        r"\(784000000000 bytes of data\) but the file holds 784 "
                                        r"\(truncated\)"):
        idx.IdxFile(tmp_path / "huge", str(tmp_path / "huge"))


def test_a_gzipped_idx_header_that_claims_more_than_gzip_can_hold_is_refused_at_once(tmp_path):
    header = bytes([0, 0, 8, 3]) + struct.pack(">3I", 10 ** 9, 28, 28)
    packed = gzip.compress(header + bytes(10_000))
    (tmp_path / "huge.gz").write_bytes(packed)
    with pytest.raises(DataError, match=f"more than a gzip file of {len(packed)} bytes can hold"):
        idx.IdxFile(tmp_path / "huge.gz", "huge.gz")


def test_a_npy_header_that_claims_more_rows_than_the_file_holds_is_refused_before_mapping(
        tmp_path):
    np.save(tmp_path / "train_images.npy", np.zeros((3, 4, 4), np.uint8))
    content = (tmp_path / "train_images.npy").read_bytes()
    # a header of the same length that claims 9 rows: the file holds 3
    (tmp_path / "train_images.npy").write_bytes(content.replace(b"(3, 4, 4)", b"(9, 4, 4)"))
    with pytest.raises(DataError, match=r"header says shape \(9, 4, 4\) of uint8 \(144 bytes of "
                                        r"data\) but the file holds 48 \(truncated\)"):
        npy.NpyChunk(tmp_path / "train_images.npy")


def test_a_npy_file_of_python_objects_is_refused_without_unpickling_it(tmp_path):
    np.save(tmp_path / "train_labels.npy", np.array([object()] * 3), allow_pickle=True)
    with pytest.raises(DataError, match=r"holds Python objects \(object\), not numbers"):
        npy.NpyChunk(tmp_path / "train_labels.npy")


# ---------------------------------------------------------------- a folder of .npy chunks


def npy_folder(folder, splits, cuts=None):
    """``splits`` as numbered .npy chunks in ``folder``, cut at ``cuts[split]`` (row indices)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in splits.items():
        edges = [0, *(cuts or {}).get(split, []), len(images)]
        for i, (a, b) in enumerate(zip(edges, edges[1:])):
            np.save(folder / f"{split}_images_{i:03d}.npy", images[a:b])
            np.save(folder / f"{split}_labels_{i:03d}.npy", labels[a:b])
    return folder


def prepare_cli(argv, capsys):
    """``python -m ddptrain prepare ARGV`` in this process: ``(status, stderr's lines, stdout)``."""
    status = cli.main(["prepare", *map(str, argv)])
    out, err = capsys.readouterr()
    return status, err.splitlines(), out


def test_a_folder_of_npy_chunks_is_the_set_of_its_chunks_joined(tmp_path, small_blocks, capsys):
    splits = splits_of(image_shape=(3, 4, 5))
    folder = npy_folder(tmp_path / "npy", splits, {"train": [7, 100, 101, 250], "test": [35]})
    status, _, out = prepare_cli(["--npy-dir", folder, "--name", "mine", "--output",
                                  tmp_path / "out.h5"], capsys)
    assert status == 0
    assert out.splitlines()[-1].startswith(f"{tmp_path / 'out.h5'}: 300 training and 70 test")
    write_dataset(tmp_path / "joined.h5", *args(splits))
    info, joined = data.inspect(tmp_path / "out.h5"), data.inspect(tmp_path / "joined.h5")
    assert info.attrs["content_sha256"] == joined.attrs["content_sha256"]
    assert (info.n_train, info.n_test, info.image_shape, info.n_classes) == (300, 70, (3, 4, 5), 10)
    assert (info.attrs["dataset"], info.attrs["source"]) == ("mine", str(folder))


def test_a_split_in_one_piece_may_be_one_unnumbered_npy_file(tmp_path, capsys):
    splits = splits_of()
    (tmp_path / "npy").mkdir()
    for split, (images, labels) in splits.items():
        np.save(tmp_path / "npy" / f"{split}_images.npy", images)
        np.save(tmp_path / "npy" / f"{split}_labels.npy", labels)
    (tmp_path / "npy" / "README.txt").write_text("other files are ignored\n")
    assert prepare_cli(["--npy-dir", tmp_path / "npy", "--name", "mine", "--classes", 12,
                        "--output", tmp_path / "out.h5"], capsys)[0] == 0
    assert data.inspect(tmp_path / "out.h5").n_classes == 12


def rename(old, new):
    return lambda folder: (folder / old).rename(folder / new)


def save(name, array):
    return lambda folder: np.save(folder / name, array)


@pytest.mark.parametrize("change, problem", [
    (rename("train_images_001.npy", "train_images_003.npy"),
     "train_images chunks are numbered from 0 without a gap, and chunk 1 is missing"),
    (rename("train_images_001.npy", "train_image_001.npy"),
     "train_image_001.npy is not a chunk's name (train_images_000.npy"),
    (save("train_labels_1.npy", np.zeros(3, np.uint8)),
     "train_labels_001.npy and train_labels_1.npy are the same chunk"),
    (save("train_images.npy", np.zeros((3, 5, 4), np.uint8)),
     "both train_images.npy and numbered train_images chunks: give one or the other"),
    (lambda folder: (folder / "test_labels_000.npy").unlink(),
     "no test labels (test_labels_000.npy, ... or test_labels.npy)"),
    (save("train_labels_001.npy", np.zeros(4, np.uint8)),
     "train_images_001.npy has 5 images but train_labels_001.npy has 4 labels"),
    (save("train_images_002.npy", np.zeros((3, 4, 5), np.uint8)),
     "train_images_002.npy holds images of shape (4, 5), train_images_000.npy of shape (5, 4)"),
    (save("test_images_000.npy", np.zeros((70, 5, 4), np.float32)),
     "test_images_000.npy must be uint8 images (N, H, W) or (N, C, H, W), got float32"),
    (save("test_labels_000.npy", np.full(70, -1)), "label -1 in test_labels_000.npy is negative"),
    (save("train_images_000.npy", np.asfortranarray(np.zeros((5, 5, 4), np.uint8))),
     "train_images_000.npy: its values are in Fortran order; save them in C order"),
    (lambda folder: (folder / "test_images_000.npy").write_bytes(b"not numpy"),
     "test_images_000.npy: not a .npy file"),
])
def test_a_folder_that_breaks_the_rules_is_refused_in_one_line_with_status_2(
        tmp_path, capsys, change, problem):
    folder = npy_folder(tmp_path / "npy", splits_of(), {"train": [5, 10, 13]})
    change(folder)
    status, lines, _ = prepare_cli(["--npy-dir", folder, "--name", "mine", "--output",
                                    tmp_path / "out" / "out.h5"], capsys)
    assert status == 2 and len(lines) == 1 and problem in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_a_label_outside_the_classes_given_is_refused_naming_its_chunk(tmp_path, capsys):
    splits = splits_of(n_classes=5)
    splits["test"][1][33] = 7
    folder = npy_folder(tmp_path / "npy", splits)
    status, lines, _ = prepare_cli(["--npy-dir", folder, "--name", "mine", "--classes", 5],
                                   capsys)
    assert status == 2
    assert lines[0].endswith("label 7 in test_labels_000.npy is outside 0..4 (5 classes)")


@pytest.mark.parametrize("options, problem", [
    (["mnist"], "--npy-dir is for a set of one's own, not mnist"),
    (["mine", "--idx-dir", "."], "--idx-dir and --npy-dir: give one folder"),
])
def test_npy_dir_is_for_a_set_of_one_s_own_and_alone(tmp_path, options, problem):
    with pytest.raises(UserError, match=problem):
        datasets.run(cli.parse(["prepare", *options, "--npy-dir", str(tmp_path)]))


def test_a_folder_of_more_chunks_than_files_may_be_open_is_converted(tmp_path, monkeypatch):
    """Each chunk is mapped only while it is read: a memory map holds its file open."""
    splits = splits_of(n_train=600, n_test=20)
    folder = npy_folder(tmp_path / "npy", splits, {"train": list(range(2, 600, 2))})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 40, hard))   # 300 train chunks
    try:
        npy.convert(folder, tmp_path / "out.h5", quiet, dataset="mine")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert data.inspect(tmp_path / "out.h5").n_train == 600


# ---------------------------------------------------------------- a large set, in a process

MIB = 2 ** 20
BIG_MIB = 192                # of images: more than twice what a conversion may take
CONVERSION_MIB = 80          # the most a conversion may add to a process's memory, whatever the set
BIG_SHAPE = (3, 32, 32)
BIG_ROWS = BIG_MIB * MIB // math.prod(BIG_SHAPE)


@pytest.fixture(scope="module")
def big_set(tmp_path_factory):
    """``BIG_MIB`` of images as IDX files (``idx/``), .npy chunks (``npy/``) and one .npy file
    per array (``whole/``)."""
    folder = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    splits = {"train": BIG_ROWS - BIG_ROWS // 8, "test": BIG_ROWS // 8}
    for sub in ("idx", "npy", "whole"):
        (folder / sub).mkdir()
    contents = {}
    for split, n in splits.items():
        images = rng.integers(0, 256, (n, *BIG_SHAPE), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        np.save(folder / "whole" / f"{split}_images.npy", images)
        np.save(folder / "whole" / f"{split}_labels.npy", labels)
        for i, start in enumerate(range(0, n, 10_000)):
            np.save(folder / "npy" / f"{split}_images_{i:03d}.npy", images[start:start + 10_000])
            np.save(folder / "npy" / f"{split}_labels_{i:03d}.npy", labels[start:start + 10_000])
        contents.update({f"{split}_images": idx_bytes(images),
                         f"{split}_labels": idx_bytes(labels)})
        del images
    write_idx_dir(folder / "idx", contents)
    return folder


PEAK = r"""
import os, sys
import numpy as np
from ddptrain.data import datasets, writer

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

kind, folder, output = sys.argv[1:]
before = status("VmRSS")
if kind == "idx":
    datasets.prepare("big", output, os.path.join(folder, "idx"), log=lambda line: None)
elif kind == "npy-dir":
    datasets.prepare("big", output, npy_dir=os.path.join(folder, "npy"), log=lambda line: None)
else:
    writer.write_dataset(output, *[np.load(os.path.join(folder, "whole", f"{split}_{what}.npy"),
                                           mmap_mode="r")
                                   for split in ("train", "test") for what in ("images", "labels")])
print(status("VmHWM") - before)
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["idx", "npy-dir", "memmap"])
def test_a_conversion_takes_a_bounded_memory_whatever_the_size_of_the_set(big_set, tmp_path, kind):
    """Peak resident memory (VmHWM: it counts the pages of a memory map that were read) above
    the process before the conversion."""
    done = subprocess.run([sys.executable, "-c", PEAK, kind, str(big_set), str(tmp_path / "o.h5")],
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    added = int(done.stdout.split()[-1])
    print(f"{kind}: {added / MIB:.0f} MiB")
    assert added < CONVERSION_MIB * MIB, f"{kind}: {added / MIB:.0f} MiB"
    info = data.inspect(tmp_path / "o.h5")
    assert info.n_train + info.n_test == BIG_ROWS


def start_prepare(big_set, output):
    return subprocess.Popen([sys.executable, "-m", "ddptrain", "prepare", "--npy-dir",
                             str(big_set / "npy"), "--name", "big", "--output", str(output)],
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def signal_once_writing(process, folder, number):
    """Send ``number`` to ``process`` once its temporary file exists (the conversion is under
    way)."""
    deadline = time.monotonic() + 60
    while not (folder.exists() and leftovers(folder)):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.002)
    process.send_signal(number)
    return process.communicate(timeout=60)


@pytest.mark.slow
def test_sigterm_during_a_conversion_ends_it_by_sigterm_leaving_no_file(big_set, tmp_path):
    process = start_prepare(big_set, tmp_path / "out" / "big.h5")
    signal_once_writing(process, tmp_path / "out", signal.SIGTERM)
    assert process.returncode == -signal.SIGTERM
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.slow
def test_ctrl_c_during_a_conversion_ends_it_with_status_130_leaving_no_file(big_set, tmp_path):
    process = start_prepare(big_set, tmp_path / "out" / "big.h5")
    _, err = signal_once_writing(process, tmp_path / "out", signal.SIGINT)
    assert process.returncode == 130
    assert err.splitlines() == ["ddptrain: error: interrupted (Ctrl-C)"]
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.slow   # mount and umount
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small file system needs root")
def test_a_disk_that_fills_during_a_conversion_is_one_line_and_leaves_nothing(
        tmp_path, monkeypatch, capsys):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=True)
    try:
        # the check of the free space before the start passes: the disk fills on the way
        monkeypatch.setattr(durable.shutil, "disk_usage", lambda folder: type(
            "usage", (), {"free": 10 * MIB})())
        folder = npy_folder(tmp_path / "npy", splits_of(n_train=3000, image_shape=(3, 32, 32)))
        status, lines, _ = prepare_cli(["--npy-dir", folder, "--name", "mine", "--output",
                                        disk / "out.h5"], capsys)
        assert status == 2 and len(lines) == 1
        assert lines[0].endswith(f"{disk / 'out.h5'}: cannot write it: No space left on device")
        assert os.listdir(disk) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)
