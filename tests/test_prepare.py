"""``prepare`` by name: sets of one's own (--idx-dir --name), Fashion-MNIST and its sources, the
cache.

Every test but the last builds tiny IDX files; no test touches the network
(the mirrors are file:// folders, and any other URL fails the test). The
last one converts the real Fashion-MNIST of the Debian package
``dataset-fashion-mnist``, installing it with apt-get when it is missing;
it skips only where it cannot be installed (no apt-get, or not root).
"""

import argparse
import dataclasses
import gzip
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import test_mnist
from ddptrain import cli
from ddptrain.data import datasets, fetch, format as data, idx
from ddptrain.distributed.launcher import environ_without_launcher, mpiexec_argv
from ddptrain.errors import DataError, UserError
from test_mnist import REPO, idx_bytes, md5, quiet, write_idx_dir

FASHION = datasets.FASHION_MNIST

# The tiny MNIST set's fixtures, shared with test_mnist.py.
contents, checksums = test_mnist.contents, test_mnist.checksums


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail any test that would download: only file:// mirrors are allowed."""
    download = fetch._download

    def local_only(url, timeout):
        assert url.startswith("file:"), f"the test tried to download {url}"
        return download(url, timeout)
    monkeypatch.setattr(fetch, "_download", local_only)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A cache folder of the test's own; $DDPTRAIN_DATA unset."""
    monkeypatch.delenv("DDPTRAIN_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "ddptrain"


def own_set(folder, image_shape=(5, 4), train_labels=(0, 3, 6, 2, 1), test_labels=(6, 0, 4),
            compress=False):
    """IDX files of a set of one's own in ``folder``; returns the folder."""
    rng = np.random.default_rng(1)
    arrays = {"train_images": rng.integers(0, 256, (len(train_labels), *image_shape),
                                           dtype=np.uint8),
              "train_labels": np.array(train_labels, np.uint8),
              "test_images": rng.integers(0, 256, (len(test_labels), *image_shape), dtype=np.uint8),
              "test_labels": np.array(test_labels, np.uint8)}
    write_idx_dir(folder, {key: idx_bytes(array) for key, array in arrays.items()},
                  compress=compress)
    return folder


def parse(argv):
    parser = argparse.ArgumentParser()
    datasets.add_arguments(parser)
    return parser.parse_args(argv)


def prepare(argv):
    """``python -m ddptrain prepare ARGV``, in this process (mnist.run, as cli.py calls it)."""
    return datasets.run(parse([str(arg) for arg in argv]))


# ---------------------------------------------------------------- a set of one's own


def test_a_set_of_one_s_own_is_written_unverified_with_the_class_count_inferred(tmp_path, capsys):
    folder = own_set(tmp_path / "idx")
    assert prepare(["--idx-dir", folder, "--name", "my-digits", "--output",
                    tmp_path / "out.h5"]) == 0
    info = data.inspect(tmp_path / "out.h5")
    assert (info.n_train, info.n_test, info.image_shape) == (5, 3, (5, 4))
    assert info.n_classes == 7 and info.class_names == ("0", "1", "2", "3", "4", "5", "6")
    assert info.attrs["dataset"] == "my-digits" and info.attrs["source"] == str(folder)
    assert info.attrs["md5_train_labels"] == md5((folder / "train-labels-idx1-ubyte").read_bytes())
    assert "license" not in info.attrs
    summary = capsys.readouterr().out.splitlines()[-1]
    assert summary.startswith(f"{tmp_path / 'out.h5'}: 5 training and 3 test images of 5x4, 7 "
                              f"classes")
    assert "my-digits" in summary


def test_images_of_several_channels_keep_their_shape(tmp_path):
    folder = own_set(tmp_path / "idx", image_shape=(3, 5, 4), compress=True)
    prepare(["--idx-dir", folder, "--name", "colour", "--output", tmp_path / "out.h5"])
    info = data.inspect(tmp_path / "out.h5")
    assert info.image_shape == (3, 5, 4)
    x, y = data.read_rows(tmp_path / "out.h5", "test", [(0, 3)])
    assert x.shape == (3, 3, 5, 4)
    np.testing.assert_array_equal(y, [6, 0, 4])


def test_classes_sets_a_count_above_the_largest_label(tmp_path):
    prepare(["--idx-dir", own_set(tmp_path / "idx"), "--name", "my-digits", "--classes", 10,
             "--output", tmp_path / "out.h5"])
    assert data.inspect(tmp_path / "out.h5").n_classes == 10


def test_class_names_are_stored_and_read_back(tmp_path):
    folder = own_set(tmp_path / "idx", train_labels=(0, 1, 2, 1), test_labels=(2, 0))
    prepare(["--idx-dir", folder, "--name", "pets", "--class-names", "cat, dog,guinea pig",
             "--output", tmp_path / "out.h5"])
    info = data.inspect(tmp_path / "out.h5")
    assert info.n_classes == 3 and info.class_names == ("cat", "dog", "guinea pig")


def test_class_names_with_an_agreeing_class_count_are_accepted(tmp_path):
    folder = own_set(tmp_path / "idx", train_labels=(0, 1), test_labels=(1,))
    prepare(["--idx-dir", folder, "--name", "pets", "--classes", 2, "--class-names", "cat,dog",
             "--output", tmp_path / "out.h5"])
    assert data.inspect(tmp_path / "out.h5").class_names == ("cat", "dog")


def test_a_label_at_or_above_classes_is_refused_in_one_line(tmp_path):
    with pytest.raises(DataError) as caught:
        prepare(["--idx-dir", own_set(tmp_path / "idx"), "--name", "my-digits", "--classes", 6,
                 "--output", tmp_path / "out.h5"])
    message = str(caught.value)
    assert "\n" not in message
    assert "train-labels-idx1-ubyte holds label 6, but --classes 6 allows only 0..5" in message
    assert not (tmp_path / "out.h5").exists()


def test_a_label_beyond_the_class_names_is_refused(tmp_path):
    with pytest.raises(DataError,
                       match=r"holds label \d, but --class-names \(2 names\) allows only 0..1"):
        prepare(["--idx-dir", own_set(tmp_path / "idx"), "--name", "pets", "--class-names",
                 "cat,dog", "--output", tmp_path / "out.h5"])


@pytest.mark.parametrize("options, message", [
    (["--classes", 4, "--class-names", "a,b,c"], "--class-names gives 3 names but --classes is 4"),
    (["--classes", 1], "--classes must be a whole number from 2 to"),
    (["--class-names", "a,,b"], "--class-names: each name must be"),
    (["--class-names", "a,b,a"], "--class-names names 'a' more than once"),
])
def test_inconsistent_class_options_are_refused(tmp_path, options, message):
    with pytest.raises(UserError, match=message):
        prepare(["--idx-dir", own_set(tmp_path / "idx"), "--name", "mine", *options, "--output",
                 tmp_path / "o.h5"])


def test_all_labels_zero_needs_classes(tmp_path):
    folder = own_set(tmp_path / "idx", train_labels=(0, 0), test_labels=(0,))
    with pytest.raises(DataError, match="every label is 0.*--classes N"):
        prepare(["--idx-dir", folder, "--name", "mine", "--output", tmp_path / "out.h5"])


def test_images_of_different_shapes_in_the_two_splits_are_refused(tmp_path):
    folder = own_set(tmp_path / "idx")
    (folder / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((3, 4, 4), np.uint8)))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte holds images of shape \(5, 4\) "
                                        r"but t10k-images-idx3-ubyte of shape \(4, 4\)"):
        prepare(["--idx-dir", folder, "--name", "mine", "--output", tmp_path / "out.h5"])


