"""The ddptrain rows' worker: ddptrain's TrainStep on this rank's share of each global batch.

Started by the benchmark as ``benchmark.py --worker ddptrain`` in each rank
(under mpiexec for several); rank 0 writes the results to ``--out`` as JSON.
A step is what the inner loop of ``Trainer._run_epoch`` runs: gather this
rank's rows, then the very ``TrainStep`` of training.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from ddptrain.nn import Sequential, SoftmaxCrossEntropy
from ddptrain.optim import SGD

from . import workload
from .ddptrain_internals import (
    DEFAULT_VIRTUAL_SHARDS,
    BatchContext,
    Batches,
    Checkpointing,
    Config,
    RunFolder,
    ShardedOptimizer,
    Split,
    StopRequest,
    Trainer,
    TrainingPlan,
    TrainStep,
    column_split,
    configure_blas_threads,
    evaluate,
    gemm,
    make_exchange,
    no_reduction,
    products_backend,
    thread_line,
    uses_groups,
    wants_row_threads,
    world,
)
from .environment import blas_description, ddptrain_vector_code, max_rss_mib
from .step_timing import (
    ProfiledExchange,
    ProfiledOptimizer,
    StepProfile,
    TimedComm,
    TimedExchange,
    TimedLoss,
    time_allreduce,
)
from .streaming import data_plan, rank_rows
from .workload import RANDOM, EpochSteps, Plan, load_shard, test_blocks, train_blocks


def gradient_exchange(args, comm, model, optimizer):
    """``(optimizer, exchange)``: the gradient exchange a run with these options takes, from the
    factory ddptrain's runner calls, set up as the runner sets it up."""
    settings = Config(exchange=args.exchange, overlap_allreduce=args.overlap_allreduce,
                      shard_optimizer=args.shard_optimizer, bucket_mb=args.bucket_mb,
                      dtype="float32")
    exchange = make_exchange(comm, settings, model)
    optimizer = exchange.sharded_optimizer(optimizer)
    exchange.attach(model)
    return optimizer, exchange


