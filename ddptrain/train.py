"""One data-parallel training step, evaluation, and the loop over epochs.

Follow one step: ``Trainer._run_epoch`` picks this rank's rows of the global
batch (``sampler``), ``train_step`` runs forward and backward with the loss
normalised by the *global* batch size, sums the ranks' gradients with one
Allreduce (``comm``) and updates the parameters (``optim``). Lines that exist
only because training is distributed are tagged ``# DDP:``.
"""

from __future__ import annotations

import hashlib
import signal
import time
from dataclasses import dataclass, field

import numpy as np

from .checkpoint import Checkpoint
from .errors import NumericalError
from .losses import SoftmaxCrossEntropy
from .sampler import epoch_plan, steps_per_epoch
from .schedule import learning_rate


class ReplicaDivergence(RuntimeError):
    """The ranks' parameters are no longer identical."""

    all_ranks = True


@dataclass
class Split:
    """The rows of one split that this rank holds in memory."""

    x: np.ndarray   # (rows, features), the model's dtype, values in [0, 1]
    y: np.ndarray   # (rows,) int64 labels


@dataclass
class Position:
    """Where training stands: the next step to run, and the running sums of the current epoch.

    ``train_sums`` are *global* sums (over all ranks) of the per-sample loss,
    the correct predictions and the samples seen so far in this epoch.
    """

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0
    train_sums: list = field(default_factory=lambda: [0.0, 0.0, 0.0])


@dataclass
class Evaluation:
    loss: float
    accuracy: float
    confusion: np.ndarray    # confusion[true, predicted], counts over the whole test set

    @property
    def per_class_accuracy(self):
        totals = self.confusion.sum(axis=1)
        return np.diag(self.confusion) / np.maximum(totals, 1)


def count_correct(logits, labels):
    return int(np.count_nonzero(logits.argmax(axis=1) == labels))


def train_step(model, loss_fn, optimizer, comm, x, y, global_count, lr):
    """One SGD step on this rank's part ``(x, y)`` of a global batch of ``global_count`` samples.

    The loss is normalised by the global count, so this rank's gradient is its
    share of the gradient of the global mean loss; summing the shares over the
    ranks gives exactly that gradient, however unevenly the batch was split.
    Returns this rank's share of the loss and its number of correct predictions.
    """
    logits = model.forward(x)
    loss_share = loss_fn.forward(logits, y, normaliser=global_count)
    correct = count_correct(logits, y)
    model.backward(loss_fn.backward())
    comm.allreduce_(model.grads)   # DDP: sum of the shares = gradient of the global mean
    optimizer.step(model.params, model.grads, lr)
    return loss_share, correct


def gradients_are_finite(grads):
    # A NaN or Inf anywhere makes the dot product non-finite; after the
    # Allreduce every rank holds the same gradient and so reaches the same verdict.
    return bool(np.isfinite(np.dot(grads, grads)))


def evaluate(model, comm, split, n_classes, chunk=2000):
    """Loss and accuracy of the current parameters on the whole split.

    Each rank evaluates its rows; the per-sample loss sum and the confusion
    matrix are summed over the ranks, so the result is that of one process
    evaluating every row (up to the order of floating-point additions).
    """
    loss_fn = SoftmaxCrossEntropy()
    loss_sum = 0.0
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    for start in range(0, len(split.x), chunk):
        x, y = split.x[start:start + chunk], split.y[start:start + chunk]
        logits = model.forward(x)
        loss_sum += loss_fn.forward(logits, y, normaliser=1)
        confusion += np.bincount(y * n_classes + logits.argmax(axis=1),
                                 minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    totals = comm.allreduce(np.concatenate([[loss_sum], confusion.ravel()]).astype(np.float64))  # DDP
    confusion = totals[1:].round().astype(np.int64).reshape(n_classes, n_classes)
    n = confusion.sum()
    return Evaluation(loss=float(totals[0] / n), accuracy=float(np.trace(confusion) / n), confusion=confusion)


def parameter_digest(params):
    return hashlib.blake2b(params.tobytes(), digest_size=8).hexdigest()


class StopRequest:
    """Remembers that SIGTERM, SIGUSR1 or SIGINT arrived; training stops after the current step."""

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self):
        self.signal_name = None
        self._previous = {}

    def install(self):
        for name in self.SIGNALS:
            number = getattr(signal, name, None)
            if number is not None:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def uninstall(self):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number, frame):
        self.signal_name = signal.Signals(number).name

    @property
    def requested(self):
        return self.signal_name is not None


