"""Any image-classification set trains: colour images of any size, any number of classes with their
names, and the known sets by name (``--data fashion-mnist``)."""

import numpy as np

import helpers
from ddptrain import cli
from ddptrain.data import datasets
from ddptrain.data.writer import write_dataset


def colour_set(path, n_train=40, n_test=15, classes=("cat", "dog", "ship", "truck", "frog"),
               seed=0):
    """3x32x32 images in 5 classes: each class a colour template plus noise."""
    rng = np.random.default_rng(seed)
    templates = rng.uniform(0, 255, size=(len(classes), 3, 32, 32))
    labels = np.arange(n_train + n_test) % len(classes)
    images = np.clip(templates[labels] + rng.normal(0, 30, templates[labels].shape),
                     0, 255).astype(np.uint8)
    write_dataset(path, images[:n_train], labels[:n_train], images[n_train:], labels[n_train:],
                       class_names=list(classes))
    return str(path)


def run_cli(argv, capsys):
    status = cli.main(list(map(str, argv)))
    out = capsys.readouterr()
    return status, out.out, out.err


def test_a_cnn_trains_on_colour_images_in_5_classes_and_evaluate_names_them(tmp_path, capsys):
    path = colour_set(tmp_path / "colour.h5")
    status, out, err = run_cli(["--data", path, "--model", "conv4k3-maxpool2-flatten-5", "--epochs",
                                "2", "--batch-size", "10", "--run-dir", tmp_path / "run"], capsys)
    assert status == 0, err
    assert "Conv2d" in out or "conv4k3" in out
    records = helpers.metrics_records(tmp_path / "run")
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    status, out, err = run_cli(["evaluate", tmp_path / "run" / "checkpoints" / "best.h5"], capsys)
    assert status == 0, err
    for c, name in enumerate(["cat", "dog", "ship", "truck", "frog"]):
        assert f"\n    {c}  {name} " in out
    assert "15 test rows" in out or "15 test" in out


def test_an_mlp_flattens_colour_images_and_a_misfit_names_the_model_and_the_images(
        tmp_path, capsys):
    path = colour_set(tmp_path / "colour.h5")
    status, _, err = run_cli(["--data", path, "--model", "3072-16-5", "--epochs", "1",
                              "--batch-size", "10", "--run-dir", tmp_path / "run"], capsys)
    assert status == 0, err
    status, _, err = run_cli(["--data", path, "--model", "784-16-5", "--dry-run"], capsys)
    assert status == 2
    assert err.strip() == (f"ddptrain: error: --model 784-16-5 does not fit {path}: its images are "
                           f"3x32x32, and linear1 (Linear 784->16) takes 784 features per sample, "
                           f"not 3072")
    status, _, err = run_cli(["--data", path, "--model", "3072-16-10", "--dry-run"], capsys)
    assert status == 2
    assert err.strip().endswith("it gives 10 outputs per image, and the data has 5 classes")


def test_a_version_1_file_of_ddptrain_0_1_still_trains(tmp_path, capsys):
    import h5py
    images, labels = np.random.default_rng(0).integers(0, 256, (30, 8, 8),
                                                       np.uint8), np.arange(30) % 10
    path = tmp_path / "old.h5"
    with h5py.File(path, "w") as f:   # what ddptrain 0.1 wrote: no checksums, no class count
        f.attrs["format"], f.attrs["format_version"] = "ddptrain-mnist", 1
        for split in ("train", "test"):
            f[f"{split}/images"], f[f"{split}/labels"] = images, labels.astype(np.uint8)
    status, _, err = run_cli(["--data", path, "--model", "64-10", "--epochs", "1", "--batch-size",
                              "10", "--run-dir", tmp_path / "run"], capsys)
    assert status == 0, err


def test_data_by_a_known_name_is_the_set_prepared_in_the_cache(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("DDPTRAIN_DATA", raising=False)
    cached = datasets.cached_path("fashion-mnist")
    assert cached == tmp_path / "cache" / "ddptrain" / "fashion-mnist.h5"
    helpers.make_dataset(cached)   # as if prepared before: used as it is, not prepared again
    status, out, err = run_cli(["--data", "fashion-mnist", "--model", helpers.model_spec(),
                                "--dry-run"], capsys)
    assert status == 0, err
    assert f"data {cached}" in out
