"""Setting up a training run on every rank, then ``Trainer.fit``.

Read ``_run`` and ``_train`` from the top: the start-up checks
(``preflight``), the model and the two broadcasts that data parallelism needs,
the start-up lines, the run folder, the optimiser and the gradient exchange,
the checkpoint to resume from, this rank's shards, the trainer, and the loop.
Every function here runs on every rank. What differs between ranks is only
which rows they read; what only rank 0 does goes through ``rank0``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ddptrain import __version__
from ddptrain.backends import denormals, gemm
from ddptrain.data import sampler
from ddptrain.data.arrays import ArrayInfo
from ddptrain.data.format import DatasetInfo
from ddptrain.data.stream import ArrayRows, FileRows, WindowStream
from ddptrain.distributed.exchange import make_exchange
from ddptrain.distributed.gather import MessageGather
from ddptrain.distributed.slurm import describe_slurm
from ddptrain.distributed.watchdog import watch_for_stalls
from ddptrain.errors import EXIT_OK, EXIT_PREEMPTED, same_on_every_rank
from ddptrain.nn.columns import ColumnSplit
from ddptrain.nn.layer import no_reduction
from ddptrain.nn.losses import SoftmaxCrossEntropy
from ddptrain.nn.model import Sequential
from ddptrain.optim.schedule import peak_learning_rate
from ddptrain.run.callbacks import (
    Checkpointing,
    HashRecord,
    MetricsLog,
    ProgressReport,
    TensorBoardLog,
)
from ddptrain.run.data_memory import DataPlan, order_for_resume
from ddptrain.run.preflight import preflight
from ddptrain.run.rank0 import Console, RunFolder, run_on_rank0
from ddptrain.run.resume import data_sha256, load_checkpoint
from ddptrain.run.signals import StopRequest
from ddptrain.run.supervised import report_ready
from ddptrain.training.batches import ReadSplit, Split
from ddptrain.training.callbacks import BroadcastBuffers, ReplicaCheck
from ddptrain.training.debug import DebugChecks
from ddptrain.training.early_stopping import EarlyStopping
from ddptrain.training.groups import describe_groups, groups_of_run
from ddptrain.training.plan import TrainingPlan
from ddptrain.training.profiler import Profiler
from ddptrain.training.row_threads import row_threads_of_run, thread_line
from ddptrain.training.step import TrainStep
from ddptrain.training.trainer import Trainer


@dataclass(frozen=True)
class Result:
    """What a run ends with, the same on every rank (its metrics are sums over all ranks)."""

    exit_status: int            # 0; EXIT_PREEMPTED when a signal stopped it (after a checkpoint)
    run_dir: str
    # the per-epoch records of metrics.jsonl, this run's and those resumed
    metrics: tuple = ()
    stopped_by: str = None      # the signal that stopped the run, if one did
    steps: int = 0              # steps trained, resumed ones included
    seconds: float = 0.0        # set-up and training, in this process
    rank: int = 0               # this process's rank (to print a result once: on rank 0)
    world_size: int = 1
    # the epoch after which early stopping (--early-stop) ended the run, in this run or in the
    # one it resumed; None if it did not
    stopped_early_at: int = None
    # with --early-stop: the best epoch by its metric, the one best.h5 holds (None before any)
    best_epoch: int = None

    @property
    def stopped_early(self):
        return self.stopped_early_at is not None

    def _last(self, key):
        return self.metrics[-1][key] if self.metrics else None

    @property
    def epochs(self):
        """Epochs finished."""
        return self._last("epoch") or 0

    @property
    def test_accuracy(self):
        """After the last epoch finished; None before the first."""
        return self._last("test_accuracy")

    @property
    def test_loss(self):
        return self._last("test_loss")

    @property
    def train_loss(self):
        """The mean loss over the last finished epoch's training samples."""
        return self._last("train_loss")

    @property
    def train_accuracy(self):
        return self._last("train_accuracy")