@pytest.mark.parametrize("name", ["../up", "a/b", ".hidden", "", "two words", "x" * 101, "é"])
def test_a_name_that_cannot_be_a_file_name_is_refused(tmp_path, name):
    with pytest.raises(UserError, match="a data set's name is 1 to 100 letters, digits"):
        prepare(["--idx-dir", own_set(tmp_path / "idx"), "--name", name])


def test_a_set_of_one_s_own_is_written_to_the_cache_by_default(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("DDPTRAIN_DATA", str(tmp_path / "default.h5"))   # names the MNIST file only
    prepare(["my-digits", "--idx-dir", own_set(tmp_path / "idx")])
    assert data.inspect(cache / "my-digits.h5").attrs["dataset"] == "my-digits"
    assert not (tmp_path / "default.h5").exists()


def test_a_name_given_twice_must_agree(tmp_path):
    folder = own_set(tmp_path / "idx")
    prepare(["mine", "--name", "mine", "--idx-dir", folder, "--output", tmp_path / "out.h5"])
    with pytest.raises(UserError, match="two names for the set: NAME 'mine' and --name 'yours'"):
        prepare(["mine", "--name", "yours", "--idx-dir", folder])


def test_an_unknown_name_without_idx_dir_is_refused(tmp_path):
    with pytest.raises(UserError,
                       match=r"unknown data set 'my-digits' \(known: mnist, "
                             r"fashion-mnist\).*--idx-dir"):
        prepare(["my-digits"])


def test_idx_dir_without_a_name_means_mnist_and_is_verified(tmp_path):
    with pytest.raises(DataError, match=r"\(damaged, or not the MNIST file\); for a set of your "
                                        r"own, give it a name: --name NAME"):
        prepare(["--idx-dir", own_set(tmp_path / "idx"), "--output", tmp_path / "out.h5"])


def test_class_options_are_refused_for_a_known_set(tmp_path):
    with pytest.raises(UserError,
                       match="--classes and --class-names are for a set of one's own, not "
                             "fashion-mnist"):
        prepare(["fashion-mnist", "--idx-dir", own_set(tmp_path / "idx"), "--classes", 10])


def test_the_command_line_prints_the_problem_in_one_line_with_status_2(tmp_path, capsys):
    status = cli.main(["prepare", "--name", "../x", "--idx-dir", str(own_set(tmp_path / "idx"))])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("ddptrain: error: --name '../x': a data set's name")
    assert len(err.splitlines()) == 1


# ---------------------------------------------------------------- Fashion-MNIST


@pytest.fixture
def mirror(tmp_path, contents):
    """A file:// mirror of the tiny set's .gz files; returns (url, md5s of the .gz files)."""
    gz_checksums = write_idx_dir(tmp_path / "mirror", contents, compress=True)
    return (tmp_path / "mirror").as_uri() + "/", gz_checksums


@pytest.fixture
def debian_folder(tmp_path, contents):
    """The tiny set as a Debian package lays it out: .gz files compressed again, so not the mirror's
    bytes."""
    folder = tmp_path / "debian"
    folder.mkdir()
    for key, content in contents.items():
        compressed = gzip.compress(content, compresslevel=1, mtime=1)
        (folder / f"{idx.IDX_FILES[key]}.gz").write_bytes(compressed)
    return folder


@pytest.fixture
def tiny_fashion(monkeypatch, tmp_path, checksums, mirror, debian_folder):
    """Fashion-MNIST is the tiny set, from `debian_folder`, then an empty mirror, then `mirror`;
    returns the set."""
    url, gz_checksums = mirror
    tiny = dataclasses.replace(FASHION, md5=checksums, md5_gz=gz_checksums,
                               debian_dir=str(debian_folder),
                               mirrors=((tmp_path / "empty").as_uri() + "/", url))
    monkeypatch.setitem(datasets.KNOWN_DATASETS, "fashion-mnist", tiny)
    return tiny


def test_fashion_mnist_from_idx_dir_refuses_files_that_are_not_fashion_mnist(tmp_path):
    with pytest.raises(DataError) as caught:
        prepare(["fashion-mnist", "--idx-dir", own_set(tmp_path / "idx"), "--output",
                 tmp_path / "out.h5"])
    message = str(caught.value)
    assert "\n" not in message
    found = md5((tmp_path / "idx" / "train-images-idx3-ubyte").read_bytes())
    assert (f"train-images-idx3-ubyte: md5 is {found}, expected f4a8712d7a061bf5bd6d2ca38dc4d50a "
            f"(damaged, or not the Fashion-MNIST file)") in message
    assert not (tmp_path / "out.h5").exists()


def test_fashion_mnist_comes_from_the_debian_package_first(tiny_fashion, debian_folder, cache):
    lines = []
    path = datasets.prepare("fashion-mnist", log=lines.append)
    assert path == cache / "fashion-mnist.h5"
    info = data.inspect(path)
    assert info.attrs["source"] == str(debian_folder)
    assert not any(line.startswith("fetching") for line in lines)


def test_a_fashion_mnist_file_has_its_class_names_and_license(tiny_fashion, tmp_path):
    prepare(["fashion-mnist", "--output", tmp_path / "out.h5"])
    info = data.inspect(tmp_path / "out.h5")
    assert info.n_classes == 10
    assert info.class_names == ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
    assert info.attrs["license"] == "Fashion-MNIST by Zalando Research, MIT License"
    assert info.attrs["dataset"] == "fashion-mnist"


def test_without_the_debian_package_the_mirrors_are_tried_in_turn(
        tiny_fashion, monkeypatch, tmp_path, mirror):
    monkeypatch.setitem(datasets.KNOWN_DATASETS, "fashion-mnist",
                        dataclasses.replace(tiny_fashion,
                                            debian_dir=str(tmp_path / "not-installed")))
    lines = []
    path = datasets.prepare("fashion-mnist", tmp_path / "out.h5", log=lines.append)
    assert data.inspect(path).attrs["source"] == mirror[0]
    failures = [line for line in lines if "failed" in line]
    assert failures[0] == (f"Debian package failed: the Debian package dataset-fashion-mnist is "
                           f"not installed ({tmp_path / 'not-installed'} does not exist)")
    assert failures[1].startswith("mirror failed: ")
    assert (tmp_path / "empty").as_uri() in failures[1]
    assert len(failures) == 2


def test_a_debian_file_with_the_wrong_content_falls_back_to_the_mirrors(
        tiny_fashion, debian_folder, tmp_path, mirror):
    damaged_labels = gzip.compress(idx_bytes(np.zeros(6, np.uint8)))
    (debian_folder / "t10k-labels-idx1-ubyte.gz").write_bytes(damaged_labels)
    lines = []
    path = datasets.prepare("fashion-mnist", tmp_path / "out.h5", log=lines.append)
    assert data.inspect(path).attrs["source"] == mirror[0]
    assert any(line.startswith("Debian package failed: ")
               and "t10k-labels-idx1-ubyte.gz: md5 is" in line for line in lines)


def test_when_every_source_fails_one_line_says_what_failed_and_how_to_get_it(
        tiny_fashion, monkeypatch, tmp_path):
    nowhere = (tmp_path / "nowhere").as_uri() + "/"
    monkeypatch.setitem(datasets.KNOWN_DATASETS, "fashion-mnist",
                        dataclasses.replace(tiny_fashion,
                                            debian_dir=str(tmp_path / "not-installed"),
                                            mirrors=(nowhere,)))
    with pytest.raises(DataError) as caught:
        datasets.prepare("fashion-mnist", tmp_path / "out.h5", log=quiet)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("could not fetch Fashion-MNIST from any source (the Debian package "
                              "dataset-fashion-mnist is not installed")
    assert nowhere + "train-images-idx3-ubyte.gz" in message
    assert "npm" not in message   # Fashion-MNIST has no npm package
    assert "apt-get install dataset-fashion-mnist" in message and "--idx-dir" in message


def test_the_published_fashion_mnist_locations_are_tried_in_order():
    assert FASHION.mirrors == (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/")
    assert FASHION.debian_dir == "/usr/share/datasets/fashion-mnist" and FASHION.npm_package is None


# ---------------------------------------------------------------- the cache: cached_path,
# ensure_prepared


def test_known_datasets_are_mnist_and_fashion_mnist():
    assert set(datasets.KNOWN_DATASETS) == {"mnist", "fashion-mnist"}
    assert datasets.KNOWN_DATASETS["mnist"].class_names == tuple("0123456789")


def test_cached_path_is_name_h5_in_the_cache_and_DDPTRAIN_DATA_names_mnist_only(
        cache, monkeypatch, tmp_path):
    assert datasets.cached_path("mnist") == cache / "mnist.h5"
    monkeypatch.setenv("DDPTRAIN_DATA", str(tmp_path / "mine.h5"))
    assert datasets.cached_path("mnist") == tmp_path / "mine.h5"
    assert datasets.cached_path("fashion-mnist") == cache / "fashion-mnist.h5"
    assert datasets.cached_path("my-digits") == cache / "my-digits.h5"


def test_ensure_prepared_prepares_a_known_set_once(tiny_fashion, cache):
    lines = []
    assert datasets.ensure_prepared("fashion-mnist", log=lines.append) == cache / "fashion-mnist.h5"
    path = cache / "fashion-mnist.h5"
    assert lines[0] == (f"no data file given and none at {path}: preparing Fashion-MNIST there "
                        f"(once)")
    lines.clear()
    assert datasets.ensure_prepared("fashion-mnist", log=lines.append) == cache / "fashion-mnist.h5"
    assert lines == []


def test_ensure_prepared_replaces_an_unusable_known_file(tiny_fashion, cache):
    cache.mkdir(parents=True)
    (cache / "fashion-mnist.h5").write_text("garbage")
    lines = []
    datasets.ensure_prepared("fashion-mnist", log=lines.append)
    assert lines[0].startswith(f"the Fashion-MNIST file at {cache / 'fashion-mnist.h5'} is "
                               f"unusable (")
    assert data.inspect(cache / "fashion-mnist.h5").attrs["dataset"] == "fashion-mnist"


def test_ensure_prepared_finds_a_set_of_one_s_own_but_cannot_make_it(tmp_path, cache):
    with pytest.raises(DataError, match=r"my-digits.h5 of the set my-digits is missing: prepare it "
                                        r"with `python -m ddptrain prepare --idx-dir DIR --name "
                                        r"my-digits`"):
        datasets.ensure_prepared("my-digits", log=quiet)
    prepare(["my-digits", "--idx-dir", own_set(tmp_path / "idx")])
    assert datasets.ensure_prepared("my-digits", log=quiet) == cache / "my-digits.h5"


# ---------------------------------------------------------------- the real Fashion-MNIST, from
# Debian


def why_debian_package_cannot_be_installed():
    """The reason dataset-fashion-mnist can be neither found nor installed here, or None."""
    if os.path.isdir(FASHION.debian_dir):
        return None
    if not shutil.which("apt-get"):
        return ("the Debian package dataset-fashion-mnist is not installed and there is no apt-get "
                "(Debian/Ubuntu)")
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return ("the Debian package dataset-fashion-mnist is not installed, and installing it with "
                "apt-get needs root")
    return None


def install_debian_package():
    """``apt-get install dataset-fashion-mnist``; once more after ``apt-get update`` if the package
    lists are stale."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    command = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", FASHION.debian_package]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=900)
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (f"apt-get install {FASHION.debian_package} failed:\n"
                                  f"{done.stderr[-4000:]}")


@pytest.fixture(scope="module")
def prepared_fashion(tmp_path_factory):
    """``python -m ddptrain prepare fashion-mnist`` from the Debian package (installed first if need
    be): ``(the data file, the finished process)``."""
    reason = why_debian_package_cannot_be_installed()
    if reason:
        pytest.skip(reason)
    if not os.path.isdir(FASHION.debian_dir):
        install_debian_package()
    tmp_path = tmp_path_factory.mktemp("fashion")
    done = subprocess.run([sys.executable, "-m", "ddptrain", "prepare", "fashion-mnist",
                           "--output", str(tmp_path / "x.h5")],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    return tmp_path / "x.h5", done


@pytest.mark.slow   # starts processes (apt-get, perhaps; python -m ddptrain)
def test_prepare_fashion_mnist_from_the_debian_package(prepared_fashion):
    path, done = prepared_fashion
    assert done.returncode == 0, done.stderr
    info = data.inspect(path)
    assert (info.n_train, info.n_test, info.image_shape) == (60_000, 10_000, (28, 28))
    assert info.n_classes == 10 and info.class_names == FASHION.class_names
    assert info.attrs["source"] == FASHION.debian_dir
    assert info.attrs["md5_train_images"] == "f4a8712d7a061bf5bd6d2ca38dc4d50a"
    assert done.stdout.splitlines()[-1] == (f"{path}: 60000 training and 10000 test images of "
                                            f"28x28, 10 classes; data set fashion-mnist (source: "
                                            f"{FASHION.debian_dir})")


@pytest.mark.slow   # real data: about 35 s on 2 cores
def test_the_default_mlp_on_2_ranks_reaches_89_percent_on_fashion_mnist(prepared_fashion, tmp_path):
    """The default model and options, but 15 epochs: 89.68% on an Intel Xeon (30 Nov 2026)."""
    path, done = prepared_fashion
    assert done.returncode == 0, done.stderr
    run = subprocess.run([*mpiexec_argv(2), sys.executable, "-m", "ddptrain", "--data",
                          str(path), "--epochs", "15", "--run-dir", str(tmp_path / "run"),
                          "--quiet"], capture_output=True, text=True, cwd=REPO, timeout=600,
                         env=environ_without_launcher())
    assert run.returncode == 0, run.stderr[-3000:]
    final = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["epoch"] == 15 and final["test_accuracy"] >= 0.89, final
