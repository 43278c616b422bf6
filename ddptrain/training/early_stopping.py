"""Early stopping: training ends once a test metric has not improved for ``patience`` epochs.

As Keras's and Lightning's ``EarlyStopping``: after each epoch's evaluation
the monitored value (the test loss by default, or the test accuracy) is an
improvement when it beats the best so far by more than ``min_delta``
(``loss < best - min_delta``, ``accuracy > best + min_delta``); otherwise the
epoch counts as one without improvement, and once ``patience`` of them
follow the best epoch, the run stops. The best epoch is the one whose
parameters ``best.h5`` holds. A value that is not finite never improves.

The state is a few numbers that depend on the per-epoch records only, so a
checkpoint carries it (``state_dict``) and a resumed run takes the decision
an uninterrupted one takes; a checkpoint without it (older, or written
without early stopping), or written for another metric or minimum change,
has it rebuilt from its records (``replay``), which hold every epoch's test
loss and accuracy.

With several ranks, every rank decides for itself, with no message: the
records come from the evaluation's sums, which every rank adds in the same
order from the same numbers (``evaluation.py``), so every rank holds the
same bits, takes the same decision after the same epoch, and none is left
waiting in a collective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The metrics that may be monitored (keys of a per-epoch record), and whether lower is better.
METRICS = {"test_loss": "lower", "test_accuracy": "higher"}


@dataclass
class EarlyStopping:
    """Settings (``patience``, ``min_delta``, ``metric``) and state (the rest) of early stopping."""

    patience: int               # epochs without improvement after which training stops
    min_delta: float = 0.0      # what a value must beat the best by, in the metric's units
    metric: str = "test_loss"
    best: float = None          # the best value so far (None before the first finite one)
    best_epoch: int = 0         # its epoch, counted from 1 (0: none yet)
    bad_epochs: int = 0         # epochs since best_epoch (since the start while there is none)

    @classmethod
    def of(cls, config):
        """The early stopping that ``config`` asks for (``--early-stop``), or None."""
        if not config.early_stop:
            return None
        return cls(config.early_stop, config.early_stop_min_delta, config.early_stop_metric)

    def improves(self, value):
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        if METRICS[self.metric] == "lower":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, record):
        """Take the per-epoch ``record`` (``epoch``, ``test_loss``, ``test_accuracy``); True when
        it is the best epoch so far."""
        value = record[self.metric]
        if self.improves(value):
            self.best, self.best_epoch, self.bad_epochs = value, record["epoch"], 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def due(self):
        """Whether training must stop: ``patience`` epochs without improvement."""
        return self.bad_epochs >= self.patience

    def state_dict(self):
        """What a checkpoint keeps (``state.early_stop``): the settings the state depends on, and
        the state."""
        return {"metric": self.metric, "min_delta": self.min_delta, "best": self.best,
                "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def restore(self, saved, records):
        """Continue from a checkpoint's ``saved`` state (None if it has none) and per-epoch
        ``records``. The saved state is taken where it was kept for this metric and minimum
        change; otherwise the state is rebuilt from the records. The patience is this run's: it
        is not state, and a larger one lets a stopped run train on."""
        if saved and (saved["metric"], saved["min_delta"]) == (self.metric, self.min_delta):
            self.best, self.best_epoch = saved["best"], saved["best_epoch"]
            self.bad_epochs = saved["bad_epochs"]
        else:
            self.replay(records)

    def replay(self, records):
        """The state after the per-epoch ``records``, from the start."""
        self.best, self.best_epoch, self.bad_epochs = None, 0, 0
        for record in records:
            self.update(record)

    def describe(self):
        """The rule, in words, for the start-up line."""
        return (f"early stopping: after {self._epochs(self.patience)} in which the {self._what} "
                f"has not improved on its best by more than {self.min_delta:g} (one evaluation "
                f"an epoch); best.h5 holds the best epoch by the {self._what}")

    def why_stopped(self):
        """Why training stopped (once ``due``), in words."""
        if self.best is None:
            return (f"the {self._what} has not been finite for {self._epochs(self.bad_epochs)}, "
                    f"--early-stop {self.patience}")
        return (f"the {self._what} has not improved on {self.best:.6g} (epoch {self.best_epoch}) "
                f"by more than {self.min_delta:g} for {self._epochs(self.bad_epochs)}, "
                f"--early-stop {self.patience}")

    @property
    def _what(self):
        return self.metric.replace("_", " ")

    @staticmethod
    def _epochs(n):
        return f"{n} epoch{'s' if n != 1 else ''}"
