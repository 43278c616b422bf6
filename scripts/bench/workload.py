"""What every row trains on: the layers of a --model spec, and this rank's rows of the data."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ddptrain.nn import Linear

from .ddptrain_internals import (
    epoch_plan,
    inspect_data,
    layer_flops,
    owned_blocks,
    parse_spec,
    read_rows,
    training_flops,
)

RANDOM = "random"   # --data random: images of MNIST's shape drawn at random, no file

# The data's image shape: MNIST's for random data; use_images_of(data) sets it from a file, once per
# process. Read it as workload.IMAGE (a name imported from here would keep the first value).
IMAGE = (28, 28)


def use_images_of(data):
    """Set IMAGE to the images of ``data`` (a data file, or 'random': MNIST's shape)."""
    global IMAGE
    if data != RANDOM:
        IMAGE = tuple(inspect_data(data).image_shape)


def model_layers(spec):
    """The layers of a --model spec for the data's images (no arrays: nothing allocated)."""
    return parse_spec(spec).layers(IMAGE)


def layer_sizes(spec):
    """An MLP's layer sizes, input first (the GEMM limit is measured on its products)."""
    linears = [layer for layer in model_layers(spec) if isinstance(layer, Linear)]
    return [linears[0].n_in] + [layer.n_out for layer in linears]


def flops_per_sample(spec):
    """FLOPs of one training step per sample: forward, weight gradients, input gradients but the
    first layer's."""
    return training_flops(layer_flops(model_layers(spec), IMAGE))


def with_batchnorm(spec):
    """An MLP ``spec`` with a BatchNorm after every hidden layer: 784-512-256-10 ->
    784-512-bn-256-bn-10."""
    tokens = parse_spec(spec).tokens
    hidden = (replace(token, batchnorm=True) for token in tokens[1:-1])
    return "-".join(map(str, [tokens[0], *hidden, tokens[-1]]))


def load_shard(data, rank, size, split, blocks_fn, as_stored=True):
    """This rank's rows of ``split`` as ``python -m ddptrain`` keeps them: uint8 pixels from a file
    (random data: float32), and int64 labels; ``step.Split`` makes float32 of the pixels as batches
    are taken. Not ``as_stored``: float32 images, as PyTorch's loop keeps them (a float tensor in
    memory)."""
    if data == RANDOM:
        n = 60000 if split == "train" else 10000
        lo, hi = n * rank // size, n * (rank + 1) // size
        rng = np.random.default_rng([rank, split == "train"])
        return rng.random((hi - lo, *IMAGE), dtype=np.float32), rng.integers(0, 10, hi - lo), n
    info = inspect_data(data)
    n = info.n_train if split == "train" else info.n_test
    dtype = info.stored_dtype(np.float32) if as_stored else np.float32
    x, y = read_rows(data, split, blocks_fn(n), dtype=dtype)
    return x, y, n


def train_blocks(rank, size):
    """The blocks of training rows this rank holds, as ddptrain's sampler assigns them."""
    return lambda n: owned_blocks(n, rank, size)


def test_blocks(rank, size):
    """This rank's contiguous share of the test rows."""
    return lambda n: [(n * rank // size, n * (rank + 1) // size)]


class Plan:
    """The rows of every step of one epoch for this rank (ddptrain's sampler), cycled; full batches
    only."""

    def __init__(self, n_train, batch, rank, size, epoch=0):
        self.plan = epoch_plan(n_train, batch, rank, size, seed=0, epoch=epoch, drop_last=True)
        self.global_count = batch

    def rows(self, step):
        return self.plan.local_batch(step % self.plan.n_steps)


class EpochSteps:
    """The steps of a run's epochs, one after another (``TrainingPlan``: in memory or streamed), as
    ``Trainer._run_epoch`` takes them."""

    def __init__(self, training):
        self.training, self.epoch, self.plan = training, None, None

    def at(self, step):
        """``(epoch plan, step in it)`` of the run's step ``step``."""
        epoch, at = divmod(step, self.training.steps_per_epoch)
        if epoch != self.epoch:
            self.epoch, self.plan = epoch, self.training.epoch(epoch)
        return self.plan, at
