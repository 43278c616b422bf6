"""The HDF5 data file: writing, validation (inspect) and shard reads (read_rows)."""

import os
import re

import h5py
import numpy as np
import pytest

from ddptrain.data import chunks as data_chunks, format as data
from ddptrain.data.sampler import owned_blocks
from ddptrain.data.writer import write_dataset
from ddptrain.errors import DataError

H, W = 4, 5          # small images: any (N, H, W) uint8 is accepted
N_TRAIN, N_TEST = 50, 20


def make_split(n, seed):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, H, W), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    return images, labels


@pytest.fixture
def splits():
    return make_split(N_TRAIN, 1) + make_split(N_TEST, 2)


@pytest.fixture
def data_file(tmp_path, splits):
    path = tmp_path / "mnist.h5"
    write_dataset(path, *splits, attrs={"source": "test"})
    return path


def assert_data_error(path, fragment):
    """inspect(path) raises a one-line DataError that names the file and contains ``fragment``."""
    with pytest.raises(DataError) as caught:
        data.inspect(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert fragment in message
    return message


def edit(path, change):
    """Apply ``change(h5py.File)`` to the file in place."""
    with h5py.File(path, "a") as f:
        change(f)


def replace_dataset(name, value):
    def change(f):
        del f[name]
        f[name] = value
    return change


# ---------------------------------------------------------------- write_dataset


def test_inspect_describes_a_written_file(data_file):
    info = data.inspect(data_file)
    assert (info.path, info.n_train, info.n_test) == (str(data_file), N_TRAIN, N_TEST)
    assert (info.image_shape, info.n_features, info.n_classes) == ((H, W), H * W, 10)


def test_write_dataset_stores_format_and_given_attributes(data_file):
    attrs = data.inspect(data_file).attrs
    assert attrs["format"] == "ddptrain-mnist"
    assert attrs["format_version"] == 3
    assert attrs["source"] == "test"


def test_write_dataset_uses_hdf5_s_checksummed_format_with_checksums_on_every_chunk(data_file):
    """Superblock version 2 or later (checksums on all metadata), Fletcher-32 on the data, and
    attributes of fixed length (a variable-length string would live in the global heap, which has no
    checksum)."""
    with open(data_file, "rb") as f:
        assert f.read(9)[8] >= 2
    with h5py.File(data_file, "r") as f:
        for split in data.SPLITS:
            assert f[f"{split}/images"].fletcher32 and f[f"{split}/labels"].fletcher32
        for name in f.attrs:
            assert not h5py.check_string_dtype(f.attrs.get_id(name).dtype) or \
                h5py.check_string_dtype(f.attrs.get_id(name).dtype).length is not None, name


def test_write_dataset_stores_the_arrays_unchanged(data_file, splits):
    train_images, train_labels, test_images, test_labels = splits
    with h5py.File(data_file, "r") as f:
        np.testing.assert_array_equal(f["train/images"][()], train_images)
        np.testing.assert_array_equal(f["train/labels"][()], train_labels)
        np.testing.assert_array_equal(f["test/images"][()], test_images)
        np.testing.assert_array_equal(f["test/labels"][()], test_labels)
        assert f["train/labels"].dtype == np.uint8


def test_write_dataset_chunks_images_by_whole_rows_uncompressed(tmp_path):
    path = tmp_path / "big.h5"
    big_images, big_labels = make_split(2000, 3)
    write_dataset(path, big_images, big_labels, *make_split(10, 4))
    with h5py.File(path, "r") as f:
        assert f["train/images"].chunks == (1024, H, W)
        assert f["test/images"].chunks == (10, H, W)
        assert f["train/images"].compression is None


def test_write_dataset_replaces_an_existing_file_leaving_no_temporary(data_file, splits):
    write_dataset(data_file, *splits, attrs={"source": "second"})
    assert data.inspect(data_file).attrs["source"] == "second"
    assert os.listdir(data_file.parent) == [data_file.name]


def test_write_dataset_that_fails_keeps_the_old_file_and_no_temporary(data_file, splits):
    with pytest.raises(TypeError):
        write_dataset(data_file, *splits, attrs={"unstorable": object()})
    assert data.inspect(data_file).attrs["source"] == "test"
    assert os.listdir(data_file.parent) == [data_file.name]


def test_write_dataset_creates_missing_folders(tmp_path, splits):
    path = tmp_path / "a" / "b" / "mnist.h5"
    write_dataset(path, *splits)
    assert data.inspect(path).n_train == N_TRAIN


def test_write_dataset_refuses_float_images(tmp_path, splits):
    train_images, *rest = splits
    with pytest.raises(ValueError, match="uint8"):
        write_dataset(tmp_path / "x.h5", train_images.astype(np.float32), *rest)


# ---------------------------------------------------------------- inspect: what it refuses


def test_inspect_rejects_a_missing_file(tmp_path):
    assert_data_error(tmp_path / "absent.h5", "no such file")


def test_inspect_rejects_a_folder(tmp_path):
    assert_data_error(tmp_path, "is a folder")


def test_inspect_rejects_a_file_that_is_not_hdf5(tmp_path):
    path = tmp_path / "text.h5"
    path.write_text("not hdf5\n")
    assert_data_error(path, "not an HDF5 file")


def test_inspect_rejects_a_truncated_file(data_file):
    size = data_file.stat().st_size
    with open(data_file, "r+b") as f:
        f.truncate(size - 100)
    assert_data_error(data_file, "truncated")


def test_inspect_rejects_images_whose_chunks_were_never_written(data_file):
    def unwritten(f):
        del f["train/images"]
        f.create_dataset("train/images", shape=(N_TRAIN, H, W), dtype=np.uint8, chunks=(10, H, W))
    edit(data_file, unwritten)
    assert_data_error(data_file, "'train/images' is incomplete")


def test_inspect_rejects_a_missing_dataset(data_file):
    edit(data_file, lambda f: f.__delitem__("train/labels"))
    assert_data_error(data_file, "dataset 'train/labels' is missing")


def test_inspect_rejects_a_missing_group(data_file):
    edit(data_file, lambda f: f.__delitem__("test"))
    assert_data_error(data_file, "dataset 'test/images' is missing")


def test_inspect_rejects_a_group_in_place_of_a_dataset(data_file):
    def group_instead(f):
        del f["test/labels"]
        f.create_group("test/labels")
    edit(data_file, group_instead)
    assert_data_error(data_file, "'test/labels' is a Group, not a dataset")


def test_inspect_rejects_images_that_are_not_uint8(data_file):
    edit(data_file, replace_dataset("train/images", np.zeros((N_TRAIN, H, W), np.float32)))
    assert_data_error(data_file, "'train/images' must be uint8 (N, H, W) or (N, C, H, W)")


def test_inspect_rejects_images_that_are_not_3d_or_4d(data_file):
    edit(data_file, replace_dataset("test/images", np.zeros((N_TEST, H * W), np.uint8)))
    assert_data_error(data_file, "'test/images' must be uint8 (N, H, W) or (N, C, H, W), found 2-D")


def test_inspect_rejects_labels_that_are_not_1d(data_file):
    edit(data_file, replace_dataset("train/labels", np.zeros((N_TRAIN, 1), np.uint8)))
    assert_data_error(data_file, "'train/labels' must be 1-D integers")


def test_inspect_rejects_float_labels(data_file):
    edit(data_file, replace_dataset("train/labels", np.zeros(N_TRAIN, np.float64)))
    assert_data_error(data_file, "'train/labels' must be 1-D integers")


def test_inspect_rejects_images_and_labels_of_different_lengths(data_file):
    edit(data_file, replace_dataset("train/labels", np.zeros(N_TRAIN - 1, np.uint8)))
    assert_data_error(data_file,
                      f"'train/images' has {N_TRAIN} images but 'train/labels' has {N_TRAIN - 1} "
                      "labels")


def test_inspect_rejects_labels_out_of_range(data_file):
    labels = np.zeros(N_TEST, np.uint8)
    labels[7] = 12
    edit(data_file, replace_dataset("test/labels", labels))
    assert_data_error(data_file, "label 12 in 'test/labels' is outside 0..9")


def test_inspect_rejects_negative_labels(data_file):
    labels = np.zeros(N_TRAIN, np.int8)
    labels[-1] = -1
    edit(data_file, replace_dataset("train/labels", labels))
    assert_data_error(data_file, "label -1 in 'train/labels' is outside 0..9")


def test_inspect_rejects_train_and_test_images_of_different_shapes(data_file):
    edit(data_file, replace_dataset("test/images", np.zeros((N_TEST, H, W + 1), np.uint8)))
    assert_data_error(data_file, f"train images are {H}x{W} but test images are {H}x{W + 1}")


def test_inspect_rejects_an_empty_split(data_file):
    edit(data_file, replace_dataset("test/images", np.zeros((0, H, W), np.uint8)))
    edit(data_file, replace_dataset("test/labels", np.zeros(0, np.uint8)))
    assert_data_error(data_file, "the 'test' split is empty")


def test_inspect_rejects_another_format(data_file):
    edit(data_file, lambda f: f.attrs.__setitem__("format", "something-else"))
    assert_data_error(data_file, "format is 'something-else'")


def test_inspect_rejects_a_newer_format_version(data_file):
    edit(data_file, lambda f: f.attrs.__setitem__("format_version", 4))
    assert_data_error(data_file, "format_version 4 is newer than this ddptrain reads (1 to 3); "
                                 "update ddptrain")


def test_inspect_reads_format_1_files_of_ddptrain_0_1(data_file):
    edit(data_file, lambda f: f.attrs.__setitem__("format_version", 1))
    assert data.inspect(data_file).attrs["format_version"] == 1


def test_a_format_version_that_is_not_a_number_says_so(data_file):
    edit(data_file, lambda f: f.attrs.__setitem__("format_version", "1"))
    assert_data_error(data_file, "format_version '1' is not a whole number")


def test_inspect_accepts_a_file_without_format_attributes(data_file):
    def strip(f):
        del f.attrs["format"]
        del f.attrs["format_version"]
    edit(data_file, strip)
    assert data.inspect(data_file).n_train == N_TRAIN


# ---------------------------------------------------------------- any image-classification set


def write_like_version(path, version, splits):
    """A file as ddptrain 0.1 (format 1: no checksums) or 0.2 (format 2) wrote it: MNIST's layout,
    no class count, no class names."""
    with h5py.File(path, "w", libver="latest" if version == 2 else "earliest") as f:
        f.attrs["format"], f.attrs["format_version"] = np.bytes_(b"ddptrain-mnist"), version
        for split, (images, labels) in zip(("train", "test"), (splits[:2], splits[2:])):
            f[f"{split}/images"] = images
            f[f"{split}/labels"] = labels.astype(np.uint8)


@pytest.mark.parametrize("version", [1, 2])
def test_files_of_earlier_versions_load_as_ten_classes_named_by_their_digits(
        tmp_path, splits, version):
    path = tmp_path / f"v{version}.h5"
    write_like_version(path, version, splits)
    info = data.inspect(path)
    assert (info.n_classes, info.class_names, info.image_shape) == (10, tuple("0123456789"), (H, W))
    x, y = data.read_rows(path, "test", [(0, N_TEST)])
    np.testing.assert_array_equal(y, splits[3])


def test_colour_images_of_32x32_in_5_classes_with_names(tmp_path):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(30, 3, 32, 32), dtype=np.uint8)
    labels = np.arange(30) % 5
    names = ["cat", "dog", "ship", "truck", "frog"]
    path = tmp_path / "colour.h5"
    write_dataset(path, images[:20], labels[:20], images[20:], labels[20:], class_names=names)
    info = data.inspect(path)
    assert info.image_shape == (3, 32, 32) and info.n_features == 3 * 32 * 32
    assert info.image_text == "3x32x32"
    assert (info.n_classes, info.class_names) == (5, tuple(names))
    x, y = data.read_rows(path, "train", [(5, 9)], dtype=np.float64)
    np.testing.assert_array_equal(x, images[5:9] / 255.0)
    np.testing.assert_array_equal(y, labels[5:9])