def run_training(config, comm, quiet=False, dry_run=False, callbacks=(), model=None, arrays=None):
    """Train on every rank; returns the ``Result`` (exit status 0, or EXIT_PREEMPTED after a
    signal).

    ``dry_run``: check everything (options, data, model, ranks), print the
    start-up lines, write nothing. ``callbacks`` (``trainer.Callback``) run
    after ddptrain's own, on every rank. ``model``: a ``Sequential`` to train
    (in place) instead of ``config.model``'s; ``arrays``: ``Arrays`` to train
    on instead of ``config.data``'s file.
    """
    # From the very start: a SIGUSR1 that SLURM sends while the ranks are still setting up
    # is remembered, and the run stops (with a checkpoint) after its first step.
    stop = StopRequest().install()
    # DDP: --stall-timeout: a rank left waiting for a stopped one ends the job
    watchdog = watch_for_stalls(comm, config.stall_timeout)
    ended = False
    try:
        report_ready(comm)   # to ddptrain launch, if it started this job: it passes signals on now
        # this thread's setting comes back afterwards
        with denormals.flushed(config.denormals == "flush"):
            result = _run(config, comm, stop, quiet, dry_run, callbacks, model, arrays)
        ended = True
        return result
    finally:
        if watchdog is not None:
            watchdog.stop(release=ended)   # its memory back: a collective, not after an error
        stop.uninstall()


def _run(config, comm, stop, quiet, dry_run, callbacks, model, arrays):
    started = time.perf_counter()
    console = Console(comm.rank, quiet=quiet, log_every=config.log_every)
    # every check; nothing allocated or written
    checked = preflight(comm, config, console, model, arrays)
    config, folder, info = checked.config, checked.folder, checked.info
    if model is None:
        model = Sequential(checked.layers, dtype=config.dtype, seed=config.seed,
                           spec=checked.model_spec)
    model.use_backend(checked.backend)
    # DDP: batch statistics of the global batch (--batchnorm global), or of each rank's rows;
    # --reproducible: every rank holds the whole batch, and its products are split by columns.
    model.set_sum_over_ranks(comm.allreduce_ if config.batchnorm == "global"
                             and not config.reproducible else no_reduction)
    threads, row_groups = checked.blas_threads.threads, groups_of_run(config, model.layers)
    if row_groups:   # each rank its rows, in fixed groups (training/groups.py)
        limit_blas_to_one_thread()
    elif config.reproducible:
        model.set_column_split(column_split(comm, threads))
    try:
        row_threads = row_threads_of_run(config, model.layers, threads)
        if row_threads > 1:   # each thread its rows, with a one-thread BLAS (row_threads.py)
            limit_blas_to_one_thread()
        comm.bcast_(model.params)    # DDP: every replica starts from rank 0's parameters
        comm.bcast_(model.buffers)   # DDP: and buffers
        announce(console, comm, config, model, checked, row_threads,
                 describe_groups(row_groups, threads) if row_groups else None)
        if dry_run:
            folder.check_free()
            console.print(f"dry run: the options, the data file, the model and the {comm.size} "
                          "rank(s) check out; nothing was trained or written", always=True)
            return Result(EXIT_OK, folder.run_dir, seconds=time.perf_counter() - started,
                          rank=comm.rank, world_size=comm.size)
        try:
            folder.take()   # one run at a time in a run folder
            return _train(_Run(config, comm, console, folder, model, info, checked.backend,
                               started, checked.data, row_threads, row_groups, threads),
                          stop, callbacks)
        finally:
            folder.release()
    finally:
        if model.columns is not None:   # its threads stop, dry run or not
            model.columns.close()
            model.set_column_split(None)   # a caller's model is theirs again, as it was


def column_split(comm, threads):
    """--reproducible's ``ColumnSplit``: this rank's blocks of every product, run on ``threads``
    Python threads that each call a one-thread BLAS (so one process with 2 threads computes what 2
    ranks compute). Its columns travel through MPI until the step hands it the exchange's way."""
    limit_blas_to_one_thread()
    return ColumnSplit(comm.rank, comm.size, MessageGather(comm), threads)


def limit_blas_to_one_thread():
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=1, user_api="blas")


