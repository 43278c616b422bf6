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
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .checkpoint import Checkpoint
from .debug import FiniteChecker, check_gradient
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


def compute_gradient(model, loss_fn, comm, x, y, global_count):
    """Fill ``model.grads`` with the gradient of the mean loss over the global batch.

    ``(x, y)`` is this rank's part of a global batch of ``global_count``
    samples. The loss is normalised by the global count, so this rank's
    gradient is its share of the gradient of the global mean loss; summing the
    shares over the ranks gives exactly that gradient, however unevenly the
    batch was split. Returns this rank's share of the loss and its number of
    correct predictions.
    """
    logits = model.forward(x)
    loss_share = loss_fn.forward(logits, y, normaliser=global_count)
    correct = count_correct(logits, y)
    model.backward(loss_fn.backward())
    comm.allreduce_(model.grads)   # DDP: sum of the shares = gradient of the global mean
    return loss_share, correct


def train_step(model, loss_fn, optimizer, comm, x, y, global_count, lr):
    """One SGD step: the global-batch gradient (``compute_gradient``), then the update."""
    loss_share, correct = compute_gradient(model, loss_fn, comm, x, y, global_count)
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
        if threading.current_thread() is not threading.main_thread():
            return self   # a simulated rank (a thread): signals reach rank 0, in the main thread
        for name in self.SIGNALS:
            number = getattr(signal, name, None)
            if number is not None:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def uninstall(self):
        """Restore the previous handlers, unless a stop was requested.

        After a stop the process is on its way out: the signals are ignored
        from then on, so that a second one during the shutdown (a second
        Ctrl-C, a repeated SIGTERM, also while MPI finalises after Python has
        reset its own handlers) cannot kill a rank that already checkpointed.
        """
        for number, handler in self._previous.items():
            if self.requested:
                handler = signal.SIG_IGN
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
        self.fault_hook = fault_hook   # tests: called with the step number before each step (faults.py)
        self.loss_fn = SoftmaxCrossEntropy()
        self.steps_per_epoch = steps_per_epoch(n_train, config.batch_size, config.drop_last)
        self.position = Position()
        self.metrics = []
        self.best_accuracy = -1.0
        # This rank's largest share of a global batch: ceil(B / P).
        max_rows = -(-config.batch_size // comm.size)
        self._x_batch = np.empty((max_rows, train.x.shape[1]), dtype=train.x.dtype)
        self.stopped_by = None
        # --debug: NaN/Inf checks after every layer, and a finite-difference check at the first step.
        self.finite_checker = FiniteChecker() if config.debug else None
        model.observer = self.finite_checker
        self.gradient_checked = False

    # -- the loop --------------------------------------------------------------------------

    def fit(self):
        """Train until the last epoch ends or a stop is requested. Returns the signal name or None."""
        for epoch in range(self.position.epoch, self.config.epochs):
            # A resumed epoch was partly trained before: its speed counts only what this run trained.
            started, seen_before = time.perf_counter(), self.position.train_sums[2]
            if not self._run_epoch(epoch):
                return self.stopped_by
            evaluation = evaluate(self.model, self.comm, self.test, self.n_classes, self.config.eval_batch)
            self._end_epoch(epoch, evaluation, time.perf_counter() - started, seen_before)
        self.check_replicas()
        return None

    def _run_epoch(self, epoch):
        config, comm, pos = self.config, self.comm, self.position
        plan = epoch_plan(self.n_train, config.batch_size, comm.rank, comm.size, config.seed, epoch,
                          config.virtual_shards, config.drop_last)
        # Global sums of the epoch so far, the same on every rank: added up step by step from
        # each step's global totals, so a resumed epoch adds exactly what an uninterrupted one does.
        sums = np.array(pos.train_sums, dtype=np.float64)
        totals = np.zeros(4)   # this step's loss sum, correct predictions, samples, ranks signalled
        loop_started, steps_done, samples_done = time.perf_counter(), 0, 0
        for t in range(pos.step_in_epoch, plan.n_steps):
            if self.fault_hook is not None:
                self.fault_hook(pos.step)
            rows = plan.local_batch(t)
            # mode="clip": with the default mode="raise", np.take fills a temporary and then
            # copies it into `out` (to stay safe on a bad index); the rows are valid by construction.
            x = np.take(self.train.x, rows, axis=0, out=self._x_batch[:len(rows)], mode="clip")
            y = self.train.y[rows]
            global_count = int(plan.global_counts[t])
            lr = learning_rate(config, pos.step, self.steps_per_epoch)
            if self.finite_checker is not None:
                self.finite_checker.step = pos.step
            loss_share, correct = compute_gradient(self.model, self.loss_fn, comm, x, y, global_count)
            if config.debug and not self.gradient_checked:
                self._check_gradient(x, y, global_count)
            totals[:] = (loss_share * global_count, correct, len(rows), self.stop.requested)
            comm.allreduce_(totals)   # DDP: global totals, and whether a signal reached any rank
            # Checked before the update, so the parameters in memory stay the last good ones.
            if not (np.isfinite(totals[0]) and gradients_are_finite(self.model.grads)):
                raise NumericalError(f"NaN or Inf in the loss or gradients at step {pos.step} "
                                     f"(epoch {epoch + 1}, learning rate {lr:.4g}); training stopped, "
                                     f"the last checkpoint is kept")
            self.optimizer.step(self.model.params, self.model.grads, lr)
            sums += totals[:3]
            steps_done, samples_done = steps_done + 1, samples_done + global_count
            pos.step += 1
            pos.step_in_epoch = t + 1
            if pos.step % config.check_every == 0:
                self.check_replicas()
            self._report_progress(epoch, plan.n_steps, sums, lr, time.perf_counter() - loop_started,
                                  steps_done, samples_done)
            if config.metrics_every and pos.step % config.metrics_every == 0:
                self.rank0.append_metrics({"kind": "step", "epoch": epoch + 1, "step": pos.step, "lr": lr,
                                           "train_loss": sums[0] / sums[2], "train_accuracy": sums[1] / sums[2]})
            stop = totals[3] > 0   # DDP: agreed by every rank, though a signal may reach only some
            if stop or (config.checkpoint_every and pos.step % config.checkpoint_every == 0
                        and t + 1 < plan.n_steps):
                pos.train_sums = sums.tolist()
                self.save_checkpoint()
            if stop:
                self.stopped_by = self.stop.signal_name or "a signal on another rank"
                return False
        pos.train_sums = sums.tolist()
        return True

    def _report_progress(self, epoch, n_steps, sums, lr, elapsed, steps_done, samples_done):
        loss_sum, correct, seen = sums   # global sums over the epoch so far
        self.rank0.progress(epoch=epoch + 1, epochs=self.config.epochs, step_in_epoch=self.position.step_in_epoch,
                            steps_in_epoch=n_steps, global_step=self.position.step,
                            total_steps=self.config.epochs * self.steps_per_epoch, loss=loss_sum / seen,
                            accuracy=correct / seen, lr=lr, samples_per_second=samples_done / max(elapsed, 1e-9),
                            seconds_per_step=elapsed / steps_done)

    def _end_epoch(self, epoch, evaluation, seconds, seen_before=0):
        loss_sum, correct, seen = self.position.train_sums
        record = {
            "epoch": epoch + 1, "step": self.position.step,
            "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
            "test_loss": evaluation.loss, "test_accuracy": evaluation.accuracy,
            "seconds": seconds, "samples_per_second": (seen - seen_before) / seconds,
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

    def _check_gradient(self, x, y, global_count):
        checked = check_gradient(self.model, self.loss_fn, self.comm, x, y, global_count, self.position.step,
                                 seed=self.config.seed)
        self.gradient_checked = True
        worst = max(abs(b - n) / max(abs(b), abs(n), 1e-9) for _, _, b, n in checked)
        self.rank0.print(f"debug: at step {self.position.step} the allreduced gradient agrees with finite "
                         f"differences of the global-batch loss on {len(checked)} coordinates "
                         f"(worst relative error {worst:.1e})", always=True)

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
                   "best_accuracy": self.best_accuracy, "world_size": self.comm.size},
            config=self.config.to_dict(), metrics=list(self.metrics),
            model=self.model.spec, dtype=str(self.model.dtype))

    def save_checkpoint(self, is_best=False):
        return self.rank0.save_checkpoint(self.make_checkpoint, self.position.step, self.config.keep, is_best)

    def restore(self, checkpoint):
        """Continue from ``checkpoint`` (already checked to fit this model and data)."""
        self.model.load_params(checkpoint.params)
        self.optimizer.load_state_dict({**checkpoint.optimizer, "velocity": checkpoint.velocity})
        state = checkpoint.state
        self.position = Position(epoch=state["epoch"], step_in_epoch=state["step_in_epoch"],
                                 step=state["step"], train_sums=list(state["train_sums"]))
        self.metrics = list(checkpoint.metrics)
        self.best_accuracy = state.get("best_accuracy", -1.0)
