"""The training loop: epochs of steps, an evaluation after each epoch, and callbacks for the rest.

``Trainer.fit`` is the loop and nothing else: for each step it gathers this
rank's rows of the global batch (``TrainingPlan``, ``Batches``), runs the
step (``step.TrainStep``: forward, loss normalised by the global batch,
backward, the gradient exchange, finite check, update) and adds up the
step's totals. Everything around the loop is a callback (``Callback``):
replica checks (``callbacks.py``), --debug's checks (``debug.py``),
progress, metrics and checkpoints (``run/callbacks.py``), and whatever a
user or a test registers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ddptrain.errors import NumericalError
from ddptrain.nn.dropout import BatchContext
from ddptrain.training.batches import Batches
from ddptrain.training.early_stopping import EarlyStopping
from ddptrain.training.evaluation import evaluate as evaluate_split
from ddptrain.training.step import NonFiniteStep, StepTotals


@dataclass
class EpochSums:
    """Global sums (over every rank) of the epoch so far: per-sample losses, right predictions,
    samples."""

    loss_sum: float = 0.0
    correct: int = 0
    samples: int = 0

    def add(self, totals):
        self.loss_sum += totals.loss_sum
        self.correct += totals.correct
        self.samples += totals.samples

    @property
    def loss(self):
        return self.loss_sum / self.samples

    @property
    def accuracy(self):
        return self.correct / self.samples

    def to_dict(self):
        return {"loss_sum": self.loss_sum, "correct": self.correct, "samples": self.samples}


@dataclass
class Position:
    """Where training stands: the next step to run, and the running sums of the current epoch."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0            # global: steps run since the start of the run
    sums: EpochSums = field(default_factory=EpochSums)


@dataclass(frozen=True)
class StepEnd:
    """What callbacks learn after each step."""

    totals: StepTotals       # the step's global sums, and whether any rank was asked to stop
    lr: float
    steps_in_epoch: int
    # the run's last step (--max-steps) and not its epoch's: the run ends here, with a checkpoint
    final: bool = False

    @property
    def stop(self):
        return self.totals.stop_requested


class Callback:
    """Hooks around the loop; override the ones you need.

    Every rank calls every hook at the same point of the run, so a hook may
    use collectives (``comm``) as long as it does so on every rank.
    """

    def on_fit_start(self, trainer):
        pass

    def on_epoch_start(self, trainer):
        pass

    def on_step_start(self, trainer):
        pass

    def on_step_end(self, trainer, end: StepEnd):
        pass

    def on_epoch_end(self, trainer, record, is_best):
        pass

    def on_fit_end(self, trainer):
        pass


