"""Streamed shards against shards in memory: the step rates, and the file read against the disk.

The row "ddpPs" trains a run's epochs, one after another (``workload.EpochSteps``),
streamed through ``--stream-memory`` per rank (ddptrain's ``--data-memory``);
in the same launch, after each of its timed repetitions, a twin trains the
same epochs from the shard in memory (its "memory_rates"): the ratio of the
two is free of what the machine does between launches.
In the same run a file is read three ways with the page cache emptied of it
first (``posix_fadvise(DONTNEED)``), alternated, ``max(9, --rounds)`` times
(``--rounds`` with ``--quick``):
plainly, in order, 16 MiB at a time (what the disk gives); by the ranks
loading their shards whole (the in-memory path); and by the ranks' reading
threads, each streaming the windows of its shards for one epoch with nothing
to train (what the streams give). The file is the data file where it holds
at least ``--read-file-mib`` MiB, and otherwise a file of its training rows
repeated to that size, written for the measurement and removed after it: a
file of tens of MiB is read in tens of milliseconds, in which a stream's
start (opening the file, the first window of each shard, read before any is
read ahead) weighs more than its reading.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

from .ddptrain_internals import (
    ArrayRows,
    Config,
    FileRows,
    StreamedEpochPlan,
    TrainingPlan,
    WindowStream,
    inspect_data,
    least_bytes,
    owned_blocks,
    plan_data,
    read_rows,
    stream_parse_size,
    world,
    write_sources,
)
from .launching import launch
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
    """The ranks of ``measure_reads``: from the disk (rank 0 empties the page cache of the file
    first, each time), each rank reads its shard whole, as a run in memory loads it
    (``read_rows``), then streams its shards' windows of one epoch, with no step in between;
    rank 0 writes the MiB/s of the ranks together, each way. The stream's set-up (its plan, and
    its buffer, touched once as the epochs before a run's last have touched it) is made before
    the clock starts; the thread's start, the file's opening and every read are timed."""
    comm = world()
    rates = {}
    for way in ("load_mib_s", "stream_mib_s"):
        read = (partial(load_shard, args.data, comm.rank, comm.size) if way == "load_mib_s"
                else streamed_epoch(args, comm))
        if comm.rank == 0:
            _forget(args.data)
        comm.barrier()
        started = time.perf_counter()
        count = read() if read is not None else None
        seconds = max(comm.allgather(time.perf_counter() - started))
        total = comm.allgather(count)
        rates[way] = None if None in total else sum(total) / 2 ** 20 / seconds
    if comm.rank == 0:
        Path(args.out).write_text(json.dumps(rates))


def load_shard(data, rank, size):
    """Bytes of this rank's shard, read whole as a run in memory reads it."""
    x, _ = read_rows(data, "train", owned_blocks(inspect_data(data).n_train, rank, size),
                     dtype="uint8")
    return x.nbytes


def streamed_epoch(args, comm):
    """A callable that streams this rank's windows of one epoch and returns the bytes read (None:
    nothing streamed)."""
    training, stream = rank_rows(args.data, args.batch, comm.rank, comm.size, args.stream)
    if stream is None:
        return None
    plan = StreamedEpochPlan(training.layout, 0)
    stream.images.fill(0)   # its pages, as a run's later epochs find them

    def read():
        with stream:
            for step in range(plan.n_steps):
                stream.wait_for(plan, step)
                stream.done_with(plan, step)
        return stream.bytes_read

    return read


def read_file(data, least_mib, folder):
    """``(path, what)``: the file the reads are measured on, ``data`` itself where it holds at
    least ``least_mib`` MiB, else a file in ``folder`` of its training rows repeated to that size,
    chunked as ``data`` is (its test rows: the first 100 of ``data``'s)."""
    if os.path.getsize(data) >= least_mib * 2 ** 20:
        return data, "the data file"
    info = inspect_data(data)
    x, y = read_rows(data, "train", [(0, info.n_train)], dtype="uint8")
    copies = math.ceil(least_mib * 2 ** 20 / x.nbytes)
    test = read_rows(data, "test", [(0, min(100, info.n_test))], dtype="uint8")
    path = os.path.join(folder, "reads.h5")
    write_sources(path, {"train": (ArrayRows([x] * copies), ArrayRows([y] * copies)),
                         "test": (ArrayRows([test[0]]), ArrayRows([test[1]]))},
                  info.n_classes, info.class_names, chunk_rows=info.chunk_rows or None)
    return path, f"{copies} copies of the training rows of {os.path.basename(data)}"


