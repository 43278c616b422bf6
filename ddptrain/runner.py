"""Setting up a training run on every rank: threads, data, model, resume; then ``Trainer.fit``.

Every function here runs on every rank. What differs between ranks is only
which rows they read; what only rank 0 does goes through ``rank0``.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np

from . import __version__, checkpoint as ckpt_io, data, sampler
from .errors import EXIT_OK, EXIT_PREEMPTED, CheckpointError, UserError, same_on_every_rank
from .nn import Sequential
from .optim import SGD
from .rank0 import RankZero, run_on_rank0
from .train import Split, StopRequest, Trainer


def configure_blas_threads(comm, requested=0):
    """Give each rank its share of the cores it may run on, and say so.

    Ranks that share a node and the same CPU affinity split those cores
    between them; a rank bound to its own cores (mpirun --bind-to, srun
    --cpu-bind) uses all of them. ``requested`` > 0 overrides.
    """
    from threadpoolctl import threadpool_info, threadpool_limits

    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    me = (socket.gethostname(), tuple(sorted(cores)))
    sharing = sum(1 for other in comm.allgather(me) if other == me)   # DDP
    threads = requested or max(1, len(cores) // sharing)
    threadpool_limits(limits=threads, user_api="blas")
    blas = next((lib for lib in threadpool_info() if lib.get("user_api") == "blas"), {})
    library = blas.get("internal_api", "unknown BLAS")
    how = "set by --threads" if requested else f"{len(cores)} cores shared by {sharing} rank(s)"
    return threads, f"{threads} {library} thread{'s' if threads > 1 else ''} per rank ({how})"


def resolve_data_path(comm, config, rank0_print):
    """The data file: --data, or the prepared MNIST in the cache (rank 0 prepares it if missing)."""
    if config.data:
        return config.data
    from . import mnist
    return run_on_rank0(comm, lambda: str(mnist.ensure_default_dataset(log=rank0_print)))


def default_run_dir():
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        array_task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"runs/slurm-{job}" + (f"-{array_task}" if array_task else "")
    return time.strftime("runs/run-%Y%m%d-%H%M%S")


def check_fits(checkpoint, model, n_train):
    """Refuse a checkpoint from another model or another data set."""
    where = checkpoint.path
    if checkpoint.model != model.spec:
        raise CheckpointError(f"{where}: checkpoint is for model {checkpoint.model}, not {model.spec}")
    expected = dict(model.named_params())
    for name, array in checkpoint.params.items():
        if name not in expected or expected[name].shape != array.shape:
            raise CheckpointError(f"{where}: parameter {name} does not fit model {model.spec}")
    if checkpoint.state.get("n_train") != n_train:
        raise CheckpointError(f"{where}: checkpoint was trained on {checkpoint.state.get('n_train')} rows, "
                              f"this data file has {n_train}")


def find_checkpoint(config, checkpoint_dir, warn):
    """Rank 0: the checkpoint path to resume from, or None to start fresh."""
    if not config.resume:
        return None
    if config.resume == "auto":
        found = ckpt_io.newest_valid(checkpoint_dir, warn=warn)
        return found.path if found else None
    if not Path(config.resume).is_file():
        raise CheckpointError(f"{config.resume}: no such checkpoint")
    return config.resume


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


def run_training(config, comm, quiet=False, fault_hook=None):
    """Train on every rank. Returns the exit status (0, or EXIT_PREEMPTED after a signal)."""
    started = time.perf_counter()
    threads, thread_line = configure_blas_threads(comm, config.threads)
    run_dir = comm.bcast(config.run_dir or default_run_dir())   # DDP: rank 0's name, everywhere
    rank0 = RankZero(comm, run_dir, quiet=quiet)

    data_path = resolve_data_path(comm, config, rank0.print)
    model = Sequential.from_spec(config.model, dtype=config.dtype, seed=config.seed)
    with same_on_every_rank():
        info = data.inspect(data_path)
        if model.n_inputs != info.n_features or model.n_outputs != info.n_classes:
            raise UserError(f"--model {config.model} does not fit {data_path}: its images have "
                            f"{info.n_features} pixels and {info.n_classes} classes")
        sampler.check_layout(info.n_train, config.batch_size, comm.size, config.virtual_shards)
    comm.bcast_(model.params)   # DDP: every replica starts from rank 0's parameters

    rank0.prepare_run_dir(config.to_dict())
    resume_path = run_on_rank0(comm, lambda: find_checkpoint(config, rank0.checkpoint_dir, rank0.warn))

    rank0.print(f"ddptrain {__version__}: {comm.size} rank{'s' if comm.size > 1 else ''} ({comm.library}); "
                f"{thread_line}", always=True)
    rank0.print(f"model {model.spec} ({model.params.size:,} parameters, {config.dtype}); data {data_path}; "
                f"run folder {run_dir}", always=True)
    rank0.print(describe_split(info.n_train, info.n_test, comm, config), always=True)

    blocks = sampler.owned_blocks(info.n_train, comm.rank, comm.size, config.virtual_shards)
    train = Split(*data.read_rows(data_path, "train", blocks, dtype=config.dtype))
    test_lo, test_hi = (info.n_test * comm.rank // comm.size, info.n_test * (comm.rank + 1) // comm.size)
    test = Split(*data.read_rows(data_path, "test", [(test_lo, test_hi)], dtype=config.dtype))

    optimizer = SGD(momentum=config.momentum, weight_decay=config.weight_decay, nesterov=config.nesterov)
    trainer = Trainer(config, comm, model, optimizer, train, test, info.n_train, info.n_classes, rank0,
                      fault_hook=fault_hook)
    if resume_path:
        with same_on_every_rank():
            checkpoint = ckpt_io.load(resume_path)
            check_fits(checkpoint, model, info.n_train)
        trainer.restore(checkpoint)
        rank0.print(f"resumed from {resume_path}: epoch {trainer.position.epoch + 1}, "
                    f"step {trainer.position.step}", always=True)
    rank0.print(f"set-up took {time.perf_counter() - started:.2f} s")

    stop = trainer.stop.install()
    try:
        stopped_by = trainer.fit()
    finally:
        stop.uninstall()
    if stopped_by:
        rank0.print(f"stopped by {stopped_by} at step {trainer.position.step}; checkpoint written; "
                    f"resume with --resume auto --run-dir {run_dir}", always=True)
        return EXIT_PREEMPTED
    if trainer.metrics:
        last = trainer.metrics[-1]
        rank0.print(f"finished: test accuracy {100 * last['test_accuracy']:.2f}% after {last['epoch']} epochs, "
                    f"{time.perf_counter() - started:.1f} s in all; run folder {run_dir}", always=True)
    return EXIT_OK
