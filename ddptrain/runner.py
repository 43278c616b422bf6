"""Setting up a training run on every rank, then ``Trainer.fit``.

Every function here runs on every rank. What differs between ranks is only
which rows they read; what only rank 0 does goes through ``rank0``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from . import __version__, data, sampler
from .callbacks import BroadcastBuffers, Checkpointing, MetricsLog, ProgressReport, ReplicaCheck
from .debug import DebugChecks
from .errors import EXIT_OK, EXIT_PREEMPTED, UserError, same_on_every_rank
from .limits import check_resources
from .losses import SoftmaxCrossEntropy
from .nn import Sequential, no_reduction, output_shape_of
from .normalization import BatchNorm
from .plan import TrainingPlan
from .rank0 import Console, RunFolder, run_on_rank0
from .resume import load_checkpoint
from .schedule import peak_learning_rate
from .sharding import ShardedOptimizer
from .signals import StopRequest
from .slurm import default_run_dir, describe_slurm, resume_if_requeued
from .spec import parse_spec
from .step import Split, TrainStep
from .threads import configure_blas_threads
from .train import Trainer


def run_training(config, comm, quiet=False, dry_run=False, callbacks=()):
    """Train on every rank. Returns the exit status (0, or EXIT_PREEMPTED after a signal).

    ``dry_run``: check everything (options, data, model, ranks), print the
    start-up lines, write nothing. ``callbacks`` (``train.Callback``) run
    after ddptrain's own, on every rank.
    """
    # From the very start: a SIGUSR1 that SLURM sends while the ranks are still setting up
    # is remembered, and the run stops (with a checkpoint) after its first step.
    stop = StopRequest().install()
    try:
        return _run(config, comm, stop, quiet, dry_run, callbacks)
    finally:
        stop.uninstall()


def _run(config, comm, stop, quiet, dry_run, callbacks):
    started = time.perf_counter()
    console = Console(comm.rank, quiet=quiet, log_every=config.log_every)
    with same_on_every_rank():
        blas_threads = configure_blas_threads(comm, config.threads)
    folder = RunFolder(comm, comm.bcast(config.run_dir or default_run_dir()))   # DDP: rank 0's name, everywhere
    data_path = resolve_data_path(comm, config, console.print)
    run_on_rank0(comm, lambda: data.check_readable(data_path))   # DDP: a damaged file cannot hang a rank
    with same_on_every_rank():
        info = data.inspect(data_path)
        sampler.check_layout(info.n_train, config.batch_size, comm.size, config.virtual_shards)
    spec = parse_spec(config.model)
    with same_on_every_rank():
        # The layers alone, without their arrays: a model that does not fit the data, or is too large
        # for the memory, is refused before anything is allocated.
        layers = spec.layers(info.image_shape)
        check_fits_data(layers, info, f"--model {config.model}")
    check_resources_on_every_rank(comm, layers, config, info, blas_threads.ranks_on_host)
    model = Sequential(layers, dtype=config.dtype, seed=config.seed, spec=spec.describe())
    # DDP: batch statistics of the global batch (--batchnorm global), or of each rank's rows.
    model.set_sum_over_ranks(comm.allreduce_ if config.batchnorm == "global" else no_reduction)
    with same_on_every_rank():
        check_batch_statistics(model, info, config, comm.size)
        if config.accumulate > 1 and any(isinstance(layer, BatchNorm) for layer in model.layers):
            raise UserError(f"--accumulate {config.accumulate} with batch normalisation ({config.model}): its "
                            f"statistics would be those of each micro-batch, and the run would not be the one "
                            f"without accumulation; drop one of them")
    comm.bcast_(model.params)    # DDP: every replica starts from rank 0's parameters
    comm.bcast_(model.buffers)   # DDP: and buffers

    config = resume_if_requeued(config, folder.has_step_checkpoints)   # SLURM requeue: --resume auto
    announce(console, comm, config, model, info, folder.run_dir, blas_threads.description)
    if dry_run:
        folder.check_free()
        console.print(f"dry run: the options, the data file, the model and the {comm.size} rank(s) check out; "
                      f"nothing was trained or written", always=True)
        return EXIT_OK

    try:
        folder.take()   # one run at a time in a run folder
        return _train(_Run(config, comm, console, folder, model, info, started), stop, callbacks)
    finally:
        folder.release()


@dataclass(frozen=True)
class _Run:
    """What the set-up established, for the training that follows."""

    config: object
    comm: object
    console: Console
    folder: RunFolder
    model: Sequential
    info: data.DatasetInfo   # info.path: the data file
    started: float


def _train(run, stop, callbacks):
    config, comm, console, folder, model, info = run.config, run.comm, run.console, run.folder, run.model, run.info
    optimizer = config.make_optimizer()
    if config.shard_optimizer:
        optimizer = ShardedOptimizer(optimizer, comm, model.params.size)
    # DDP: rank 0 reads and verifies the checkpoint and broadcasts it, so that every rank
    # resumes from the same bytes or every rank stops with the same error.
    checkpoint = run_on_rank0(comm, lambda: load_checkpoint(config, folder.checkpoint_dir, model, optimizer,
                                                            info.n_train, console.warn))
    folder.write_config(config.to_dict())   # once the run is known to go ahead
    train, test = read_shards(info, comm, config, model)
    trainer = Trainer(TrainStep(model, SoftmaxCrossEntropy(), optimizer, comm, config.clip_grad_norm or None,
                                config.accumulate),
                      TrainingPlan(config, info.n_train, comm.rank, comm.size), train, test, info.n_classes,
                      stop, standard_callbacks(config, console, folder, model.buffers.size > 0) + list(callbacks))
    if checkpoint is not None:
        trainer.restore(checkpoint)
        console.print(describe_resume(checkpoint, trainer.position, comm.size), always=True)
    folder.rewrite_metrics(trainer.records)   # what the checkpoint recorded, or nothing: no record twice
    console.print(f"set-up took {time.perf_counter() - run.started:.2f} s")

    stopped_by = trainer.fit()
    if stopped_by:
        console.print(f"stopped by {stopped_by} at step {trainer.position.step}; checkpoint written; "
                      f"resume with --resume auto --run-dir {folder.run_dir}", always=True)
        return EXIT_PREEMPTED
    if trainer.metrics:
        last = trainer.metrics[-1]
        console.print(f"finished: test accuracy {100 * last['test_accuracy']:.2f}% after {last['epoch']} epochs, "
                      f"{time.perf_counter() - run.started:.1f} s in all; run folder {folder.run_dir}", always=True)
    return EXIT_OK


def resolve_data_path(comm, config, rank0_print):
    """The data file: --data, or the prepared MNIST in the cache (rank 0 prepares it if missing)."""
    if config.data:
        return config.data
    from . import mnist
    return run_on_rank0(comm, lambda: str(mnist.ensure_default_dataset(log=rank0_print)))


def check_resources_on_every_rank(comm, layers, config, info, ranks_on_host):
    """Refuse options that ask for more memory than a host has; every rank stops if one must."""
    try:
        check_resources(layers, config, info, comm.size, ranks_on_host)
        problem = None
    except UserError as error:
        problem = str(error)
    problems = [p for p in comm.allgather(problem) if p]   # DDP: hosts may differ; the verdict may not
    if problems:
        failure = UserError(problems[0])
        failure.all_ranks = True
        raise failure


def check_fits_data(layers, info, what):
    """The layers must take the file's images and give one output per class (UserError otherwise)."""
    try:
        shape = output_shape_of(layers, info.image_shape)
    except UserError as error:
        raise UserError(f"{what} does not fit {info.path}: its images are "
                        f"{'x'.join(map(str, info.image_shape))}, and {error}") from None
    if shape != (info.n_classes,):
        raise UserError(f"{what} does not fit {info.path}: it gives {'x'.join(map(str, shape))} outputs per "
                        f"image, and the file has {info.n_classes} classes")


