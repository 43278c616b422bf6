"""Setting up a training run on every rank: threads, data, model, resume; then ``Trainer.fit``.

Every function here runs on every rank. What differs between ranks is only
which rows they read; what only rank 0 does goes through ``rank0``.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from pathlib import Path

import numpy as np

from . import __version__, checkpoint as ckpt_io, data, faults, sampler
from .errors import EXIT_OK, EXIT_PREEMPTED, CheckpointError, UserError, same_on_every_rank
from .nn import Sequential
from .optim import SGD
from .rank0 import RankZero, run_on_rank0
from .schedule import peak_learning_rate
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


def default_run_dir(environ=os.environ):
    """runs/slurm-<job id> in a SLURM job (runs/slurm-<array job id>_<task id> in a job array,
    as sbatch's %A_%a), else runs/run-<date-time>. A requeued job keeps its id, hence its folder."""
    job = environ.get("SLURM_JOB_ID")
    if job:
        array_job, array_task = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
        return f"runs/slurm-{array_job}_{array_task}" if array_job and array_task else f"runs/slurm-{job}"
    return time.strftime("runs/run-%Y%m%d-%H%M%S")


def slurm_restart_count(environ=os.environ):
    """How many times SLURM has requeued this job (SLURM_RESTART_COUNT); 0 outside SLURM."""
    value = environ.get("SLURM_RESTART_COUNT", "").strip()
    return int(value) if value.isdigit() else 0


def resume_if_requeued(comm, config, checkpoint_dir, environ=os.environ):
    """A requeued SLURM job (SLURM_RESTART_COUNT > 0) continues from its newest checkpoint by itself.

    Its run folder is named after the job id, which a requeue keeps, so
    ``--resume auto`` finds what the previous run wrote. A ``--resume PATH``
    given at submission applies only until the job has checkpoints of its own.
    """
    if not slurm_restart_count(environ) or config.resume == "auto":
        return config
    has_own = run_on_rank0(comm, lambda: bool(ckpt_io.step_checkpoints(checkpoint_dir)))
    return config if config.resume and not has_own else dataclasses.replace(config, resume="auto")


def describe_slurm(comm, environ=os.environ):
    """One line about the SLURM job this run is part of, or None outside SLURM."""
    job = environ.get("SLURM_JOB_ID")
    if not job:
        return None
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        job += f" (array {environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']})"
    restarts = slurm_restart_count(environ)
    line = f"SLURM job {job}" + (f", restart {restarts} (resuming automatically)" if restarts else "")
    allocated = environ.get("SLURM_NTASKS", "")
    if comm.size == 1 and allocated.isdigit() and int(allocated) > 1:
        line += (f"; warning: the job has {allocated} tasks but ddptrain runs as one process: "
                 f"start it with srun or mpirun to use them")
    return line


# Options that fix the parameters' layout or the sequence of global batches: resuming with
# another value would not continue the run the checkpoint belongs to.
MUST_MATCH_ON_RESUME = ("batch_size", "seed", "virtual_shards", "drop_last")


def check_fits(checkpoint, model, n_train, config=None):
    """Refuse a checkpoint from another model, data set or batch sequence."""
    where = checkpoint.path
    if checkpoint.model != model.spec:
        raise CheckpointError(f"{where}: checkpoint is for model {checkpoint.model}, not {model.spec}")
    if checkpoint.dtype != str(model.dtype):
        raise CheckpointError(f"{where}: checkpoint holds {checkpoint.dtype} parameters, not {model.dtype} "
                              f"(--dtype {checkpoint.dtype})")
    expected = dict(model.named_params())
    if set(checkpoint.params) != set(expected):
        raise CheckpointError(f"{where}: its parameters do not fit model {model.spec}")
    for name, array in checkpoint.params.items():
        if expected[name].shape != array.shape:
            raise CheckpointError(f"{where}: parameter {name} does not fit model {model.spec}")
    if checkpoint.state.get("n_train") != n_train:
        raise CheckpointError(f"{where}: checkpoint was trained on {checkpoint.state.get('n_train')} rows, "
                              f"this data file has {n_train}")
    for name in MUST_MATCH_ON_RESUME if config is not None else ():
        saved, given = checkpoint.config.get(name), getattr(config, name)
        if saved != given:
            option = "--" + name.replace("_", "-")
            raise CheckpointError(f"{where}: checkpoint was trained with {option} {saved}, not {given}; "
                                  f"resume with {option} {saved}")


def find_checkpoint(config, checkpoint_dir, warn):
    """Rank 0: the checkpoint path to resume from, or None to start fresh."""
    if not config.resume:
        return None
    if config.resume == "auto":
        found = ckpt_io.newest_valid(checkpoint_dir, warn=warn, set_aside=True)
        if found is None:
            warn(f"--resume auto: no valid checkpoint in {checkpoint_dir}; starting from the beginning")
        return found.path if found else None
    if not Path(config.resume).is_file():
        raise CheckpointError(f"{config.resume}: no such checkpoint")
    return config.resume


def load_checkpoint(config, checkpoint_dir, model, n_train, warn):
    """Rank 0: the verified checkpoint to resume from (fitting this run), or None to start fresh."""
    path = find_checkpoint(config, checkpoint_dir, warn)
    if path is None:
        return None
    checkpoint = ckpt_io.load(path)
    check_fits(checkpoint, model, n_train, config)
    return checkpoint


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


def run_training(config, comm, quiet=False, dry_run=False):
    """Train on every rank. Returns the exit status (0, or EXIT_PREEMPTED after a signal).

    ``dry_run``: check everything (options, data, model, ranks), print the start-up lines, write nothing.
    """
    # From the very start: a SIGUSR1 that SLURM sends while the ranks are still setting up
    # is remembered, and the run stops (with a checkpoint) after its first step.
    stop = StopRequest().install()
    try:
        return _set_up_and_train(config, comm, stop, quiet, dry_run)
    finally:
        stop.uninstall()


def _set_up_and_train(config, comm, stop, quiet, dry_run):
    started = time.perf_counter()
    threads, thread_line = configure_blas_threads(comm, config.threads)
    run_dir = comm.bcast(config.run_dir or default_run_dir())   # DDP: rank 0's name, everywhere
    rank0 = RankZero(comm, run_dir, quiet=quiet, log_every=config.log_every)

    data_path = resolve_data_path(comm, config, rank0.print)
    model = Sequential.from_spec(config.model, dtype=config.dtype, seed=config.seed)
    with same_on_every_rank():
        info = data.inspect(data_path)
        if model.n_inputs != info.n_features or model.n_outputs != info.n_classes:
            raise UserError(f"--model {config.model} does not fit {data_path}: its images have "
                            f"{info.n_features} pixels and {info.n_classes} classes")
        sampler.check_layout(info.n_train, config.batch_size, comm.size, config.virtual_shards)
    comm.bcast_(model.params)   # DDP: every replica starts from rank 0's parameters

    config = resume_if_requeued(comm, config, rank0.checkpoint_dir)   # SLURM requeue: --resume auto
    rank0.print(f"ddptrain {__version__}: {comm.size} rank{'s' if comm.size > 1 else ''} ({comm.library}); "
                f"{thread_line}", always=True)
    rank0.print(f"model {model.spec} ({model.params.size:,} parameters, {config.dtype}); data {data_path}; "
                f"run folder {run_dir}", always=True)
    rank0.print(describe_split(info.n_train, info.n_test, comm, config), always=True)
    rank0.print(f"peak learning rate {peak_learning_rate(config):.4g} ({config.lr_schedule}"
                f"{f', {config.warmup_epochs:g} warmup epochs' if config.warmup_epochs else ''}"
                f"{', linear scaling rule' if config.lr_scaling == 'linear' else ''}); "
                f"configuration: {config.to_json()}", always=True)
    slurm_line = describe_slurm(comm)
    if slurm_line:
        rank0.print(slurm_line, always=True)
    if dry_run:
        rank0.print(f"dry run: the options, the data file, the model and the {comm.size} rank(s) check out; "
                    f"nothing was trained or written", always=True)
        return EXIT_OK

    rank0.prepare_run_dir(config.to_dict())
    # DDP: rank 0 reads and verifies the checkpoint and broadcasts it, so that every rank
    # resumes from the same bytes or every rank stops with the same error.
    checkpoint = run_on_rank0(comm, lambda: load_checkpoint(config, rank0.checkpoint_dir, model, info.n_train,
                                                            rank0.warn))

    blocks = sampler.owned_blocks(info.n_train, comm.rank, comm.size, config.virtual_shards)
    train = Split(*data.read_rows(data_path, "train", blocks, dtype=config.dtype))
    test_rows = sampler.evaluation_block(info.n_test, comm.rank, comm.size)
    test = Split(*data.read_rows(data_path, "test", [test_rows], dtype=config.dtype))

    optimizer = SGD(momentum=config.momentum, weight_decay=config.weight_decay, nesterov=config.nesterov)
    trainer = Trainer(config, comm, model, optimizer, train, test, info.n_train, info.n_classes, rank0,
                      stop=stop)
    with same_on_every_rank():
        injected = faults.Faults.from_environment(comm.rank)   # tests only: DDPTRAIN_TEST_FAULT
    if injected is not None:
        injected.attach(trainer, rank0)
    if checkpoint is not None:
        trainer.restore(checkpoint)
        rank0.restart_metrics(trainer.position.step, checkpoint.metrics)
        written_by = checkpoint.state.get("world_size", comm.size)
        rank0.print(f"resumed from {checkpoint.path}: epoch {trainer.position.epoch + 1}, "
                    f"step {trainer.position.step}"
                    + (f" (written by {written_by} ranks, resumed on {comm.size}: the same batches, equal "
                       f"to an uninterrupted run up to rounding)" if written_by != comm.size else ""),
                    always=True)
    rank0.print(f"set-up took {time.perf_counter() - started:.2f} s")

    stopped_by = trainer.fit()
    if stopped_by:
        rank0.print(f"stopped by {stopped_by} at step {trainer.position.step}; checkpoint written; "
                    f"resume with --resume auto --run-dir {run_dir}", always=True)
        return EXIT_PREEMPTED
    if trainer.metrics:
        last = trainer.metrics[-1]
        rank0.print(f"finished: test accuracy {100 * last['test_accuracy']:.2f}% after {last['epoch']} epochs, "
                    f"{time.perf_counter() - started:.1f} s in all; run folder {run_dir}", always=True)
    return EXIT_OK
