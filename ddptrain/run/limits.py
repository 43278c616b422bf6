"""One home for limits: what the options imply, checked against the machine before anything is
allocated.

An option can be valid on its own and still ask for more than the machine
has: ``--model 784-100000000-10`` (300 GiB of parameters). (``--threads``
beyond a rank's cores is refused where the threads are set, in
``threads.py``.) ``check_resources`` estimates what a rank will allocate (the model
with its gradients and optimiser state, its share of the data, the
activations of its share of a batch) from the options and the data file's
description alone, and refuses, with one line, what would not fit. It runs
in ``--dry-run`` as in a run, before the model exists.
"""

from __future__ import annotations

import copy
import math
import os

import numpy as np

from ddptrain.errors import UserError
from ddptrain.nn.model import input_shape_of
from ddptrain.training.groups import copied_layers, groups_of_run, with_group_blocks
from ddptrain.training.row_threads import suit_threads

GIB = 2 ** 30
MEMORY_SHARE = 0.9    # of the memory available now, that the ranks of a host may plan to use


def available_memory():
    """Bytes of memory available to new allocations on this host (MemAvailable), or None if
    unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def estimate_rank_bytes(layers, config, info, world_size, data_bytes=None, row_threads=1,
                        threads=1):
    """``{part: bytes}`` one rank allocates for a model of ``layers`` (not yet in a model: no
    arrays) on this data. ``data_bytes``: what it holds of the data when streamed (``data_memory``);
    None: its shard and test block, in memory. ``row_threads`` T > 1 (``training/row_threads.py``):
    T - 1 replicas, each with gradients, buffers and layers' work blocks of its own (their
    activations are their slices of the same rows). ``--reproducible``: the whole batch on every
    rank, or in groups of rows (``training/groups.py``) a replica of the model for each of the
    rank's ``threads`` but one, a row of gradients per group it holds, and a copy per group of the
    trunk's layers that run once per group."""
    itemsize = np.dtype(config.dtype).itemsize
    shape = input_shape_of(layers, info.image_shape)
    groups = groups_of_run(config, layers)
    if row_threads > 1:   # the threads' layers, whose blocks are larger
        layers = suit_threads([copy.copy(layer) for layer in layers])
    elif groups:   # and those of groups of rows
        layers = with_group_blocks(layers)
    n_params = sum(math.prod(size) for layer in layers for size in layer.param_shapes().values())
    n_buffers = sum(math.prod(size) for layer in layers for size in layer.buffer_shapes().values())
    per_sample, fixed = math.prod(shape), 0
    for layer in layers:
        output = layer.output_shape(shape)
        # its output, its input gradient and its masks or normalised copies, and its work arrays
        per_sample += 4 * math.prod(output) + layer.workspace(shape)
        fixed += layer.block_bytes()
        shape = output
    # a micro-batch (--reproducible without groups: of the whole batch)
    sharing = 1 if config.reproducible and not groups else world_size
    rows = -(-min(config.batch_size, info.n_train) // sharing // config.accumulate)
    replicas = (row_threads - 1) + (threads - 1 if groups else 0)
    group_rows = -(-groups // world_size)   # the groups a rank holds: a gradient row each
    copied = sum(layer.block_bytes() for layer in copied_layers(layers)) if groups else 0
    eval_rows = min(config.eval_batch, -(-info.n_test // world_size))
    pixels = math.prod(info.image_shape)
    in_memory = ((-(-info.n_train // world_size) + -(-info.n_test // world_size))
                 * (pixels * info.stored_dtype(config.dtype).itemsize + 8))
    return {
        # parameters, gradients, the momentum buffer and the optimiser's scratch array; the buffers;
        # the replicas' gradients and buffers
        "the model and its optimiser": (4 * n_params + n_buffers + group_rows * n_params
                                        + replicas * (n_params + n_buffers)) * itemsize,
        # this rank's training shard and test block, as stored (a file's: uint8 pixels), with their
        # labels; streamed, its windows and a chunk of test rows
        "this rank's data": in_memory if data_bytes is None else data_bytes,
        # what each layer keeps per sample, for a batch share and an evaluation chunk
        "activations": ((rows + eval_rows) * per_sample * itemsize + (1 + replicas) * fixed
                        + group_rows * copied),
    }


def data_room(layers, config, info, world_size, ranks_on_host, row_threads=1, threads=1):
    """``(room, shard)``: the bytes this rank may give the data on this host beside its model and
    activations (None: the memory is unknown), and what its shard and test block take in memory."""
    parts = estimate_rank_bytes(layers, config, info, world_size, row_threads=row_threads,
                                threads=threads)
    shard = parts.pop("this rank's data")
    available = available_memory()
    if available is None:
        return None, shard
    return int(MEMORY_SHARE * available / ranks_on_host - sum(parts.values())), shard


def check_resources(layers, config, info, world_size, ranks_on_host, data_bytes=None,
                    row_threads=1, threads=1):
    """A UserError if the options ask for more memory than this host has (cores: ``threads.py``).
    ``data_bytes``: what a rank holds of the data when it is streamed (None: in memory)."""
    parts = estimate_rank_bytes(layers, config, info, world_size, data_bytes, row_threads,
                                threads)
    needed, available = sum(parts.values()) * ranks_on_host, available_memory()
    if available is not None and needed > MEMORY_SHARE * available:
        detail = ", ".join(f"{name} {size / GIB:,.1f} GiB" for name, size in parts.items())
        raise UserError(f"--model {config.model} with --batch-size {config.batch_size} needs about "
                        f"{sum(parts.values()) / GIB:,.1f} GiB per rank ({detail}), "
                        f"{ranks_on_host} rank(s) on this host, and it has {available / GIB:,.1f} "
                        "GiB available")