@dataclass(frozen=True)
class _Run:
    """What the set-up established, for the training that follows."""

    config: object
    comm: object
    console: Console
    folder: RunFolder
    model: Sequential
    info: DatasetInfo   # info.path: the data file
    backend: object     # backends.gemm.Backend
    started: float
    data: DataPlan      # what each rank holds of the training rows: in memory, or streamed
    row_threads: int    # threads each on a slice of the step's rows (1: the BLAS's threads)
    row_groups: int     # --reproducible in fixed groups of rows (training/groups.py); 0: not
    threads: int        # a rank's threads


def _train(run, stop, callbacks):
    config, comm, console, folder, model, info = (run.config, run.comm, run.console, run.folder,
                                                  run.model, run.info)
    # DDP: how the ranks sum the gradient (distributed/exchange.py): through each node's shared
    # memory, where each rank updates its slice of the parameters (the optimiser sharded over the
    # node), or with MPI.
    exchange = make_exchange(comm, config, model)
    optimizer = exchange.sharded_optimizer(config.make_optimizer(
        gemm.with_updates_anywhere(run.backend, model.params.dtype) if config.reproducible
        else run.backend))
    # DDP: rank 0 reads and verifies the checkpoint and broadcasts it, so that every rank
    # resumes from the same bytes or every rank stops with the same error.
    checkpoint = run_on_rank0(comm, lambda: load_checkpoint(config, folder.checkpoint_dir, model,
                                                            optimizer, info, console.warn))
    data = run.data
    if checkpoint is not None:   # the checkpoint's order of the rows, if this run may hold it
        with same_on_every_rank():   # DDP: the checkpoint is rank 0's, broadcast
            data = order_for_resume(data, checkpoint.state.get("data_order"), info, config,
                                    comm.size, checkpoint.path)
        if data is not run.data and data.line:
            console.print(data.line, always=True)
    folder.write_config(config.to_dict())   # once the run is known to go ahead
    train, test = read_shards(info, comm, config, model, data.order)
    try:   # a streamed shard's reading thread stops on every way out
        return _fit(run, stop, callbacks, exchange, optimizer, checkpoint, data, train, test)
    finally:
        if train.stream is not None:
            train.stream.close()


def _fit(run, stop, callbacks, exchange, optimizer, checkpoint, data, train, test):
    config, comm, console, folder, model, info = (run.config, run.comm, run.console, run.folder,
                                                  run.model, run.info)
    step = TrainStep(model, SoftmaxCrossEntropy(), optimizer, exchange,
                     config.clip_grad_norm or None, config.accumulate, config.reproducible,
                     run.row_threads, run.row_groups, run.threads)
    callbacks = standard_callbacks(config, console, folder, model.buffers.size > 0,
                                   data_sha256(info)) + list(callbacks)
    profiler = make_profiler(config, console, folder, callbacks,
                             {"ddptrain": __version__, "model": model.summary(),
                              "exchange": exchange.describe(), "config": config.to_dict()})
    trainer = Trainer(step, TrainingPlan(config, info.n_train, comm.rank, comm.size, data.order),
                      train, test, info.n_classes, stop,
                      ([profiler] if profiler else []) + callbacks)
    # a run that early stopping ended resumes only to say so (a SLURM requeue, --resume auto)
    done = False
    if checkpoint is not None:
        trainer.restore(checkpoint)
        done = trainer.early_stop_due and trainer.position.epoch < trainer.plan.epochs
        console.print(describe_done(checkpoint, trainer) if done else
                      describe_resume(checkpoint, trainer.position, comm.size), always=True)
    if comm.size > 1 and not done:
        console.print(exchange.describe(), always=True)
    # the parameters every rank holds (restored or broadcast): shared memory from now on
    exchange.attach(model)
    # what the checkpoint recorded, or nothing: no record twice
    folder.rewrite_metrics(trainer.records)
    if not done:
        console.print(f"set-up took {time.perf_counter() - run.started:.2f} s")

    try:
        stopped_by = trainer.fit()   # at once where done: it stops before the next epoch
    finally:
        step.close()
        if profiler:
            profiler.restore()   # the model's layers as they were, however the run ended
    if profiler:
        profiler.finish(trainer)   # a window the run ended inside (a collective)
    exchange.detach(model)   # the model keeps arrays of its own (a collective: not after an error)
    early = trainer.early_stopping
    result = Result(EXIT_PREEMPTED if stopped_by else EXIT_OK, folder.run_dir,
                    tuple(trainer.metrics), stopped_by, trainer.position.step,
                    time.perf_counter() - run.started, comm.rank, comm.size,
                    trainer.stopped_early_at, (early.best_epoch or None) if early else None)
    if stopped_by:
        console.print(f"stopped by {stopped_by} at step {trainer.position.step}; checkpoint "
                      f"written; resume with --resume auto --run-dir {folder.run_dir}", always=True)
    elif result.stopped_early and not done:
        console.print(f"stopped early after epoch {result.epochs} of {trainer.plan.epochs}: "
                      f"{early.why_stopped()}; checkpoint written, best.h5 holds epoch "
                      f"{early.best_epoch}; test accuracy {100 * result.test_accuracy:.2f}%, "
                      f"{result.seconds:.1f} s in all; run folder {folder.run_dir}", always=True)
    elif trainer.plan.total_steps < trainer.plan.epochs * trainer.plan.steps_per_epoch \
            and trainer.max_steps_reached and not done:
        console.print(f"stopped at step {trainer.position.step} (--max-steps {config.max_steps}); "
                      f"checkpoint written; {result.seconds:.1f} s in all; run folder "
                      f"{folder.run_dir}", always=True)
    elif trainer.metrics and not done:
        console.print(f"finished: test accuracy {100 * result.test_accuracy:.2f}% after "
                      f"{result.epochs} epochs, {result.seconds:.1f} s in all; run folder "
                      f"{folder.run_dir}", always=True)
    return result


