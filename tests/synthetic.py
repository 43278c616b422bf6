"""Small, learnable MNIST-like data sets that tests write for themselves.

Each class has a random 0..255 template; a sample is its class template plus
noise. A tiny MLP learns them in a few steps, so training tests can check
that the loss falls, while the files stay a few kilobytes.
"""

import numpy as np

from ddptrain.data import write_dataset


def make_images(n, side, n_classes, rng, templates):
    labels = rng.integers(0, n_classes, size=n).astype(np.uint8)
    noise = rng.normal(0, 40, size=(n, side, side))
    images = np.clip(templates[labels] + noise, 0, 255).astype(np.uint8)
    return images, labels


def make_dataset(path, n_train=240, n_test=60, side=8, n_classes=10, seed=0):
    """Write a ddptrain HDF5 file of ``side x side`` images; returns the path (as str)."""
    rng = np.random.default_rng(seed)
    templates = rng.uniform(0, 255, size=(n_classes, side, side))
    train = make_images(n_train, side, n_classes, rng, templates)
    test = make_images(n_test, side, n_classes, rng, templates)
    write_dataset(path, *train, *test, attrs={"source": "synthetic test data"})
    return str(path)


def model_spec(side=8, hidden=(16,), n_classes=10):
    """The MLP spec that fits ``make_dataset(side=side)``."""
    return "-".join(str(s) for s in (side * side, *hidden, n_classes))
