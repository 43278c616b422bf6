"""Streamed shards against shards in memory: the step rates, and the file read against the disk.

The rows "ddpPm" and "ddpPs" train the same epochs, one after another as a
run does (``workload.EpochSteps``), with each rank's shard in memory and
streamed through ``--stream-memory`` per rank (ddptrain's ``--data-memory``).
In the same run the data file is read twice with the page cache emptied of
it first (``posix_fadvise(DONTNEED)``): once plainly, in order, 16 MiB at a
time (what the disk gives), and once by the ranks' reading threads, each
streaming the windows of its shards for one epoch with nothing to train
(what the streams give).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

from .ddptrain_internals import (
    Config,
    FileRows,
    StreamedEpochPlan,
    TrainingPlan,
    WindowStream,
    inspect_data,
    plan_data,
    stream_parse_size,
    world,
)
from .launching import launch
from .report import median_rate
from .targets import Verdict
from .workload import RANDOM

NEED = 0.95    # the streamed row's share of the in-memory row's step rate at batch 512


def data_plan(data, batch, ranks, data_memory):
    """``(info, TrainingPlan of rank 0's kind, DataPlan)`` of ddptrain's --data-memory on this
    data."""
    info = inspect_data(data)
    config = Config(batch_size=batch, drop_last=True, epochs=10 ** 6,
                    data_memory=stream_parse_size(data_memory) if data_memory else 0)
    plan = plan_data(config, info, ranks, None, 0, info.chunk_rows)
    return info, config, plan


def rank_rows(data, batch, rank, ranks, data_memory):
    """``(TrainingPlan, stream or None)``: this rank's epochs and, streamed, its WindowStream
    (None: its shard in memory)."""
    info, config, plan = data_plan(data, batch, ranks, data_memory)
    training = TrainingPlan(config, info.n_train, rank, ranks, plan.order)
    if plan.order is None:
        return training, None
    return training, WindowStream(training.layout, FileRows(data, "train"), info.image_shape,
                                  info.stored_dtype("float32"), config.epochs)


def _forget(path):
    """Empty the page cache of ``path``: the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def sequential_read(path, block=16 * 2 ** 20):
    """MiB/s of a plain read of the whole file, in order, from the disk."""
    _forget(path)
    buffer, total = bytearray(block), 0
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while True:
            count = f.readinto(buffer)
            if not count:
                break
            total += count
    return total / 2 ** 20 / (time.perf_counter() - started)


def worker_stream_read(args):
    """The ranks of ``measure_reads``'s streamed read: each streams its shards' windows of one
    epoch, with no step in between, from the disk (rank 0 empties the page cache of the file
    first); rank 0 writes the MiB/s of all of them together."""
    comm = world()
    if comm.rank == 0:
        _forget(args.data)
    training, stream = rank_rows(args.data, args.batch, comm.rank, comm.size, args.stream)
    plan = None if stream is None else StreamedEpochPlan(training.layout, 0)
    comm.barrier()
    started = time.perf_counter()
    if stream is not None:
        with stream:
            for step in range(plan.n_steps):
                stream.wait_for(plan, step)
                stream.done_with(plan, step)
    seconds = max(comm.allgather(time.perf_counter() - started))
    total = sum(comm.allgather(0 if stream is None else stream.bytes_read))
    if comm.rank == 0:
        Path(args.out).write_text(json.dumps(
            {"mib_s": total / 2 ** 20 / seconds if stream is not None else None}))


def measure_reads(opts, batch, ranks):
    """The disk's and the streams' read rates (MiB/s), alternated, ``opts.rounds`` times each: a
    plain sequential read in this process, and ``ranks`` ranks streaming their shards (each
    rank's thread reads its own); None where there is no file to read (random data) or nothing
    is streamed."""
    if opts.data == RANDOM or opts.no_stream:
        return None
    disk, stream = [], []
    for _ in range(max(1, opts.rounds)):
        disk.append(sequential_read(opts.data))
        rate = launch("stream-read", ranks, 1, batch, 1, 0, 1, opts,
                      ("--stream", opts.stream_memory))["mib_s"]
        if rate is None:
            return None
        stream.append(rate)
    return {"disk_mib_s": disk, "stream_mib_s": stream, "file_bytes": os.path.getsize(opts.data)}


def stream_lines(results, reads, batches, ranks, opts):
    """The notes of the streamed rows and of the reads."""
    lines = []
    for batch in batches:
        memory, streamed = (results.get((key, batch)) for key in ("ddpPm", "ddpPs"))
        if memory and streamed:
            run = streamed["runs"][0]
            ratio = median_rate(results, "ddpPs", batch) / median_rate(results, "ddpPm", batch)
            lines.append(f"streamed shards, {ranks} ranks, batch {batch}: {ratio:.2f}x the step "
                         f"rate of the same epochs in memory; {run.get('data_line') or 'in memory'}"
                         f"; rank 0's steps waited {1e3 * run.get('stream_waited', 0):.0f} ms in "
                         "all for the stream (warmup included)")
    if reads:
        disk, stream = (statistics.median(reads[key]) for key in ("disk_mib_s", "stream_mib_s"))
        lines.append(f"reading {reads['file_bytes'] / 2 ** 20:,.0f} MiB from the disk (page cache "
                     f"emptied of the file first): a plain sequential read {disk:,.0f} MiB/s; "
                     f"{ranks} ranks streaming their shards (one epoch's windows, HDF5's "
                     f"checksums verified, one thread each) {stream:,.0f} MiB/s, "
                     f"{stream / disk:.2f}x (medians of {len(reads['disk_mib_s'])})")
    return lines


def stream_verdicts(results, reads):
    verdicts = []
    memory, streamed = median_rate(results, "ddpPm", 512), median_rate(results, "ddpPs", 512)
    if memory and streamed:
        ratio = streamed / memory
        verdicts.append(Verdict("stream", f"streamed >= {NEED}x in memory, 2 ranks, batch 512",
                                f"{ratio:.2f}x", ratio, NEED, ">=", ratio >= NEED,
                                {"ddptrain": ["ddpPs@512", "ddpPm@512"]}))
    if reads:
        disk, stream = (statistics.median(reads[key]) for key in ("disk_mib_s", "stream_mib_s"))
        verdicts.append(Verdict("stream", "the stream reads the file at the disk's speed "
                                "(>= 0.8x a plain sequential read)", f"{stream / disk:.2f}x",
                                stream / disk, 0.8, ">=", stream / disk >= 0.8))
    return verdicts
