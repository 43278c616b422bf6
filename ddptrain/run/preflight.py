"""Every check a run makes before it allocates or writes anything, in one place, with one frozen
result.

Data parallelism itself needs little at start-up: every rank must start from
rank 0's parameters and buffers (two broadcasts, in ``runner``). Everything
else here is a check that every rank agrees, or that the job can run at all,
made before any rank allocates a model or writes a file, and each stops every
rank with the same one-line error rather than leave one rank waiting in a
collective:

1. the library of the matrix products and the BLAS threads of each rank;
2. the same ddptrain, numpy and MPI on every host; tensorboardX on rank 0 for --tensorboard;
3. the data: the same file (or the same in-memory arrays) on every rank,
   readable without hanging, and enough rows for the ranks and the batch;
4. the model: its layers take the data's images and give one output per
   class, the same network on every rank, within the memory of each host
   (with each rank's shard in memory, or streamed: ``data_memory``), with
   enough values per channel for batch normalisation;
5. SLURM's requeue: a requeued job resumes by itself.

``preflight`` returns a ``Preflight``; ``runner`` sets the run up from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ddptrain.backends import gemm
from ddptrain.backends.threads import BlasThreads, configure_blas_threads
from ddptrain.data import datasets, sampler
from ddptrain.data.format import DatasetInfo, inspect
from ddptrain.data.readable import check_readable
from ddptrain.distributed.agreement import (
    check_same_arrays,
    check_same_data_file,
    check_same_model,
    check_same_software,
    hosts_by_rank,
    verdict_on_every_rank,
)
from ddptrain.distributed.slurm import default_run_dir, resume_if_requeued
from ddptrain.errors import CheckpointError, UserError, same_on_every_rank
from ddptrain.files import check_regular_file
from ddptrain.nn.model import input_shape_of, name_layers, output_shape_of
from ddptrain.nn.normalization import BatchNorm
from ddptrain.nn.spec import parse_spec
from ddptrain.run.data_memory import DataPlan, plan_data
from ddptrain.run.limits import check_resources, data_room
from ddptrain.run.rank0 import RunFolder, import_tensorboardx, run_on_rank0
from ddptrain.training.row_threads import row_threads_of_run


@dataclass(frozen=True)
class Preflight:
    """What the checks established, the same on every rank (but ``hosts``' view of this rank)."""

    config: object               # the run's Config (``--resume auto`` where SLURM requeued the job)
    backend: gemm.Backend        # what the model and the optimiser compute with
    gemm_choice: gemm.Choice     # which library, and why: for the start-up line
    blas_threads: BlasThreads    # each rank's BLAS threads, and which ranks share a host
    hosts: tuple                 # each rank's host name, by rank
    folder: RunFolder            # rank 0's run folder (nothing written yet)
    info: DatasetInfo            # the data: its file (or arrays), its shapes and classes
    # the --model's layers, checked, without arrays (None: the caller's model)
    layers: Optional[tuple]
    model_spec: Optional[str]    # the --model string they were built from, as the model records it
    data: DataPlan = None        # what each rank holds of the training rows: in memory, or streamed


def preflight(comm, config, console, model=None, arrays=None):
    """Run every start-up check on every rank (a collective); the ``Preflight``, or the same
    UserError on every rank. ``model``: the caller's Sequential, checked instead of building
    ``config.model``'s layers; ``arrays``: in-memory data instead of ``config.data``'s file."""
    with same_on_every_rank():
        # --reproducible multiplies with numpy's BLAS (config.validated refused --gemm mkl)
        gemm_choice = configure_gemm(comm, "numpy" if config.reproducible else config.gemm)
        backend = gemm.backend(gemm_choice)
        blas_threads = configure_blas_threads(comm, config.threads, backend.name)
    hosts = hosts_by_rank(blas_threads.hosts)
    check_same_software(comm, hosts)   # DDP: across nodes, installations may differ
    if config.tensorboard:   # rank 0 writes the events: only rank 0 needs tensorboardX, and loads
        run_on_rank0(comm, lambda: import_tensorboardx() and None)
    # DDP: rank 0's name, everywhere
    folder = RunFolder(comm, comm.bcast(config.run_dir or default_run_dir()))
    info = open_data(comm, config, arrays, console.print, hosts)
    with same_on_every_rank():
        sampler.check_layout(info.n_train, config.batch_size, comm.size, config.virtual_shards)
    if model is None:
        layers, model_spec, data = check_model_spec(comm, config, info, hosts,
                                                    blas_threads.threads)
    else:
        data = check_given_model(comm, model, config, info, hosts, blas_threads.threads)
        layers = model_spec = None
    trained = model.layers if model is not None else layers
    with same_on_every_rank():
        check_batch_statistics(trained, info, config, comm.size)
        if config.accumulate > 1 and any(isinstance(layer, BatchNorm) for layer in trained):
            raise UserError(f"--accumulate {config.accumulate} with batch normalisation "
                            f"({config.model}): its statistics would be those of each micro-batch, "
                            "and the run would not be the one without accumulation; "
                            "drop one of them")
    if config.resume not in (None, "auto"):   # rank 0 reads it (resume.load_checkpoint): there
        run_on_rank0(comm, lambda: check_regular_file(config.resume, "checkpoint", CheckpointError,
                                                      "no such checkpoint"))
    # SLURM requeue: --resume auto
    config = resume_if_requeued(config, folder.has_step_checkpoints)
    return Preflight(config, backend, gemm_choice, blas_threads, tuple(hosts), folder, info,
                     None if layers is None else tuple(layers), model_spec, data)


def configure_gemm(comm, request):
    """The library ``--gemm request`` names (``gemm.choose``), the same on every rank: its
    ``Choice``. A rank that cannot (no MKL on its node) stops every rank with its reason; ``auto``
    takes MKL only where every rank can, and numpy's BLAS on every rank otherwise. Made before the
    BLAS threads are set (they are set for the library chosen), so before the hosts are known: a
    reason names the rank."""
    # DDP: the verdict of every rank, so that no rank goes on alone into the collectives ahead
    choice = verdict_on_every_rank(comm, lambda: gemm.choose(request), hosts=None)
    # DDP: auto picks per node (MKL where it is installed on an Intel CPU). Ranks whose nodes differ
    # would round differently, and the start-up line, rank 0's, would name one library for all: so
    # one library for every rank, numpy's unless every rank can take MKL.
    if request == "auto":   # the same request on every rank: all of them gather, or none
        choices = comm.allgather(choice)
        without_mkl = next((rank for rank, other in enumerate(choices) if other.name != "mkl"),
                           None)
        if choice.name == "mkl" and without_mkl is not None:
            choice = gemm.Choice("numpy", f"{gemm.choose('numpy').description} (MKL only if every "
                                 f"rank can take it, and rank {without_mkl} cannot: "
                                 f"{choices[without_mkl].reason})")
    return choice


def open_data(comm, config, arrays, rank0_print, hosts):
    """The data's description (``DatasetInfo``), checked on every rank: the in-memory ``arrays``
    (the same on every rank), or the file of ``--data`` (a damaged one cannot hang a rank), the same
    file on every rank."""
    if arrays is not None:
        check_same_arrays(comm, arrays)   # DDP: every rank must hold the same data
        return arrays.inspect()
    data_path = resolve_data_path(comm, config, rank0_print)
    run_on_rank0(comm, lambda: check_readable(data_path))   # DDP: a damaged file cannot hang a rank
    # DDP: each node its own view
    info = verdict_on_every_rank(comm, lambda: inspect(data_path), hosts)
    check_same_data_file(comm, info, hosts)
    return info


def resolve_data_path(comm, config, rank0_print):
    """The data file: --data (a path, or the name of a known set such as fashion-mnist, prepared in
    the cache), or the prepared MNIST in the cache. Rank 0 prepares a set that is missing."""
    if config.data and config.data not in datasets.KNOWN_DATASETS:
        return config.data
    name = config.data or "mnist"
    return run_on_rank0(comm, lambda: str(datasets.ensure_prepared(name, log=rank0_print)))


def check_model_spec(comm, config, info, hosts, threads):
    """The layers of ``--model`` for this data, without arrays, checked against the data and the
    memory before anything is allocated; and the spec's description."""
    spec = parse_spec(config.model)
    with same_on_every_rank():
        layers = spec.layers(info.image_shape)
        name_layers(layers)   # as the model will: messages name "linear1", not "Linear"
        check_fits_data(layers, info, f"--model {config.model}")
    data = check_resources_on_every_rank(comm, layers, config, info, hosts, threads)
    return layers, spec.describe(), data


def check_given_model(comm, model, config, info, hosts, threads):
    """A model built by the caller must take this data, in the run's dtype, and fit the memory with
    it."""
    check_same_model(comm, model)   # DDP: every rank must train the same network
    with same_on_every_rank():
        if str(model.dtype) != config.dtype:
            raise UserError(f"the model holds {model.dtype} parameters but the run is "
                            f"{config.dtype} (dtype={config.dtype!r}): build it with "
                            f"nn.Sequential(layers, dtype=np.{config.dtype}) or leave dtype unset")
        check_fits_data(model.layers, info, f"the model ({model.summary()})")
    return check_resources_on_every_rank(comm, model.layers, config, info, hosts, threads)


def check_resources_on_every_rank(comm, layers, config, info, hosts, threads):
    """What each rank holds of the data (``DataPlan``: in memory, or streamed where its shard does
    not fit), and a refusal of options that ask for more memory than a host has; every rank stops
    if one must. ``hosts``: each rank's host, whose ranks share its memory; ``threads``: each
    rank's (its row threads' replicas count)."""
    ranks_on_host = hosts.count(hosts[comm.rank])
    row_threads = row_threads_of_run(config, layers, threads)
    room, in_memory = data_room(layers, config, info, comm.size, ranks_on_host, row_threads,
                                threads)
    # DDP: the same plan on every rank (the order of the rows depends on it): the least room any
    # rank has, and rank 0's file's chunks (copies on other nodes may be chunked otherwise)
    rooms = [r for r in comm.allgather(room) if r is not None]
    block_rows = comm.bcast(info.chunk_rows)
    with same_on_every_rank():
        data = plan_data(config, info, comm.size, min(rooms) if rooms else None, in_memory,
                         block_rows)
    verdict_on_every_rank(comm, lambda: check_resources(
        layers, config, info, comm.size, ranks_on_host, data.data_bytes(info, config, comm.size),
        row_threads, threads), hosts)
    return data


def check_fits_data(layers, info, what):
    """The layers must take the file's images and give one output per class (UserError
    otherwise)."""
    try:
        shape = output_shape_of(layers, info.image_shape)
    except UserError as error:
        raise UserError(f"{what} does not fit {info.path}: its images are {info.image_text}, and "
                        f"{error}") from None
    if shape != (info.n_classes,):
        raise UserError(f"{what} does not fit {info.path}: it gives {'x'.join(map(str, shape))} "
                        f"outputs per image, and the data has {info.n_classes} classes")


def check_batch_statistics(layers, info, config, world_size):
    """Batch normalisation needs at least 2 values per channel to take a variance of: in every
    global batch (--batchnorm global), or in every rank's share of one (local). UserError
    otherwise."""
    full = min(config.batch_size, info.n_train)
    last = 0 if config.drop_last else info.n_train % config.batch_size
    smallest = min(b for b in (full, last) if b)
    shape = input_shape_of(layers, info.image_shape)
    for layer in layers:
        if isinstance(layer, BatchNorm):
            per_sample = layer.values_per_channel(layer.output_shape(shape))
            values = (smallest * per_sample if config.batchnorm == "global"
                      else smallest // world_size * per_sample)
            if values < 2:
                what = (f"a global batch of {smallest}" if smallest == full else
                        f"the last, short global batch of an epoch ({info.n_train} rows in batches "
                        f"of {config.batch_size})")
                hint = ("" if smallest == full
                        else ": add --drop-last or choose another --batch-size")
                if config.batchnorm == "global":
                    raise UserError(f"--model {config.model}: batch normalisation needs at least 2 "
                                    f"values per channel in every global batch, but {what} gives "
                                    f"layer {layer.name} {values}{hint}")
                raise UserError("--batchnorm local needs at least 2 values per channel on every "
                                f"rank, but a rank's share of {what} gives layer {layer.name} "
                                f"{values}{hint}")
        shape = layer.output_shape(shape)
