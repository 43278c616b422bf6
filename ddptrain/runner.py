"""Setting up a training run on every rank, then ``Trainer.fit``.

Every function here runs on every rank. What differs between ranks is only
which rows they read; what only rank 0 does goes through ``rank0``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from . import __version__, data, denormals, gemm, sampler
from .callbacks import BroadcastBuffers, Checkpointing, MetricsLog, ProgressReport, ReplicaCheck
from .comm import collective
from .debug import DebugChecks
from .errors import EXIT_OK, EXIT_PREEMPTED, UserError, same_on_every_rank
from .agreement import (check_same_arrays, check_same_data_file, check_same_model, check_same_software, hosts_by_rank,
                        verdict_on_every_rank)
from .limits import check_resources
from .losses import SoftmaxCrossEntropy
from .nn import Sequential, name_layers, no_reduction, output_shape_of
from .node_memory import NodeMemory, choose_exchange
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
from .trainer import Trainer


@dataclass(frozen=True)
class Result:
    """What a run ends with, the same on every rank (its metrics are sums over all ranks)."""

    exit_status: int            # 0; EXIT_PREEMPTED when a signal stopped it (after a checkpoint)
    run_dir: str
    metrics: tuple = ()         # the per-epoch records of metrics.jsonl, this run's and those resumed
    stopped_by: str = None      # the signal that stopped the run, if one did
    steps: int = 0              # steps trained, resumed ones included
    seconds: float = 0.0        # set-up and training, in this process
    rank: int = 0               # this process's rank (to print a result once: on rank 0)
    world_size: int = 1

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
    """Train on every rank; returns the ``Result`` (exit status 0, or EXIT_PREEMPTED after a signal).

    ``dry_run``: check everything (options, data, model, ranks), print the
    start-up lines, write nothing. ``callbacks`` (``trainer.Callback``) run
    after ddptrain's own, on every rank. ``model``: a ``Sequential`` to train
    (in place) instead of ``config.model``'s; ``arrays``: ``Arrays`` to train
    on instead of ``config.data``'s file.
    """
    # From the very start: a SIGUSR1 that SLURM sends while the ranks are still setting up
    # is remembered, and the run stops (with a checkpoint) after its first step.
    stop = StopRequest().install()
    try:
        with denormals.flushed(config.denormals == "flush"):   # this thread's setting comes back afterwards
            return _run(config, comm, stop, quiet, dry_run, callbacks, model, arrays)
    finally:
        stop.uninstall()


def _run(config, comm, stop, quiet, dry_run, callbacks, model, arrays):
    started = time.perf_counter()
    console = Console(comm.rank, quiet=quiet, log_every=config.log_every)
    with same_on_every_rank():
        gemm_choice = configure_gemm(comm, config.gemm)
        blas_threads = configure_blas_threads(comm, config.threads)
    hosts = hosts_by_rank(blas_threads.hosts)
    check_same_software(comm, hosts)   # DDP: across nodes, installations may differ
    folder = RunFolder(comm, comm.bcast(config.run_dir or default_run_dir()))   # DDP: rank 0's name, everywhere
    info = open_data(comm, config, arrays, console.print, hosts)
    with same_on_every_rank():
        sampler.check_layout(info.n_train, config.batch_size, comm.size, config.virtual_shards)
    if model is None:
        model = build_model(comm, config, info, hosts)
    else:
        check_given_model(comm, model, config, info, hosts)
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
    announce(console, comm, config, model, info, folder.run_dir, blas_threads, gemm_choice)
    if dry_run:
        folder.check_free()
        console.print(f"dry run: the options, the data file, the model and the {comm.size} rank(s) check out; "
                      f"nothing was trained or written", always=True)
        return Result(EXIT_OK, folder.run_dir, seconds=time.perf_counter() - started, rank=comm.rank,
                      world_size=comm.size)

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
    # DDP: how the ranks sum the gradient (node_memory.py): through each node's shared memory, where each
    # rank updates its slice of the parameters (the optimiser sharded over the node), or with MPI.
    use_node_memory, why_not = choose_exchange(comm, config, model.params.size)
    node_memory = NodeMemory(comm, model.params.size, model.dtype) if use_node_memory else None
    if node_memory is not None:
        optimizer = ShardedOptimizer(optimizer, node_memory, model.params.size)
    elif config.shard_optimizer:
        optimizer = ShardedOptimizer(optimizer, comm, model.params.size)
    # DDP: rank 0 reads and verifies the checkpoint and broadcasts it, so that every rank
    # resumes from the same bytes or every rank stops with the same error.
    checkpoint = run_on_rank0(comm, lambda: load_checkpoint(config, folder.checkpoint_dir, model, optimizer,
                                                            info.n_train, console.warn))
    folder.write_config(config.to_dict())   # once the run is known to go ahead
    train, test = read_shards(info, comm, config, model)
    bucket_bytes = int(config.bucket_mb * 2 ** 20) if config.overlap_allreduce else None
    trainer = Trainer(TrainStep(model, SoftmaxCrossEntropy(), optimizer, comm, config.clip_grad_norm or None,
                                config.accumulate, bucket_bytes),
                      TrainingPlan(config, info.n_train, comm.rank, comm.size), train, test, info.n_classes,
                      stop, standard_callbacks(config, console, folder, model.buffers.size > 0) + list(callbacks))
    if checkpoint is not None:
        trainer.restore(checkpoint)
        console.print(describe_resume(checkpoint, trainer.position, comm.size), always=True)
    if comm.size > 1:
        console.print(describe_exchange(node_memory, why_not, config), always=True)
    if node_memory is not None:
        node_memory.place(model)   # the parameters every rank holds (restored or broadcast), shared from now on
    folder.rewrite_metrics(trainer.records)   # what the checkpoint recorded, or nothing: no record twice
    console.print(f"set-up took {time.perf_counter() - run.started:.2f} s")

    stopped_by = trainer.fit()
    if node_memory is not None:
        node_memory.release(model)   # the model keeps private copies (a collective: not after an error)
    result = Result(EXIT_PREEMPTED if stopped_by else EXIT_OK, folder.run_dir, tuple(trainer.metrics), stopped_by,
                    trainer.position.step, time.perf_counter() - run.started, comm.rank, comm.size)
    if stopped_by:
        console.print(f"stopped by {stopped_by} at step {trainer.position.step}; checkpoint written; "
                      f"resume with --resume auto --run-dir {folder.run_dir}", always=True)
    elif trainer.metrics:
        console.print(f"finished: test accuracy {100 * result.test_accuracy:.2f}% after {result.epochs} epochs, "
                      f"{result.seconds:.1f} s in all; run folder {folder.run_dir}", always=True)
    return result


def open_data(comm, config, arrays, rank0_print, hosts):
    """The data's description (``DatasetInfo``), checked on every rank: the in-memory ``arrays`` (the same on
    every rank), or the file of ``--data`` (a damaged one cannot hang a rank), the same file on every rank."""
    if arrays is not None:
        check_same_arrays(comm, arrays)   # DDP: every rank must hold the same data
        return arrays.inspect()
    data_path = resolve_data_path(comm, config, rank0_print)
    run_on_rank0(comm, lambda: data.check_readable(data_path))   # DDP: a damaged file cannot hang a rank
    info = verdict_on_every_rank(comm, lambda: data.inspect(data_path), hosts)   # DDP: each node its own view
    check_same_data_file(comm, info, hosts)
    return info


def build_model(comm, config, info, hosts):
    """The model of ``--model``, for this data: its layers are checked against the data and the memory
    before any array is allocated."""
    spec = parse_spec(config.model)
    with same_on_every_rank():
        layers = spec.layers(info.image_shape)
        name_layers(layers)   # as the model will: messages name "linear1", not "Linear"
        check_fits_data(layers, info, f"--model {config.model}")
    check_resources_on_every_rank(comm, layers, config, info, hosts)
    return Sequential(layers, dtype=config.dtype, seed=config.seed, spec=spec.describe())


def check_given_model(comm, model, config, info, hosts):
    """A model built by the caller must take this data, in the run's dtype, and fit the memory with it."""
    check_same_model(comm, model)   # DDP: every rank must train the same network
    with same_on_every_rank():
        if str(model.dtype) != config.dtype:
            raise UserError(f"the model holds {model.dtype} parameters but the run is {config.dtype} (dtype="
                            f"{config.dtype!r}): build it with nn.Sequential(layers, dtype=np.{config.dtype}) "
                            f"or leave dtype unset")
        check_fits_data(model.layers, info, f"the model ({model.summary()})")
    check_resources_on_every_rank(comm, model.layers, config, info, hosts)