def check_batch_statistics(model, info, config, world_size):
    """Batch normalisation needs at least 2 values per channel to take a variance of: in every global
    batch (--batchnorm global), or in every rank's share of one (local). UserError otherwise."""
    full = min(config.batch_size, info.n_train)
    last = 0 if config.drop_last else info.n_train % config.batch_size
    smallest = min(b for b in (full, last) if b)
    shape = model.input_shape(info.image_shape)
    for layer in model.layers:
        if isinstance(layer, BatchNorm):
            per_sample = layer.values_per_channel(layer.output_shape(shape))
            values = smallest * per_sample if config.batchnorm == "global" else smallest // world_size * per_sample
            if values < 2:
                what = (f"a global batch of {smallest}" if smallest == full else
                        f"the last, short global batch of an epoch ({info.n_train} rows in batches of "
                        f"{config.batch_size})")
                hint = "" if smallest == full else ": add --drop-last or choose another --batch-size"
                if config.batchnorm == "global":
                    raise UserError(f"--model {config.model}: batch normalisation needs at least 2 values per "
                                    f"channel in every global batch, but {what} gives layer {layer.name} "
                                    f"{values}{hint}")
                raise UserError(f"--batchnorm local needs at least 2 values per channel on every rank, but a "
                                f"rank's share of {what} gives layer {layer.name} {values}{hint}")
        shape = layer.output_shape(shape)