def test_the_class_count_defaults_to_the_largest_label_plus_one_and_may_be_larger(tmp_path, splits):
    write_dataset(tmp_path / "a.h5", *splits)
    assert data.inspect(tmp_path / "a.h5").n_classes == max(splits[1].max(), splits[3].max()) + 1
    write_dataset(tmp_path / "b.h5", *splits, n_classes=12)
    assert data.inspect(tmp_path / "b.h5").class_names == tuple(str(c) for c in range(12))


def test_more_than_256_classes_keep_their_labels(tmp_path):
    images = np.zeros((300, 2, 2), np.uint8)
    labels = np.arange(300)
    write_dataset(tmp_path / "many.h5", images, labels, images[:10], labels[:10])
    _, y = data.read_rows(tmp_path / "many.h5", "train", [(250, 300)])
    np.testing.assert_array_equal(y, labels[250:300])


@pytest.mark.parametrize("arguments, problem", [
    ({"n_classes": 5}, "label 9 in train labels is outside 0..4 (5 classes)"),
    ({"class_names": ["a", "b"]}, "label 9 in train labels is outside 0..1"),
    ({"n_classes": 10, "class_names": ["a"] * 3}, "3 class names for 10 classes"),
    ({"n_classes": 1}, "the class count must be a whole number from 2 to 4096"),
    ({"class_names": [""] * 10}, "a class name must be a non-empty string"),
])
def test_write_dataset_refuses_classes_that_do_not_fit_the_labels(
        tmp_path, splits, arguments, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        write_dataset(tmp_path / "x.h5", *splits, **arguments)


def test_write_dataset_refuses_splits_with_different_channels(tmp_path):
    colour, grey = np.zeros((4, 3, 5, 5), np.uint8), np.zeros((4, 5, 5), np.uint8)
    with pytest.raises(ValueError,
                       match=r"train images have 3 channel\(s\) but test images have 1"):
        write_dataset(tmp_path / "x.h5", colour, np.arange(4) % 2, grey, np.arange(4) % 2)


@pytest.mark.parametrize("change, problem", [
    (lambda f: f["train/labels"].__setitem__(0, 10),
     "label 10 in 'train/labels' is outside 0..9 (the file has 10 classes)"),
    (lambda f: f.attrs.__delitem__("n_classes"), "the root attribute 'n_classes' (the class count, "
                                                 "which format_version 3 requires) is missing"),
    (lambda f: f.attrs.__setitem__("n_classes", 1),
     "n_classes is 1; ddptrain handles 2 to 4096 classes"),
    (lambda f: f.attrs.__setitem__("n_classes", 10 ** 6),
     "n_classes is 1000000; ddptrain handles 2 to 4096"),
    (lambda f: f.attrs.__setitem__("n_classes", 2.5), "n_classes 2.5 is not a whole number"),
    (lambda f: f.attrs.__setitem__("class_names", np.array([b"a", b"b"])),
     "class_names holds 2 names for 10 classes"),
    (lambda f: f.attrs.__setitem__("class_names", 7), "class_names must be a list of 10 strings"),
    (replace_dataset("test/images", np.zeros((N_TEST, 3, H, W), np.uint8)),
     "train images have 1 channel(s) but test images have 3"),
    (replace_dataset("test/images", np.zeros((N_TEST, H, W + 1), np.uint8)),
     "train images are 4x5 but test images are 4x6"),
    (replace_dataset("train/images", np.zeros((N_TRAIN, 0, H, W), np.uint8)),
     "must be uint8 (N, H, W) or"),
])
def test_each_malformed_variant_is_one_line(data_file, change, problem):
    edit(data_file, change)
    assert_data_error(data_file, problem)


# ---------------------------------------------------------------- read_rows


def test_read_rows_returns_the_blocks_in_the_given_order(data_file, splits):
    train_images, train_labels = splits[:2]
    blocks = [(40, 50), (0, 3), (17, 18)]
    x, y = data.read_rows(data_file, "train", blocks)
    rows = np.r_[40:50, 0:3, 17:18]
    np.testing.assert_array_equal(y, train_labels[rows])
    np.testing.assert_array_equal(x, train_images[rows] / np.float32(255))


def test_read_rows_returns_c_contiguous_float32_in_unit_interval_and_int64_labels(data_file):
    x, y = data.read_rows(data_file, "test", [(0, N_TEST)])
    assert x.shape == (N_TEST, H, W) and x.dtype == np.float32 and x.flags.c_contiguous
    assert y.shape == (N_TEST,) and y.dtype == np.int64
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_read_rows_honours_the_requested_dtype(data_file, splits):
    test_images = splits[2]
    x, _ = data.read_rows(data_file, "test", [(5, 9)], dtype=np.float64)
    assert x.dtype == np.float64
    np.testing.assert_array_equal(x, test_images[5:9] / 255.0)


def test_read_rows_of_every_rank_together_cover_the_split_once(data_file, splits):
    train_labels = splits[1]
    world_size, n_shards = 3, 6
    labels = [data.read_rows(data_file, "train",
                             owned_blocks(N_TRAIN, rank, world_size,
                                          n_shards))[1] for rank in range(world_size)]
    assert sum(len(part) for part in labels) == N_TRAIN
    # Rank r owns shards r, r+P, ...: rank 0's first block is the first shard.
    first_shard_size = owned_blocks(N_TRAIN, 0, world_size, n_shards)[0][1]
    np.testing.assert_array_equal(labels[0][:first_shard_size], train_labels[:first_shard_size])


def test_read_rows_of_no_blocks_is_empty(data_file):
    x, y = data.read_rows(data_file, "train", [])
    assert x.shape == (0, H, W) and y.shape == (0,)


def test_read_rows_rejects_blocks_outside_the_split(data_file):
    with pytest.raises(DataError,
                       match=rf"rows 15:{N_TEST + 1} are outside 'test/images' \({N_TEST} rows\)"):
        data.read_rows(data_file, "test", [(15, N_TEST + 1)])


def test_read_rows_of_a_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        data.read_rows(tmp_path / "absent.h5", "train", [(0, 1)])


@pytest.mark.parametrize("reader", ["hdf5", "chunks"])
def test_read_rows_turns_read_failures_into_a_data_error_naming_the_file(data_file, monkeypatch,
                                                                         reader):
    def failing_read(*args, **kwargs):
        raise OSError("Can't synchronously read data (wrong B-tree signature)")
    if reader == "hdf5":
        monkeypatch.setattr(data_chunks.ChunkReader, "of", lambda dataset, fd=None: None)
        monkeypatch.setattr(h5py.Dataset, "read_direct", failing_read)
    else:   # whole chunks read with preadv (data/chunks.py)
        monkeypatch.setattr(data_chunks.os, "preadv", failing_read)
    with pytest.raises(DataError) as caught:
        data.read_rows(data_file, "train", [(0, 10)])
    assert str(caught.value).startswith(f"{data_file}: cannot read 'train' rows")
    assert "wrong B-tree signature" in str(caught.value)
