"""--overlap-allreduce: the flat gradient in buckets, each reduced as soon as backward has filled
it."""

import numpy as np
import pytest

from ddptrain.distributed.comm import SerialComm
from ddptrain.distributed.exchange import Allreduce, BucketedAllreduce
from ddptrain.distributed.overlap import make_buckets
from ddptrain.errors import UserError
from ddptrain.nn.losses import SoftmaxCrossEntropy
from ddptrain.nn.model import Sequential
from ddptrain.optim.optimizers import SGD
from ddptrain.run.config import Config
from ddptrain.training.step import TrainStep


def test_buckets_are_tails_of_the_flat_gradient_in_the_order_backward_fills_them():
    model = Sequential.from_spec("784-512-256-10")   # float32: 401,920 + 131,328 + 2,570 values
    buckets = make_buckets(model, bucket_bytes=2 ** 18)
    sizes = [bucket.stop - bucket.start for bucket in buckets]
    # the last two layers together reach 256 KiB, then the first
    assert sizes == [131_328 + 2_570, 401_920]
    # flatten1, linear1, relu1, linear2, ...
    assert [bucket.first_layer for bucket in buckets] == [3, 1]
    assert buckets[0].stop == model.grads.size and buckets[-1].start == 0
    # every value in exactly one bucket
    assert all(a.start == b.stop for a, b in zip(buckets, buckets[1:]))


def test_one_bucket_when_the_model_is_smaller_than_a_bucket():
    model = Sequential.from_spec("20-8-5")
    buckets = make_buckets(model, 2 ** 20)
    assert [(b.first_layer, b.start, b.stop) for b in buckets] == [(1, 0, model.grads.size)]


class Recorder(SerialComm):
    """One process, noting which slices of which array it was asked to reduce, and when."""

    def __init__(self, log):
        self.log = log

    def iallreduce_(self, array):
        self.log.append(("reduce", array.size))
        return super().iallreduce_(array)


def test_each_bucket_starts_as_soon_as_its_last_layer_is_done_and_the_step_equals_one_allreduce():
    x = np.random.default_rng(0).standard_normal((16, 784))
    y = np.arange(16) % 10
    plain, overlapped = (Sequential.from_spec("784-512-256-10", dtype=np.float64,
                                              seed=2) for _ in range(2))
    log = []
    overlapped.observer = lambda kind, layer, out: log.append((kind, layer.name))
    TrainStep(plain, SoftmaxCrossEntropy(), SGD(momentum=0.9),
              Allreduce(SerialComm()))(x, y, 16, lr=0.1)
    step = TrainStep(overlapped, SoftmaxCrossEntropy(), SGD(momentum=0.9),
                     BucketedAllreduce(Recorder(log), overlapped, bucket_bytes=2 ** 18))
    step(x, y, 16, lr=0.1)
    backward = [entry for entry in log if entry[0] != "forward"]
    assert backward == [("backward", "linear3"), ("backward", "relu2"), ("backward", "linear2"),
                        ("reduce", 131_328 + 2_570),   # while linear1's gradient is still to come
                        ("backward", "relu1"), ("backward", "linear1"), ("reduce", 401_920)]
    np.testing.assert_array_equal(overlapped.params, plain.params)
    assert overlapped.gradient_ready is None   # only the step's own backward starts buckets


@pytest.mark.parametrize("options, problem", [
    ({"accumulate": 2}, "--overlap-allreduce with --accumulate 2"),
    ({"shard_optimizer": True}, "--overlap-allreduce with --shard-optimizer"),
    ({"bucket_mb": 0.0}, "--bucket-mb must be positive, got 0.0"),
])
def test_overlap_refuses_what_it_cannot_overlap(options, problem):
    with pytest.raises(UserError, match=problem):
        Config(overlap_allreduce=True, **options).validated()