def read_shards(info, comm, config, model):
    """This rank's training shard (its virtual shards) and its contiguous block of the test rows,
    shaped as ``model`` takes them."""
    blocks = sampler.owned_blocks(info.n_train, comm.rank, comm.size, config.virtual_shards)
    train = read_split(info.path, "train", blocks, config.dtype, model)
    test_rows = sampler.evaluation_block(info.n_test, comm.rank, comm.size)
    return train, read_split(info.path, "test", [test_rows], config.dtype, model)


def read_split(path, split, blocks, dtype, model):
    """The rows of ``blocks`` of ``split`` as a Split, images shaped as ``model`` takes them."""
    images, labels = data.read_rows(path, split, blocks, dtype=dtype)
    return Split(model.as_input(images), labels)


def standard_callbacks(config, console, folder, model_has_buffers):
    """ddptrain's own work around the loop, in the order it runs after a step: check, report, record, save."""
    callbacks = [ReplicaCheck(config.check_every), ProgressReport(console),
                 MetricsLog(folder, config.metrics_every),
                 Checkpointing(folder, config.checkpoint_every, config.keep)]
    if config.batchnorm == "local" and model_has_buffers:
        callbacks.insert(0, BroadcastBuffers())
    if config.debug:
        callbacks.insert(0, DebugChecks(console, seed=config.seed, per_rank_statistics=config.batchnorm == "local"))
    return callbacks


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


def announce(console, comm, config, model, info, run_dir, thread_line):
    """The start-up lines, on rank 0."""
    console.print(f"ddptrain {__version__}: {comm.size} rank{'s' if comm.size > 1 else ''} ({comm.library}); "
                  f"{thread_line}", always=True)
    console.print(f"model {model.summary()} ({model.params.size:,} parameters, {config.dtype}); data {info.path}; "
                  f"run folder {run_dir}", always=True)
    console.print(describe_split(info.n_train, info.n_test, comm, config), always=True)
    console.print(f"peak learning rate {peak_learning_rate(config):.4g} ({config.lr_schedule}"
                  f"{f', {config.warmup_epochs:g} warmup epochs' if config.warmup_epochs else ''}"
                  f"{', linear scaling rule' if config.lr_scaling == 'linear' else ''}); "
                  f"configuration: {config.to_json()}", always=True)
    slurm_line = describe_slurm(comm.size)
    if slurm_line:
        console.print(slurm_line, always=True)


def describe_resume(checkpoint, position, world_size):
    written_by = checkpoint.state["world_size"]
    return (f"resumed from {checkpoint.path}: epoch {position.epoch + 1}, step {position.step}"
            + (f" (written by {written_by} ranks, resumed on {world_size}: the same batches, equal "
               f"to an uninterrupted run up to rounding)" if written_by != world_size else ""))