class Trainer:
    """Runs the epochs: training steps, evaluation, metrics and checkpoints.

    ``train`` and ``test`` hold only this rank's rows. ``rank0`` does all
    file writing and printing (see ``rank0.py``).
    """

    def __init__(self, config, comm, model, optimizer, train, test, n_train, n_classes, rank0,
                 stop=None, fault_hook=None):
        self.config, self.comm, self.model, self.optimizer = config, comm, model, optimizer
        self.train, self.test, self.n_train, self.n_classes = train, test, n_train, n_classes
        self.rank0 = rank0
        self.stop = stop or StopRequest()
        self.fault_hook = fault_hook          # tests: called with the step number before each step
        self.loss_fn = SoftmaxCrossEntropy()
        self.steps_per_epoch = steps_per_epoch(n_train, config.batch_size, config.drop_last)
        self.position = Position()
        self.metrics = []
        self.best_accuracy = -1.0
        # This rank's largest share of a global batch: ceil(B / P).
        max_rows = -(-config.batch_size // comm.size)
        self._x_batch = np.empty((max_rows, train.x.shape[1]), dtype=train.x.dtype)
        self.stopped_by = None

    # -- the loop --------------------------------------------------------------------------

    def fit(self):
        """Train until the last epoch ends or a stop is requested. Returns the signal name or None."""
        for epoch in range(self.position.epoch, self.config.epochs):
            started = time.perf_counter()
            if not self._run_epoch(epoch):
                return self.stopped_by
            evaluation = evaluate(self.model, self.comm, self.test, self.n_classes, self.config.eval_batch)
            self._end_epoch(epoch, evaluation, time.perf_counter() - started)
        self.check_replicas()
        return None

    def _run_epoch(self, epoch):
        config, comm, pos = self.config, self.comm, self.position
        plan = epoch_plan(self.n_train, config.batch_size, comm.rank, comm.size, config.seed, epoch,
                          config.virtual_shards, config.drop_last)
        sums = np.array(pos.train_sums if comm.rank == 0 else [0.0, 0.0, 0.0])  # DDP: global sums live on rank 0
        window_start, window_samples = time.perf_counter(), 0
        for t in range(pos.step_in_epoch, plan.n_steps):
            if self.fault_hook is not None:
                self.fault_hook(pos.step)
            rows = plan.local_batch(t)
            x = np.take(self.train.x, rows, axis=0, out=self._x_batch[:len(rows)])
            y = self.train.y[rows]
            global_count = int(plan.global_counts[t])
            lr = learning_rate(config, pos.step, self.steps_per_epoch)
            loss_share, correct = train_step(self.model, self.loss_fn, self.optimizer, comm, x, y,
                                             global_count, lr)
            if not gradients_are_finite(self.model.grads):
                raise NumericalError(f"NaN or Inf in the gradients at step {pos.step} (epoch {epoch + 1}, "
                                     f"learning rate {lr:.4g}); the last checkpoint is kept")
            sums += (loss_share * global_count, correct, len(rows))
            window_samples += global_count
            pos.step += 1
            pos.step_in_epoch = t + 1
            if pos.step % config.check_every == 0:
                self.check_replicas()
            if pos.step % config.log_every == 0 or t + 1 == plan.n_steps:
                window_start, window_samples = self._log_progress(epoch, plan.n_steps, sums, lr,
                                                                  window_start, window_samples)
            stop = comm.any(self.stop.requested)   # DDP: a signal may reach only some ranks
            if stop or (config.checkpoint_every and pos.step % config.checkpoint_every == 0
                        and t + 1 < plan.n_steps):
                pos.train_sums = comm.allreduce(sums).tolist()   # DDP
                self.save_checkpoint()
            if stop:
                self.stopped_by = self.stop.signal_name or "a signal on another rank"
                return False
        pos.train_sums = comm.allreduce(sums).tolist()   # DDP: exact global sums
        return True

    def _log_progress(self, epoch, n_steps, sums, lr, window_start, window_samples):
        loss_sum, correct, seen = self.comm.allreduce(sums)   # DDP: global running sums
        now = time.perf_counter()
        rate = window_samples / max(now - window_start, 1e-9)
        self.rank0.print(f"epoch {epoch + 1}/{self.config.epochs}  step {self.position.step_in_epoch}/{n_steps}  "
                         f"loss {loss_sum / seen:.4f}  acc {100 * correct / seen:.2f}%  lr {lr:.4g}  "
                         f"{rate:,.0f} samples/s")
        return now, 0

    def _end_epoch(self, epoch, evaluation, seconds):
        loss_sum, correct, seen = self.position.train_sums
        record = {
            "epoch": epoch + 1, "step": self.position.step,
            "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
            "test_loss": evaluation.loss, "test_accuracy": evaluation.accuracy,
            "seconds": seconds, "samples_per_second": seen / seconds,
        }
        self.metrics.append(record)
        self.rank0.print(f"epoch {epoch + 1}/{self.config.epochs} done: train loss {record['train_loss']:.4f}  "
                         f"test loss {evaluation.loss:.4f}  test accuracy {100 * evaluation.accuracy:.2f}%  "
                         f"({seconds:.1f} s, {record['samples_per_second']:,.0f} samples/s)", always=True)
        self.rank0.append_metrics(record)
        self.position = Position(epoch=epoch + 1, step=self.position.step)
        is_best = evaluation.accuracy > self.best_accuracy
        self.best_accuracy = max(self.best_accuracy, evaluation.accuracy)
        self.save_checkpoint(is_best=is_best)

    # -- replicas and checkpoints ----------------------------------------------------------

    def check_replicas(self):
        """Stop with a clear error if the ranks' parameters are not bitwise identical."""
        digests = self.comm.allgather(parameter_digest(self.model.params))   # DDP
        if len(set(digests)) > 1:
            raise ReplicaDivergence(f"parameters differ across ranks at step {self.position.step}: "
                                    + ", ".join(f"rank {r} {d}" for r, d in enumerate(digests)))

    def make_checkpoint(self):
        pos = self.position
        optimizer_state = self.optimizer.state_dict()
        velocity = optimizer_state.pop("velocity")
        return Checkpoint(
            params={name: array.copy() for name, array in self.model.named_params()},
            velocity=velocity, optimizer=optimizer_state,
            state={"epoch": pos.epoch, "step_in_epoch": pos.step_in_epoch, "step": pos.step,
                   "train_sums": [float(s) for s in pos.train_sums], "n_train": self.n_train,
                   "best_accuracy": self.best_accuracy},
            config=self.config.to_dict(), metrics=list(self.metrics),
            model=self.model.spec, dtype=str(self.model.dtype))

    def save_checkpoint(self, is_best=False):
        return self.rank0.save_checkpoint(self.make_checkpoint, self.position.step, self.config.keep, is_best)

    def restore(self, checkpoint):
        """Continue from ``checkpoint`` (already checked to fit this model and data)."""
        for name, array in self.model.named_params():
            array[...] = checkpoint.params[name]
        self.optimizer.load_state_dict({**checkpoint.optimizer, "velocity": checkpoint.velocity})
        state = checkpoint.state
        self.position = Position(epoch=state["epoch"], step_in_epoch=state["step_in_epoch"],
                                 step=state["step"], train_sums=list(state["train_sums"]))
        self.metrics = list(checkpoint.metrics)
        self.best_accuracy = state.get("best_accuracy", -1.0)
