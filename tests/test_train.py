"""The step and the loop: one named TrainStep, callbacks around the loop, state that survives a
checkpoint."""

import numpy as np
import pytest

from ddptrain.data import format as data
from ddptrain.distributed.comm import SerialComm
from ddptrain.distributed.exchange import Allreduce
from ddptrain.nn.layers import Flatten, Linear
from ddptrain.nn.losses import SoftmaxCrossEntropy
from ddptrain.nn.model import Sequential
from ddptrain.optim.optimizers import SGD
from ddptrain.run import checkpoint as ckpt_io
from ddptrain.run.callbacks import Checkpointing
from ddptrain.run.config import Config
from ddptrain.run.rank0 import RunFolder
from ddptrain.run.runner import run_training
from ddptrain.run.signals import StopRequest
from ddptrain.training.batches import Batches, Split
from ddptrain.training.evaluation import evaluate
from ddptrain.training.plan import TrainingPlan
from ddptrain.training.step import NonFiniteStep, TrainStep
from ddptrain.training.trainer import Callback, Trainer
from helpers import Tally, model_spec


def small_step(momentum=0.9):
    model = Sequential.from_spec("4-3-2", dtype=np.float64, seed=1)
    return TrainStep(model, SoftmaxCrossEntropy(), SGD(momentum=momentum), Allreduce(SerialComm()))


# ---------------------------------------------------------------- the step


def test_a_step_returns_the_global_totals_and_applies_the_update():
    step = small_step()
    x, y = np.random.default_rng(0).standard_normal((5, 4)), np.array([0, 1, 1, 0, 1])
    before = step.model.params.copy()
    expected_loss = SoftmaxCrossEntropy().forward(step.model.forward(x), y, normaliser=1)
    totals = step(x, y, global_count=5, lr=0.1)
    assert (totals.samples, totals.stop_requested) == (5, False)
    assert totals.loss_sum == pytest.approx(expected_loss, rel=1e-12) and 0 <= totals.correct <= 5
    assert not np.array_equal(step.model.params, before)
    assert step.optimizer.steps == 1


def test_a_step_with_a_nan_stops_before_the_update():
    step = small_step()
    x, y = np.ones((2, 4)), np.array([0, 1])
    x[1, 2] = np.nan
    before = step.model.params.copy()
    with np.errstate(invalid="ignore"), pytest.raises(NonFiniteStep,
                                                      match="NaN or Inf in the loss or gradients"):
        step(x, y, global_count=2, lr=0.1)
    np.testing.assert_array_equal(step.model.params, before)   # the last good parameters
    assert step.optimizer.steps == 0


def test_a_step_runs_its_after_reduce_hooks_on_the_reduced_gradient_before_the_update():
    step = small_step()
    seen = []
    step.after_reduce.append(
        lambda x, y, n, context: seen.append((step.model.grads.copy(), step.model.params.copy(),
                                              n)))
    before = step.model.params.copy()
    step(np.ones((3, 4)), np.array([0, 1, 0]), global_count=3, lr=0.1)
    [(grads, params, count)] = seen
    assert grads.any() and np.array_equal(params, before) and count == 3


# ---------------------------------------------------------------- the loop and its callbacks


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_fit_start(self, trainer):
        self.calls.append("fit_start")

    def on_epoch_start(self, trainer):
        self.calls.append(f"epoch_start {trainer.position.epoch}")

    def on_step_start(self, trainer):
        self.calls.append(f"step_start {trainer.position.step}")

    def on_step_end(self, trainer, end):
        self.calls.append(f"step_end {trainer.position.step} {end.totals.samples}")

    def on_epoch_end(self, trainer, record, is_best):
        saved = ckpt_io.step_path(trainer_folder(trainer), record["step"]).exists()
        self.calls.append(f"epoch_end {record['epoch']} saved={saved}")

    def on_fit_end(self, trainer):
        self.calls.append("fit_end")


def trainer_folder(trainer):
    return next(
        c.run_folder.checkpoint_dir for c in trainer.callbacks if isinstance(c, Checkpointing))


def test_callbacks_see_every_hook_in_order_after_ddptrain_s_own(small_data, tmp_path):
    recorder = Recorder()
    config = Config(data=small_data, model=model_spec(), batch_size=100, epochs=2, threads=1,
                    run_dir=str(tmp_path / "run")).validated()
    assert run_training(config, SerialComm(), quiet=True, callbacks=[recorder]).exit_status == 0

    def epoch(e):   # 240 rows in global batches of 100: 3 steps an epoch, the last of 40 samples
        return [f"epoch_start {e}", f"step_start {3 * e}", f"step_end {3 * e + 1} 100",
                f"step_start {3 * e + 1}", f"step_end {3 * e + 2} 100", f"step_start {3 * e + 2}",
                f"step_end {3 * e + 3} 40", f"epoch_end {e + 1} saved=True"]
    assert recorder.calls == ["fit_start", *epoch(0), *epoch(1), "fit_end"]


