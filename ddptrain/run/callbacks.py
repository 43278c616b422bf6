"""The run's callbacks around the loop: progress on rank 0's console, ``metrics.jsonl``,
checkpoints.

Each is small and does one thing. What only rank 0 does (printing, writing
files) goes through ``rank0``.
"""

from __future__ import annotations

import time

from ddptrain.optim.optimizers import optimizer_name
from ddptrain.run.checkpoint import Checkpoint
from ddptrain.training.trainer import Callback


class ProgressReport(Callback):
    """A progress bar or line after steps (see ``progress.py``), and one line per epoch."""

    def __init__(self, console):
        self.console = console
        self._started, self._steps, self._samples = 0.0, 0, 0

    def on_epoch_start(self, trainer):
        self._started, self._steps, self._samples = time.perf_counter(), 0, 0

    def on_step_end(self, trainer, end):
        pos = trainer.position
        self._steps, self._samples = self._steps + 1, self._samples + end.totals.samples
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        self.console.progress(epoch=pos.epoch + 1, epochs=trainer.plan.epochs,
                              step_in_epoch=pos.step_in_epoch, steps_in_epoch=end.steps_in_epoch,
                              global_step=pos.step, total_steps=trainer.plan.total_steps,
                              loss=pos.sums.loss, accuracy=pos.sums.accuracy, lr=end.lr,
                              samples_per_second=self._samples / elapsed,
                              seconds_per_step=elapsed / self._steps)

    def on_epoch_end(self, trainer, record, is_best):
        self.console.print(f"epoch {record['epoch']}/{trainer.plan.epochs} done: train loss "
                           f"{record['train_loss']:.4f}  test loss {record['test_loss']:.4f}  test "
                           f"accuracy {100 * record['test_accuracy']:.2f}%  "
                           f"({record['seconds']:.1f} s, {record['samples_per_second']:,.0f} "
                           "samples/s)", always=True)


class MetricsLog(Callback):
    """``metrics.jsonl``: a record per epoch, and every ``every`` steps (0: never) a step record."""

    def __init__(self, run_folder, every=0):
        self.run_folder, self.every = run_folder, every

    def on_step_end(self, trainer, end):
        pos = trainer.position
        if self.every and pos.step % self.every == 0:
            record = {"kind": "step", "epoch": pos.epoch + 1, "step": pos.step, "lr": end.lr,
                      "train_loss": pos.sums.loss, "train_accuracy": pos.sums.accuracy,
                      "grad_norm": end.totals.grad_norm}
            # in the checkpoints too, so a resumed run rewrites it once
            trainer.records.append(record)
            self.run_folder.append_metrics(record)

    def on_epoch_end(self, trainer, record, is_best):
        self.run_folder.append_metrics(record)


def make_checkpoint(trainer, optimizer_state, data_sha256=None):
    """Everything a run needs to continue exactly where ``trainer`` stands (views: encode it at
    once). ``optimizer_state``: the optimiser's whole ``state_dict()``, taken on every rank
    beforehand (a collective when the optimiser is sharded; this function runs on rank 0 only).
    ``data_sha256``: the data file's ``content_sha256`` (None: it has none), so that a resumed run
    can tell another data file of as many rows."""
    model, pos, plan = trainer.model, trainer.position, trainer.plan
    early_stop = ({"early_stop": trainer.early_stopping.state_dict()}
                  if trainer.early_stopping is not None else {})
    # the streamed order of the rows (absent: each rank's shard in memory, the sampler's order)
    data_order = {"data_order": plan.order.to_dict()} if plan.order is not None else {}
    return Checkpoint(
        params=dict(model.named_params()), buffers=dict(model.named_buffers()),
        optimizer={"type": optimizer_name(trainer.optimizer), **optimizer_state},
        state={"epoch": pos.epoch, "step_in_epoch": pos.step_in_epoch, "step": pos.step,
               "train_sums": pos.sums.to_dict(), "n_train": plan.n_train,
               "best_accuracy": trainer.best_accuracy, "world_size": trainer.comm.size,
               "data_sha256": data_sha256, **early_stop, **data_order},
        config=plan.config.to_dict(), metrics=list(trainer.records), model=model.describe(),
        model_summary=model.summary(), dtype=str(model.dtype))


class Checkpointing(Callback):
    """A checkpoint at the end of every epoch (and ``best.h5`` after the best one so far), every
    ``every`` steps within an epoch (0: never), and after the step in which a stop was requested."""

    def __init__(self, run_folder, every=0, keep=3, data_sha256=None, warn=print):
        self.run_folder, self.every, self.keep, self.warn = run_folder, every, keep, warn
        self.data_sha256 = data_sha256

    def save(self, trainer, is_best=False):
        # on every rank: sharded, it gathers the slices
        optimizer_state = trainer.optimizer.state_dict()
        path = self.run_folder.save_checkpoint(lambda: make_checkpoint(trainer, optimizer_state,
                                                                       self.data_sha256),
                                               trainer.position.step, self.keep, is_best,
                                               self.warn)
        trainer.last_checkpoint = trainer.position.step
        return path

    def on_step_end(self, trainer, end):
        pos = trainer.position
        periodic = (self.every and pos.step % self.every == 0
                    and pos.step_in_epoch < end.steps_in_epoch)
        if end.stop or periodic:
            self.save(trainer)

    def on_epoch_end(self, trainer, record, is_best):
        self.save(trainer, is_best)