def read_shards(info, comm, config, model, order=None):
    """This rank's training shard (its virtual shards) and its contiguous block of the test rows,
    shaped as ``model`` takes them. ``order``: a ``StreamOrder``: the shard streamed
    (``data.stream``) and the test rows read a chunk at a time; None: both in memory."""
    test_rows = sampler.evaluation_block(info.n_test, comm.rank, comm.size)
    if order is not None:
        plan = TrainingPlan(config, info.n_train, comm.rank, comm.size, order)
        source = (ArrayRows(info.arrays, "train") if isinstance(info, ArrayInfo)
                  else FileRows(info.path, "train"))
        stream = WindowStream(plan.layout, source, info.image_shape,
                              info.stored_dtype(config.dtype), config.epochs)
        train = Split(model.as_input(stream.images), stream.labels, np.dtype(config.dtype), stream)
        return train, ReadSplit(info, "test", *test_rows, config.dtype, model.as_input)
    blocks = sampler.owned_blocks(info.n_train, comm.rank, comm.size, config.virtual_shards)
    train = read_split(info, "train", blocks, config.dtype, model)
    return train, read_split(info, "test", [test_rows], config.dtype, model)


def read_split(info, split, blocks, dtype, model):
    """The rows of ``blocks`` of ``split`` of the data ``info`` describes, as a Split, images shaped
    as ``model`` takes them."""
    # a file's: uint8 pixels
    images, labels = info.read_rows(split, blocks, dtype=info.stored_dtype(dtype))
    return Split(model.as_input(images), labels, np.dtype(dtype))


def standard_callbacks(config, console, folder, model_has_buffers, data_checksum=None):
    """ddptrain's own work around the loop, in the order it runs after a step: check, report,
    record, save."""
    callbacks = [ReplicaCheck(config.check_every), ProgressReport(console),
                 MetricsLog(folder, config.metrics_every),
                 *([HashRecord(folder)] if config.record_hashes else []),
                 # after the records it writes, before the checkpoint that may follow them
                 *([TensorBoardLog(folder, console, config.checkpoint_every)]
                   if config.tensorboard else []),
                 Checkpointing(folder, config.checkpoint_every, config.keep, data_checksum,
                               console.warn)]
    if config.batchnorm == "local" and model_has_buffers:
        callbacks.insert(0, BroadcastBuffers())
    if config.debug:
        callbacks.insert(0, DebugChecks(console, seed=config.seed,
                                        per_rank_statistics=config.batchnorm == "local"))
    return callbacks