def resolve_data_path(comm, config, rank0_print):
    """The data file: --data (a path, or the name of a known set such as fashion-mnist, prepared in the
    cache), or the prepared MNIST in the cache. Rank 0 prepares a set that is missing."""
    from . import datasets
    if config.data and config.data not in datasets.KNOWN_DATASETS:
        return config.data
    name = config.data or "mnist"
    return run_on_rank0(comm, lambda: str(datasets.ensure_prepared(name, log=rank0_print)))


def check_resources_on_every_rank(comm, layers, config, info, hosts):
    """Refuse options that ask for more memory than a host has; every rank stops if one must. ``hosts``: each
    rank's host, whose ranks share its memory."""
    ranks_on_host = hosts.count(hosts[comm.rank])
    verdict_on_every_rank(comm, lambda: check_resources(layers, config, info, comm.size, ranks_on_host), hosts)


def check_fits_data(layers, info, what):
    """The layers must take the file's images and give one output per class (UserError otherwise)."""
    try:
        shape = output_shape_of(layers, info.image_shape)
    except UserError as error:
        raise UserError(f"{what} does not fit {info.path}: its images are {info.image_text}, and "
                        f"{error}") from None
    if shape != (info.n_classes,):
        raise UserError(f"{what} does not fit {info.path}: it gives {'x'.join(map(str, shape))} outputs per "
                        f"image, and the data has {info.n_classes} classes")


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
    train = read_split(info, "train", blocks, config.dtype, model)
    test_rows = sampler.evaluation_block(info.n_test, comm.rank, comm.size)
    return train, read_split(info, "test", [test_rows], config.dtype, model)