def measure_reads(opts, batch, ranks):
    """The read rates of a file (``read_file``) from the disk (MiB/s), alternated, ``max(9,
    opts.rounds)`` times each: a plain sequential read in this process; ``ranks`` ranks reading
    their shards whole (the in-memory path), and streaming them (each rank's thread reading its
    own); None where there is no file to read (random data) or the data's shards are not
    streamed (they fit ``--stream-memory``)."""
    if opts.data == RANDOM or opts.no_stream:
        return None
    if data_plan(opts.data, batch, ranks, opts.stream_memory)[2].order is None:
        return None   # the data's shards fit --stream-memory: the streamed row streamed nothing
    with tempfile.TemporaryDirectory(prefix="ddptrain-reads-") as folder:
        path, what = read_file(opts.data, opts.read_file_mib, folder)
        reading = copy.copy(opts)
        reading.data = path
        memory = read_memory(path, batch, ranks, opts.stream_memory)
        reads = {"disk_mib_s": [], "load_mib_s": [], "stream_mib_s": []}
        for _ in range(opts.rounds if opts.quick else max(9, opts.rounds)):
            reads["disk_mib_s"].append(sequential_read(path))
            ranked = launch("stream-read", ranks, 1, batch, 1, 0, 1, reading,
                            ("--stream", str(memory)))
            if ranked["stream_mib_s"] is None:
                return None
            for way in ("load_mib_s", "stream_mib_s"):
                reads[way].append(ranked[way])
        return {**reads, "file_bytes": os.path.getsize(path), "file": what,
                "data_memory": memory}


def read_memory(path, batch, ranks, data_memory):
    """The --data-memory of the streams that read ``path``: ``data_memory``, or the least that
    this file's shards need where that is more (a larger file's shards may start within a chunk,
    and a step may then reach into a third block)."""
    info, config, _ = data_plan(path, batch, ranks, None)
    least = least_bytes(info, config, ranks, info.chunk_rows)
    return max(stream_parse_size(data_memory), least)


def stream_lines(results, reads, batches, ranks, opts):
    """The notes of the streamed row and of the reads."""
    lines = []
    for batch in batches:
        entry = results.get(("ddpPs", batch))
        if entry:
            run = entry["runs"][0]
            ratio = stream_ratio(entry)
            lines.append(f"streamed shards, {ranks} ranks, batch {batch}: {ratio:.2f}x the step "
                         f"rate of the same epochs in memory (alternated in each launch); "
                         f"{run.get('data_line') or 'in memory'}; rank 0's steps waited "
                         f"{1e3 * run.get('stream_waited', 0):.0f} ms in all for the stream "
                         "(warmup included); its peak RSS includes the twin's shard in memory")
    if reads:
        disk, load, stream = (statistics.median(reads[key])
                              for key in ("disk_mib_s", "load_mib_s", "stream_mib_s"))
        lines.append(f"reading {reads['file_bytes'] / 2 ** 20:,.0f} MiB ({reads['file']}) from the "
                     f"disk (page cache "
                     f"emptied of the file first), MiB/s: a plain sequential read {disk:,.0f}; "
                     f"{ranks} ranks reading their shards whole, as in memory, {load:,.0f}; "
                     f"{ranks} ranks streaming them (one epoch's windows, a thread each, "
                     f"--data-memory {reads['data_memory'] / 2 ** 20:.1f} MiB) "
                     f"{stream:,.0f}: {stream / disk:.2f}x the plain read, {stream / load:.2f}x "
                     f"the whole shards (each chunk's checksum verified either way; medians of "
                     f"{len(reads['disk_mib_s'])})")
    return lines


def stream_ratio(entry):
    """The streamed rates' median over those of the twin in memory, over every launch."""
    memory = [rate for run in entry["runs"] for rate in run.get("memory_rates", [])]
    return statistics.median(entry["rates"]) / statistics.median(memory) if memory else 1.0


def stream_verdicts(results, reads):
    verdicts = []
    entry = results.get(("ddpPs", 512))
    if entry and any(run.get("memory_rates") for run in entry["runs"]):
        ratio = stream_ratio(entry)
        verdicts.append(Verdict("stream", f"streamed >= {NEED}x in memory, 2 ranks, batch 512",
                                f"{ratio:.2f}x", ratio, NEED, ">=", ratio >= NEED,
                                {"ddptrain": ["ddpPs@512"]}))
    if reads:
        disk, load, stream = (statistics.median(reads[key])
                              for key in ("disk_mib_s", "load_mib_s", "stream_mib_s"))
        verdicts += [Verdict("stream", "the streams read the file at the disk's speed (>= 0.8x a "
                             "plain sequential read)", f"{stream / disk:.2f}x", stream / disk, 0.8,
                             ">=", stream / disk >= 0.8),
                     Verdict("stream", "the streams read the file as fast as the ranks load it "
                             "whole (>= 0.9x)", f"{stream / load:.2f}x", stream / load, 0.9, ">=",
                             stream / load >= 0.9)]
    return verdicts