def make_profiler(config, console, folder, callbacks, about):
    """--profile's recorder, the first callback (None without --profile), with the checkpoint
    writes of ``callbacks`` among the spans it records."""
    if not config.profile:
        return None
    saves = [(callback, "save", "checkpoint", "checkpoint") for callback in callbacks
             if isinstance(callback, Checkpointing)]
    return Profiler(config.profile, lambda trace: folder.write_timeline(trace, console.warn),
                    lambda line: console.print(line, always=True), about, saves)


def describe_split(n_train, n_test, comm, config):
    shards = sampler.shard_bounds(n_train, config.virtual_shards)
    mine = len(sampler.owned_shards(0, comm.size, config.virtual_shards))
    per_rank = -(-config.batch_size // comm.size)
    return (f"data split: {n_train:,} training rows in {config.virtual_shards} virtual shards of "
            f"~{int(np.diff(shards).mean()):,} rows; rank r reads shards r, r+{comm.size}, ... "
            f"({mine} shards, ~{n_train // comm.size:,} rows each); "
            f"{n_test:,} test rows in {comm.size} contiguous block(s); "
            f"global batch {config.batch_size} = {per_rank if comm.size > 1 else config.batch_size}"
            f"{' (at most)' if config.batch_size % comm.size else ''} per rank")


def announce(console, comm, config, model, checked, row_threads=1, groups_line=None):
    """The start-up lines, on rank 0."""
    blas_threads, info = checked.blas_threads, checked.info
    where = f" on {blas_threads.host_line}" if len(blas_threads.hosts) > 1 else ""
    threads = thread_line(row_threads, blas_threads.description)
    console.print(f"ddptrain {__version__}: {comm.size} rank{'s' if comm.size > 1 else ''}{where} "
                  f"({comm.library}); {threads}; matrix products: "
                  f"{checked.gemm_choice.description}; {denormals.describe(config.denormals)}",
                  always=True)
    console.print(f"model {model.summary()} ({model.params.size:,} parameters, {config.dtype}); "
                  f"data {info.path}; run folder {checked.folder.run_dir}", always=True)
    console.print(describe_split(info.n_train, info.n_test, comm, config), always=True)
    if config.reproducible:
        how = groups_line or model.columns.describe()
        console.print(f"reproducible: the bits of one process on any number of ranks, for this CPU "
                      f"type and BLAS ({how}; docs/reproducible.md)", always=True)
    if checked.data is not None and checked.data.line:
        console.print(checked.data.line, always=True)
    console.print(f"peak learning rate {peak_learning_rate(config):.4g} ({config.lr_schedule}"
                  f"{f', {config.warmup_epochs:g} warmup epochs' if config.warmup_epochs else ''}"
                  f"{', linear scaling rule' if config.lr_scaling == 'linear' else ''}); "
                  f"configuration: {config.to_json()}", always=True)
    early_stopping = EarlyStopping.of(config)
    if early_stopping is not None:
        console.print(early_stopping.describe(), always=True)
    slurm_line = describe_slurm(comm.size)
    if slurm_line:
        console.print(slurm_line, always=True)


def describe_done(checkpoint, trainer):
    """The one line of a run resumed after early stopping ended it: nothing is trained."""
    early = trainer.early_stopping
    best = f"; best.h5 holds epoch {early.best_epoch}" if early.best_epoch else ""
    return (f"resumed from {checkpoint.path}: the run is done: early stopping ended it after epoch "
            f"{trainer.position.epoch} of {trainer.plan.epochs}: {early.why_stopped()}{best}; "
            "nothing to train (a larger --early-stop, or none, trains on)")


def describe_resume(checkpoint, position, world_size):
    written_by = checkpoint.state["world_size"]
    return (f"resumed from {checkpoint.path}: epoch {position.epoch + 1}, step {position.step}"
            + (f" (written by {written_by} ranks, resumed on {world_size}: the same batches, equal "
               f"to an uninterrupted run up to rounding)" if written_by != world_size else ""))