def read_split(info, split, blocks, dtype, model):
    """The rows of ``blocks`` of ``split`` of the data ``info`` describes, as a Split, images shaped as
    ``model`` takes them."""
    images, labels = info.read_rows(split, blocks, dtype=info.stored_dtype(dtype))   # a file's: uint8 pixels
    return Split(model.as_input(images), labels, np.dtype(dtype))


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


@collective
def configure_gemm(comm, request):
    """Multiply with the library ``--gemm request`` names (``gemm.choose``) on every rank; this rank's Choice.
    A rank that cannot (no MKL on its node) stops every rank with its reason; ``auto`` takes MKL only where
    every rank can, and numpy's BLAS on every rank otherwise. Made before the BLAS threads are set (they are
    set for the library loaded), so before the hosts are known: a reason names the rank."""
    # DDP: the verdict of every rank, so that no rank goes on alone into the collectives ahead
    choice = verdict_on_every_rank(comm, lambda: gemm.choose(request), hosts=None)
    # DDP: auto picks per node (MKL where it is installed on an Intel CPU). Ranks whose nodes differ would
    # round differently, and the start-up line, rank 0's, would name one library for all: so one library for
    # every rank, numpy's unless every rank can take MKL.
    if request == "auto":   # the same request on every rank: all of them gather, or none
        choices = comm.allgather(choice)
        without_mkl = next((rank for rank, other in enumerate(choices) if other.name != "mkl"), None)
        if choice.name == "mkl" and without_mkl is not None:
            choice = gemm.Choice("numpy", f"{gemm.choose('numpy').description} (MKL only if every rank can take "
                                          f"it, and rank {without_mkl} cannot: {choices[without_mkl].reason})")
    gemm.use(choice)
    return choice


def announce(console, comm, config, model, info, run_dir, blas_threads, gemm_choice):
    """The start-up lines, on rank 0."""
    where = f" on {blas_threads.host_line}" if len(blas_threads.hosts) > 1 else ""
    console.print(f"ddptrain {__version__}: {comm.size} rank{'s' if comm.size > 1 else ''}{where} ({comm.library}); "
                  f"{blas_threads.description}; matrix products: {gemm_choice.description}; "
                  f"{denormals.describe(config.denormals)}", always=True)
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


def describe_exchange(node_memory, why_not, config):
    if node_memory is None:
        return (f"gradients: MPI Allreduce{' in buckets during backward' if config.overlap_allreduce else ''}"
                f"{', optimiser state sharded' if config.shard_optimizer else ''}"
                f"{f' ({why_not})' if why_not and config.exchange == 'auto' else ''}")
    nodes = node_memory.across.size
    return (f"gradients: summed in shared memory by the {node_memory.size} ranks of "
            f"{'each of the ' + str(nodes) + ' nodes, then across nodes by MPI' if nodes > 1 else 'this node'}; "
            f"each rank updates 1/{node_memory.size} of the shared parameters")


def describe_resume(checkpoint, position, world_size):
    written_by = checkpoint.state["world_size"]
    return (f"resumed from {checkpoint.path}: epoch {position.epoch + 1}, step {position.step}"
            + (f" (written by {written_by} ranks, resumed on {world_size}: the same batches, equal "
               f"to an uninterrupted run up to rounding)" if written_by != world_size else ""))