class Steps:
    """The row's training steps: this rank's rows of each global batch, then ddptrain's TrainStep
    (forward, loss, backward, gradient exchange, step totals Allreduce, finite check, update)."""

    def __init__(self, args, comm, model, train_x, train_y, n_train, training=None, stream=None,
                 threads=1):
        self.args, self.comm, self.model = args, comm, model
        # the threads on the rows of each step where a run would put them (runner.py: a CNN's)
        self.row_threads = 1 if args.reproducible else wants_row_threads(model.layers, threads)
        if self.row_threads > 1:
            threadpool_limits(limits=1, user_api="blas")
        self.loss_fn = SoftmaxCrossEntropy()
        # --reproducible as a run sets it up (runner.py): every rank holds the whole batch, its
        # products split into blocks of columns on ``threads`` threads, the update in numpy's
        # arithmetic.
        self.reproducible, self.group_threads = args.reproducible, threads
        # a CNN on large enough batches: each rank its rows, in fixed groups (training/groups.py)
        self.row_groups = (DEFAULT_VIRTUAL_SHARDS if self.reproducible and uses_groups(
            model.layers, args.batch, DEFAULT_VIRTUAL_SHARDS) else 0)
        if self.row_groups:
            threadpool_limits(limits=1, user_api="blas")
        elif self.reproducible:
            model.set_column_split(column_split(comm, threads))
        backend = model.backend
        if self.reproducible:
            backend = gemm.with_updates_anywhere(backend, model.params.dtype)
        self.optimizer, self.exchange = gradient_exchange(
            args, comm, model, SGD(momentum=0.9, backend=backend))
        self.timed = TimedExchange(self.exchange, skip=args.no_allreduce)
        # Batch normalisation: statistics of the global batch (their Allreduces timed apart),
        # or each rank's own with rank 0's buffers broadcast after every step, as ddptrain
        # --batchnorm local does (and --reproducible: the whole batch on every rank).
        self.batchnorm_timer = TimedComm(comm)
        model.set_sum_over_ranks(self.batchnorm_timer.allreduce_ if args.batchnorm == "global"
                                 and not self.reproducible else no_reduction)
        self.broadcast_buffers = args.batchnorm == "local" and comm.size > 1 and model.buffers.size
        self.plan = Plan(n_train, args.batch, comm.rank, comm.size)
        # --stream: a run's epochs one after another, from memory or streamed (the plan above
        # cycles through one epoch's steps, which a stream, read ahead epoch after epoch, cannot)
        self.epochs = None if training is None else EpochSteps(training)
        self.batches = Batches(Split(train_x, train_y, np.float32, stream),
                               -(-args.batch // comm.size))

    def train_step(self, profile=None):
        """The TrainStep, with its exchange timed; with laps of ``profile`` between its phases."""
        if profile is None:
            return TrainStep(self.model, self.loss_fn, self.optimizer, self.timed,
                             reproducible=self.reproducible, row_threads=self.row_threads,
                             row_groups=self.row_groups, group_threads=self.group_threads)
        return TrainStep(self.model, TimedLoss(self.loss_fn, profile),
                         ProfiledOptimizer(self.optimizer, profile),
                         ProfiledExchange(self.timed, profile), reproducible=self.reproducible,
                         row_threads=self.row_threads, row_groups=self.row_groups,
                         group_threads=self.group_threads)

    def run(self, first, steps, profile=None):
        """Steps ``first`` to ``first + steps - 1`` of the plan (cycled); returns the next."""
        train_step = self.train_step(profile)
        for step in range(first, first + steps):
            if profile:
                profile.start()
            if self.epochs is None:
                x, y = self.batches.gather(self.plan.rows(step))
            else:
                x, y = self.batches.take(*self.epochs.at(step))
            if profile:
                profile.lap("gathering the batch")
            train_step(x, y, self.plan.global_count, self.args.lr,
                       context=self.batch_context(step) if self.reproducible else None)
            if self.broadcast_buffers:
                self.comm.bcast_(self.model.buffers)
            if profile:
                profile.steps += 1
        train_step.close()
        return first + steps

    def batch_context(self, step):
        """Where this rank's rows of ``step`` sit in the global batch (--reproducible puts the
        gathered batch in that order)."""
        plan = self.plan.plan
        return BatchContext(0, step, plan.positions_in_batch(step % plan.n_steps))

    def reset_timers(self):
        self.timed.seconds = self.batchnorm_timer.seconds = 0.0

    def exchanged_seconds(self):
        """Seconds in the gradient's exchange since the timers were reset (MPI or node memory)."""
        return self.timed.seconds

    def optimizer_bytes(self):
        """Bytes of this rank's optimiser state (its slice of it, sharded)."""
        sharded = isinstance(self.optimizer, ShardedOptimizer)
        state = (self.optimizer.optimizer if sharded else self.optimizer).state_dict()
        return sum(v.nbytes for v in state.values() if isinstance(v, np.ndarray))


def worker_ddptrain(args):
    """ddptrain: its TrainStep on this rank's share of each global batch. Rank 0 writes the
    results."""
    comm = world()
    # before the threads: they are set for the library that multiplies
    # --reproducible multiplies with numpy's BLAS, as a run does (preflight.py)
    backend = products_backend("numpy" if args.reproducible else args.gemm)
    blas_threads = configure_blas_threads(comm, args.threads_per_rank, backend.name)
    started = time.perf_counter()
    training = stream = None
    if args.stream:   # "memory", or ddptrain's --data-memory
        training, stream = rank_rows(args.data, args.batch, comm.rank, comm.size,
                                     None if args.stream == "memory" else args.stream)
    if stream is None:
        train_x, train_y, n_train = load_shard(args.data, comm.rank, comm.size, "train",
                                               train_blocks(comm.rank, comm.size))
    else:
        train_x, train_y, n_train = stream.images, stream.labels, training.n_train
    test_x, test_y, _ = load_shard(args.data, comm.rank, comm.size, "test",
                                   test_blocks(comm.rank, comm.size))
    # DDP: the mean over ranks
    load_seconds = comm.allreduce(time.perf_counter() - started) / comm.size

    model = Sequential.from_spec(args.model, dtype=np.float32, seed=0, input_shape=workload.IMAGE)
    model.use_backend(backend)
    # (N, 1, 28, 28) for a CNN: a view
    train_x, test_x = model.as_input(train_x), model.as_input(test_x)
    steps = Steps(args, comm, model, train_x, train_y, n_train, training, stream,
                  blas_threads.threads)
    # Streamed: the same epochs from the shard in memory, a repetition after each streamed one, in
    # this launch: the machine's moods fall on both alike.
    twin = None if stream is None else in_memory_twin(args, comm, backend)

    step = steps.run(0, args.warmup)
    twin_step = twin.run(0, args.warmup) if twin else 0
    rates, allreduce_fractions, batchnorm_fractions, memory_rates = [], [], [], []
    for _ in range(args.repeats):
        comm.barrier()
        steps.reset_timers()
        began = time.perf_counter()
        step = steps.run(step, args.steps)
        comm.barrier()
        elapsed = time.perf_counter() - began
        rates.append(args.steps * args.batch / elapsed)
        if twin:
            comm.barrier()
            began = time.perf_counter()
            twin_step = twin.run(twin_step, args.steps)
            comm.barrier()
            memory_rates.append(args.steps * args.batch / (time.perf_counter() - began))
        allreduce_fractions.append(comm.allreduce(steps.exchanged_seconds() / elapsed) / comm.size)
        batchnorm_seconds = steps.batchnorm_timer.seconds
        batchnorm_fractions.append(comm.allreduce(batchnorm_seconds / elapsed) / comm.size)

    # Then a few steps with laps between the phases (not timed above: the laps cost a little).
    profile = StepProfile()
    model.observer = profile.observer
    comm.barrier()
    step = steps.run(step, max(5, args.steps // 2), profile)
    model.observer = None

    result = {"rates": rates, "allreduce_fraction": allreduce_fractions,
              "threads": blas_threads.threads,
              "optimizer_bytes": comm.allgather(steps.optimizer_bytes()),
              "batchnorm_allreduce_fraction": batchnorm_fractions,
              "profile_ms": profile.per_step_ms() if profile.steps else None,
              "thread_line": thread_line(steps.row_threads, blas_threads.description),
              "blas": blas_description(backend),
              "library": comm.library, "vector_code": ddptrain_vector_code(backend),
              "hosts": blas_threads.host_line,
              "load_seconds": load_seconds, "n_train": n_train, "n_params": int(model.params.size),
              "load_what": ("making random shards" if args.data == RANDOM
                            else "loading the shards from HDF5")}
    if comm.size > 1 and not args.no_allreduce:
        result["allreduce_alone_ms"] = time_allreduce(lambda: comm.allreduce_(model.grads),
                                                      comm.barrier)
    if args.end_to_end:
        train_step = TrainStep(model, steps.loss_fn, steps.optimizer, steps.exchange,
                               row_threads=steps.row_threads)
        result.update(end_to_end(args, comm, train_step, test_x, test_y, n_train))
    if stream is not None:
        stream.close()
        result.update(stream_waited=stream.seconds_waited, data_line=data_line(args, comm),
                      memory_rates=memory_rates)
    if model.columns is not None:
        model.columns.close()
    rss = comm.allgather(max_rss_mib())   # DDP
    result["max_rss_mib"] = rss
    if comm.rank == 0:
        Path(args.out).write_text(json.dumps(result))


def in_memory_twin(args, comm, backend):
    """The Steps of a streamed row's twin: the same epochs, this rank's shard in memory."""
    training, _ = rank_rows(args.data, args.batch, comm.rank, comm.size, None)
    x, y, n_train = load_shard(args.data, comm.rank, comm.size, "train",
                               train_blocks(comm.rank, comm.size))
    model = Sequential.from_spec(args.model, dtype=np.float32, seed=0, input_shape=workload.IMAGE)
    model.use_backend(backend)
    return Steps(args, comm, model, model.as_input(x), y, n_train, training)


def data_line(args, comm):
    """The start-up line of ddptrain's --data-memory for this row."""
    return data_plan(args.data, args.batch, comm.size, args.stream)[2].line


def end_to_end(args, comm, train_step, test_x, test_y, n_train):
    """Seconds to evaluate the test set and to write one checkpoint, with ddptrain's own code."""
    test, n_classes = Split(test_x, test_y, np.float32), 10
    evaluate(train_step.model, comm, test, n_classes)   # warm
    comm.barrier()
    began = time.perf_counter()
    evaluate(train_step.model, comm, test, n_classes)
    eval_seconds = time.perf_counter() - began

    run_dir = comm.bcast(tempfile.mkdtemp(prefix="ddptrain-bench-") if comm.rank == 0 else None)
    config = Config(model=args.model, batch_size=args.batch, run_dir=run_dir)
    folder = RunFolder(comm, run_dir)
    folder.take()
    folder.write_config(config.to_dict())
    trainer = Trainer(train_step, TrainingPlan(config, n_train, comm.rank, comm.size),
                      Split(test_x[:1], test_y[:1], np.float32),
                      test, n_classes, StopRequest())
    checkpointing = Checkpointing(folder)
    times = []
    for _ in range(3):
        comm.barrier()
        began = time.perf_counter()
        # step-<n>.h5 and best.h5, as at the end of an epoch
        checkpointing.save(trainer, is_best=True)
        times.append(time.perf_counter() - began)
        trainer.position.step += 1
    if comm.rank == 0:
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"eval_seconds": eval_seconds, "checkpoint_seconds": statistics.median(times)}
