"""The run's callbacks around the loop: progress on rank 0's console, ``metrics.jsonl``, its
records as TensorBoard events, checkpoints.

Each is small and does one thing. What only rank 0 does (printing, writing
files) goes through ``rank0``.
"""

from __future__ import annotations

import hashlib
import json
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
    """``metrics.jsonl``: a record per epoch, and every ``every`` steps (0: never) a step record.

    A step record's ``samples_per_second`` is that of the steps since the one before it (or since
    the epoch, or this run, started): the evaluation between epochs is not in it."""

    def __init__(self, run_folder, every=0):
        self.run_folder, self.every = run_folder, every
        self._since, self._samples = 0.0, 0

    def on_epoch_start(self, trainer):
        self._since, self._samples = time.perf_counter(), 0

    def on_step_end(self, trainer, end):
        pos = trainer.position
        self._samples += end.totals.samples
        if self.every and pos.step % self.every == 0:
            now = time.perf_counter()
            record = {"kind": "step", "epoch": pos.epoch + 1, "step": pos.step, "lr": end.lr,
                      "train_loss": pos.sums.loss, "train_accuracy": pos.sums.accuracy,
                      "grad_norm": end.totals.grad_norm,
                      "samples_per_second": self._samples / max(now - self._since, 1e-9)}
            self._since, self._samples = now, 0
            # in the checkpoints too, so a resumed run rewrites it once
            trainer.records.append(record)
            self.run_folder.append_metrics(record)

    def on_epoch_end(self, trainer, record, is_best):
        self.run_folder.append_metrics(record)


def state_sha256(model):
    """The sha256 of the model's parameters then its buffers, as the bytes of its flat arrays (a
    fixed order: the layers', and each layer's names')."""
    digest = hashlib.sha256(model.params.tobytes())
    digest.update(model.buffers.tobytes())
    return digest.hexdigest()


class HashRecord(Callback):
    """--record-hashes: after every step, a line of ``hashes.jsonl``: the step, the sha256 of the
    parameters and buffers (``state_sha256``) and the step's mean loss. ``ddptrain verify`` compares
    runs on different numbers of ranks by them.

    The optimiser's state is not in the hash: sharded (--shard-optimizer) it lies in slices on
    every rank, and a difference in it shows in the next step's parameters anyway."""

    def __init__(self, run_folder):
        self.run_folder = run_folder

    def on_fit_start(self, trainer):
        self.run_folder.rewrite_hashes(trainer.position.step)   # a resumed run: up to its step

    def on_step_end(self, trainer, end):
        totals = end.totals
        # every rank holds the same parameters: rank 0 hashes them (and writes; a collective)
        record = ({"step": trainer.position.step, "sha256": state_sha256(trainer.model),
                   "loss": totals.loss_sum / totals.samples} if trainer.comm.rank == 0 else None)
        self.run_folder.append_hash(record)


class TensorBoardLog(Callback):
    """--tensorboard: every record of ``metrics.jsonl`` as TensorBoard scalars, the moment it is
    recorded; a histogram of each parameter after each epoch; the configuration as text. Rank 0
    writes them (``rank0.EventFile``) in ``RUN_DIR/tensorboard``; the other ranks do nothing.

    A record of kind ``step`` or ``epoch`` (``metrics.jsonl``'s records without a kind are epochs')
    becomes a scalar ``<kind>/<key>`` at the record's ``step`` for each of its numbers but ``epoch``
    and ``step``: ``step/train_loss``, ``step/lr``, ``epoch/test_accuracy``... The numbers are the
    records' own, not computed again.

    The events are flushed (tensorboardX fsyncs the file) after each epoch's, when the run ends or
    stops, and before each checkpoint (this callback runs before ``Checkpointing``, and
    ``checkpoint_every`` is its ``every``): whatever a run killed at any moment wrote up to its
    last checkpoint is on disk, and a resumed run's events are those of its checkpoint's records,
    as ``metrics.jsonl``'s are. In between, tensorboardX's file writes reach the operating system
    as its buffer fills: a flush a step would cost more than the step (an fsync each).

    A resumed run writes its events from its checkpoint's step on, after purging those of earlier
    runs from that step on (``RunFolder.open_events``), and writes again what its checkpoint holds
    of that step: its records there, and the histograms if an epoch ended there. In a folder
    without events yet, it writes every record its checkpoint holds first.
    """

    SKIPPED = ("kind", "epoch", "step")   # not plotted: the x axis, and the record's kind

    def __init__(self, run_folder, console, checkpoint_every=0):
        self.run_folder, self.console, self.checkpoint_every = run_folder, console, checkpoint_every
        self.events, self._logged = None, 0

    def on_fit_start(self, trainer):
        # a collective: every rank, and on rank 0 the only place tensorboardX is imported
        self.events = self.run_folder.open_events(trainer.position.step, self.console.warn)
        if self.events is None:
            return
        step = trainer.position.step
        config = json.dumps(trainer.plan.config.to_dict(), indent=2, sort_keys=True)
        # an indented block: TensorBoard's text dashboard shows it as it is (config.json's text)
        self.events.text("config", "    " + config.replace("\n", "\n    "), step)
        self._logged = 0
        self._log_records(trainer, since=self.events.purge_step)
        last = trainer.records[-1] if trainer.records else None
        if last is not None and last.get("kind", "epoch") == "epoch" and last["step"] == step:
            self._log_parameters(trainer, step)
        self.events.flush()
        self.console.print(f"TensorBoard events: {self.run_folder.tensorboard_dir} "
                           f"(tensorboard --logdir {self.run_folder.tensorboard_dir})")

    def on_step_end(self, trainer, end):
        if self.events is None:
            return
        if len(trainer.records) > self._logged:
            self._log_records(trainer)
        if end.stop:   # the last step of this run: its events complete, whatever happens next
            self._close()
        elif checkpoint_due(self.checkpoint_every, trainer, end):
            self.events.flush()

    def on_epoch_end(self, trainer, record, is_best):
        if self.events is not None:
            self._log_records(trainer)
            self._log_parameters(trainer, record["step"])
            self.events.flush()

    def on_fit_end(self, trainer):
        self._close()

    def _log_records(self, trainer, since=0):
        """The records not yet logged, those at step ``since`` or later."""
        for record in trainer.records[self._logged:]:
            if record["step"] >= since:
                kind = record.get("kind", "epoch")
                for key, value in record.items():
                    if key not in self.SKIPPED and isinstance(value, (int, float)) \
                            and not isinstance(value, bool):
                        self.events.scalar(f"{kind}/{key}", value, record["step"])
        self._logged = len(trainer.records)

    def _log_parameters(self, trainer, step):
        for name, values in trainer.model.named_params():
            self.events.histogram(f"parameters/{name}", values, step)

    def _close(self):
        if self.events is not None:
            self.events.close()
            self.events = None


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


def checkpoint_due(every, trainer, end):
    """Whether ``Checkpointing(every=every)`` saves after the step that ``end`` ends: a stop was
    requested, the run ends there (--max-steps), or ``every`` steps (0: never) have passed, within
    an epoch (the end of an epoch has a checkpoint of its own, after its evaluation)."""
    pos = trainer.position
    return end.stop or end.final or bool(every and pos.step % every == 0
                            and pos.step_in_epoch < end.steps_in_epoch)


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
        if checkpoint_due(self.every, trainer, end):
            self.save(trainer)

    def on_epoch_end(self, trainer, record, is_best):
        self.save(trainer, is_best)