class Trainer:
    """Runs the epochs of ``plan`` with ``train_step`` on this rank's rows (``train``, ``test``).

    ``stop`` tells whether a signal asked this rank to stop; the loop ends
    after the step in which any rank was asked, on every rank. With
    ``--early-stop`` (``plan.config.early_stop``) it also ends after the epoch
    at which the test metric has not improved for that many epochs; with
    ``--max-steps`` after that many steps in all, as a run ends after its
    last epoch (within an epoch: without its evaluation).
    """

    def __init__(self, train_step, plan, train, test, n_classes, stop, callbacks=()):
        self.train_step, self.plan, self.test, self.n_classes = train_step, plan, test, n_classes
        self.stop, self.callbacks = stop, list(callbacks)
        self.batches = Batches(train, plan.max_local_rows)
        self.position = Position()
        # what metrics.jsonl holds: a record per finished epoch, and step records
        self.records = []
        self.best_accuracy = -1.0    # the best test accuracy so far
        self.last_checkpoint = None  # the step of the newest checkpoint written (or resumed from)
        self.stopped_by = None
        self.early_stopping = EarlyStopping.of(plan.config)   # None without --early-stop
        self.stopped_early_at = None   # the epoch after which early stopping ended the run

    @property
    def metrics(self):
        """The per-epoch records so far."""
        return [record for record in self.records if record.get("kind") != "step"]

    @property
    def model(self):
        return self.train_step.model

    @property
    def optimizer(self):
        return self.train_step.optimizer

    @property
    def comm(self):
        return self.train_step.comm

    def _call(self, hook, *args):
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def fit(self):
        """Train until the last epoch ends or a stop is requested. Returns the signal's name, or
        None."""
        # An overflow is found by the step's finite check and reported in one line, not by numpy's
        # warnings.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return self._fit()

    def _fit(self):
        self._call("on_fit_start")
        for epoch in range(self.position.epoch, self.plan.epochs):
            if self.max_steps_reached:   # at the end of an epoch, or resumed there
                break
            if self.early_stop_due:
                # DDP: every rank holds the same records, so every rank stops here
                self.stopped_early_at = self.position.epoch
                break
            # A resumed epoch was partly trained before: its speed counts only what this run
            # trained.
            started, seen_before = time.perf_counter(), self.position.sums.samples
            self._call("on_epoch_start")
            if not self._run_epoch(epoch):
                if self.stopped_by:
                    return self.stopped_by
                break   # --max-steps within the epoch: the run ends normally
            evaluation = self.evaluate()
            self._end_epoch(evaluation, time.perf_counter() - started, seen_before)
        self._call("on_fit_end")
        return None

    def evaluate(self):
        """The test split's loss and accuracy with the current parameters: every rank its rows,
        summed (a collective)."""
        return evaluate_split(self.model, self.comm, self.test, self.n_classes,
                              self.plan.config.eval_batch, self.train_step.reproducible,
                              self.train_step.forward)

    def _run_epoch(self, epoch):
        """Train the steps of ``epoch`` left to run; False if the run ends within it (a stop, or
        --max-steps)."""
        plan, pos = self.plan.epoch(epoch), self.position
        for t in range(pos.step_in_epoch, plan.n_steps):
            if self.max_steps_reached:   # resumed at --max-steps within the epoch
                return False
            self._call("on_step_start")
            x, y = self.batches.take(plan, t)
            lr = self.plan.lr(pos.step)
            context = BatchContext(self.plan.seed, pos.step, plan.positions_in_batch(t))
            try:
                totals = self.train_step(x, y, int(plan.global_counts[t]), lr,
                                         self.stop.requested, context)
            except NonFiniteStep as error:
                raise NumericalError(f"{error} at step {pos.step} (epoch {epoch + 1}, learning "
                                     f"rate {lr:.4g}); training stopped before the update. "
                                     f"{self._what_is_kept()}") from None
            pos.sums.add(totals)
            pos.step, pos.step_in_epoch = pos.step + 1, t + 1
            end = StepEnd(totals, lr, plan.n_steps,
                          final=self.max_steps_reached and t + 1 < plan.n_steps)
            self._call("on_step_end", end)
            if end.stop:   # DDP: agreed by every rank, though a signal may reach only some
                self.stopped_by = self.stop.signal_name or "a signal on another rank"
                return False
            if end.final:
                return False
        return True

    @property
    def max_steps_reached(self):
        """Whether --max-steps (``plan.config.max_steps``) steps have run: the run ends here."""
        max_steps = self.plan.config.max_steps
        return max_steps is not None and self.position.step >= max_steps

    def _what_is_kept(self):
        if self.last_checkpoint is None:
            return "No checkpoint was written: start again with a lower --lr"
        return ("The checkpoints written before are kept (the newest: step "
                f"{self.last_checkpoint}); if the loss was growing, they may hold diverged "
                "parameters: resume from an earlier one or start again with a lower --lr")

    def _end_epoch(self, evaluation, seconds, seen_before):
        pos = self.position
        record = {
            "epoch": pos.epoch + 1, "step": pos.step,
            "train_loss": pos.sums.loss, "train_accuracy": pos.sums.accuracy,
            "test_loss": evaluation.loss, "test_accuracy": evaluation.accuracy,
            "seconds": seconds, "samples_per_second": (pos.sums.samples - seen_before) / seconds,
        }
        self.records.append(record)
        if self.early_stopping is not None:
            # best.h5: the best epoch by early stopping's metric, the one it counts patience from
            is_best = self.early_stopping.update(record)
        else:
            is_best = evaluation.accuracy > self.best_accuracy
        self.best_accuracy = max(self.best_accuracy, evaluation.accuracy)
        self.position = Position(epoch=pos.epoch + 1, step=pos.step)
        self._call("on_epoch_end", record, is_best)

    def restore(self, checkpoint):
        """Continue from ``checkpoint`` (already checked to fit this model and data)."""
        self.model.load_state(checkpoint.params, checkpoint.buffers)
        self.optimizer.load_state_dict(checkpoint.optimizer)
        state = checkpoint.state
        self.position = Position(epoch=state["epoch"], step_in_epoch=state["step_in_epoch"],
                                 step=state["step"], sums=EpochSums(**state["train_sums"]))
        self.records = list(checkpoint.metrics)
        self.best_accuracy = state["best_accuracy"]
        self.last_checkpoint = state["step"]
        if self.early_stopping is not None:
            self.early_stopping.restore(state.get("early_stop"), self.metrics)

    @property
    def early_stop_due(self):
        """Whether early stopping ends the run here: at the end of an epoch (or on resuming),
        ``--early-stop`` epochs without improvement."""
        return self.early_stopping is not None and self.early_stopping.due