def test_buffers_are_checkpointed_evaluation_leaves_them_alone_and_restore_brings_them_back(
        small_data, tmp_path):
    config = Config(batch_size=16, epochs=2)
    info = data.inspect(small_data)
    train = Split(*data.read_rows(small_data, "train", [(0, info.n_train)], dtype=np.float64))
    test = Split(*data.read_rows(small_data, "test", [(0, info.n_test)], dtype=np.float64))

    def trainer(callbacks=()):
        model = Sequential([Tally(), Flatten(), Linear(64, 10)], dtype=np.float64)
        return Trainer(TrainStep(model, SoftmaxCrossEntropy(), SGD(momentum=0.9),
                                 Allreduce(SerialComm())),
                       TrainingPlan(config, info.n_train, 0, 1), train, test, info.n_classes,
                       StopRequest(), callbacks)

    folder = RunFolder(SerialComm(), tmp_path / "run")
    folder.take()
    folder.write_config(config.to_dict())
    first = trainer([Checkpointing(folder)])
    assert first.fit() is None
    saved = ckpt_io.load(ckpt_io.step_path(folder.checkpoint_dir, 15))
    # the 240 training rows, not the 60 test rows
    assert saved.buffers == {"tally1.rows": np.array([240.0])}
    assert first.model.buffers[0] == 480                          # after the second epoch

    again = trainer()
    again.restore(saved)
    assert again.model.buffers[0] == 240 and again.position.epoch == 1 and again.position.step == 15
    for name, array in again.model.named_params():
        np.testing.assert_array_equal(array, saved.params[name])
    assert np.array_equal(again.optimizer.state_dict()["velocity"], saved.optimizer["velocity"])


# ---------------------------------------------------------------- the rows a rank keeps


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_shard_kept_as_uint8_pixels_gives_the_batches_of_one_kept_as_floats(small_data, dtype):
    """A rank keeps a file's pixels (a quarter of float32's memory) and scales the rows it gathers:
    the same operation as scaling at load, so the same bits, in training batches and in
    evaluation."""
    info = data.inspect(small_data)
    pixels, labels = data.read_rows(small_data, "train", [(0, info.n_train)], dtype=np.uint8)
    floats, _ = data.read_rows(small_data, "train", [(0, info.n_train)], dtype=dtype)
    assert pixels.dtype == np.uint8 and pixels.nbytes * np.dtype(dtype).itemsize == floats.nbytes
    kept, scaled = Batches(Split(pixels, labels, dtype), 40), Batches(Split(floats, labels), 40)
    rows = np.random.default_rng(0).permutation(info.n_train)[:37]
    (x, y), (x_floats, y_floats) = kept.gather(rows), scaled.gather(rows)
    assert x.dtype == dtype
    np.testing.assert_array_equal(x, x_floats)
    np.testing.assert_array_equal(y, y_floats)

    model = Sequential.from_spec(model_spec(), dtype=dtype, seed=0)
    on_pixels = evaluate(model, SerialComm(), Split(model.as_input(pixels), labels, dtype),
                         info.n_classes, chunk=50)
    on_floats = evaluate(model, SerialComm(), Split(model.as_input(floats), labels), info.n_classes,
                         chunk=50)
    assert (on_pixels.loss, on_pixels.accuracy) == (on_floats.loss, on_floats.accuracy)


def test_a_split_of_pixels_must_be_told_the_model_s_dtype():
    with pytest.raises(ValueError, match="needs the model's floating dtype"):
        Split(np.zeros((2, 4), np.uint8), np.zeros(2, np.int64))


def test_the_memory_estimate_counts_a_file_s_pixels_as_bytes_and_float_arrays_as_floats(small_data):
    from ddptrain.data.arrays import Arrays
    from ddptrain.run.limits import estimate_rank_bytes
    layers = Sequential.from_spec(model_spec(), dtype=np.float32).layers
    info = data.inspect(small_data)
    rows = info.n_train + info.n_test
    config = Config(dtype="float32")
    assert estimate_rank_bytes(layers, config, info, 1)["this rank's data"] == rows * (64 + 8)
    sizes = (info.n_train, info.n_train, info.n_test, info.n_test)   # images, labels of each split
    floats = Arrays(*(np.zeros((n, 8, 8), np.float32) if k % 2 == 0 else np.zeros(n, np.int64)
                      for k, n in enumerate(sizes)), n_classes=10).inspect()
    assert estimate_rank_bytes(layers, config, floats, 1)["this rank's data"] == rows * (64 * 4 + 8)
