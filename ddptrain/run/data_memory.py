"""How much of the data a rank holds: its whole shard in memory, or windows of it streamed
(``--data-memory``).

The decision and the window are functions of ``P x --data-memory`` (the
memory of all ranks together), the data and the sampler's options, never of
``P`` alone: the rows a step trains on are then the same on any number of
ranks (``stream_order``). In memory when the training rows fit: every rank's
shard, ``V/P`` virtual shards of at most ``ceil(n/V)`` rows, within
``--data-memory`` (which is today's order, and the default where the data
fits); streamed otherwise, with the largest window whose two slots per shard
fit. Without ``--data-memory``, the shard stays in memory where it fits the
memory that ``limits`` finds, and is streamed otherwise, said in one line.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Optional

from ddptrain.data.stream_order import (
    SLOTS,
    StreamOrder,
    block_rows_for,
    min_window_blocks,
    window_bytes,
)
from ddptrain.errors import CheckpointError, UserError

MIB = 2 ** 20
UNITS = {"": 1, "b": 1,
         "k": 2 ** 10, "kib": 2 ** 10, "m": MIB, "mib": MIB, "g": 2 ** 30, "gib": 2 ** 30,
         "t": 2 ** 40, "tib": 2 ** 40,
         "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12}
SIZE_HELP = ("a size such as 64M, 512MiB or 2G (K, M, G, T and KiB, MiB, GiB, TiB are powers of "
             "1024; KB, MB, GB, TB powers of 1000; a plain number is bytes)")
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")


def parse_size(text):
    """Bytes of a size written as ``SIZE_HELP`` says; ValueError (naming what it should be)
    otherwise."""
    match = _SIZE.fullmatch(str(text))
    unit = match and match.group(2).lower()
    if not match or unit not in UNITS:
        raise ValueError(f"{SIZE_HELP}, got {text!r}")
    return int(Decimal(match.group(1)) * UNITS[unit])


def format_size(size):
    """``size`` bytes in words: 64 MiB, 1.5 GiB, 800 KiB."""
    for unit, scale in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", MIB), ("KiB", 2 ** 10)):
        if size >= scale:
            return f"{size / scale:,.3g} {unit}" if size % scale else f"{size // scale:,} {unit}"
    return f"{size} bytes"


def option_text(size):
    """``size`` as the shortest --data-memory that gives at least it: 64M, 3G, 1500K."""
    for unit, scale in (("G", 2 ** 30), ("M", MIB), ("K", 2 ** 10)):
        if size >= scale:
            return f"{-(-size // scale)}{unit}"
    return str(size)


@dataclass(frozen=True)
class DataPlan:
    """What a rank holds of the training rows, the same on every rank."""

    order: Optional[StreamOrder]   # the streamed order; None: each rank's shard in memory
    limit: Optional[int]           # the bytes a rank may hold of them (None: no limit known)
    given: bool                    # the limit is --data-memory's (else what the host has)
    line: str = ""                 # the start-up line ("": nothing to say)

    def data_bytes(self, info, config, world_size):
        """What a rank holds of the data (``limits``): None in memory; streamed, its two windows
        per shard and a chunk of test rows."""
        if self.order is None:
            return None
        rows = row_bytes(info, config)
        return (window_bytes(info.n_train, config.virtual_shards, world_size, self.order, rows)
                + min(config.eval_batch, info.n_test) * rows)


def row_bytes(info, config):
    """Bytes of one row as a rank holds it: its pixels as stored and an int64 label."""
    return math.prod(info.image_shape) * info.stored_dtype(config.dtype).itemsize + 8


def shard_bytes(info, config, world_size):
    """The training rows one rank holds in memory at most: ``V/P`` shards of ``ceil(n/V)``."""
    shards = config.virtual_shards
    return shards // world_size * -(-info.n_train // shards) * row_bytes(info, config)


def plan_data(config, info, world_size, room, in_memory, block_rows):
    """The ``DataPlan`` of a run, from what every rank agrees on: ``room`` (the least any rank has
    for the data; None: unknown), ``in_memory`` (what a rank holds in memory, test block included)
    and ``block_rows`` (rank 0's file's rows per chunk; 0: none). UserError if no window fits."""
    given = config.data_memory
    if given and shard_bytes(info, config, world_size) <= given:
        return DataPlan(None, given, True, f"data: in memory: each rank's shard of the training "
                        f"rows ({format_size(shard_bytes(info, config, world_size))}) fits "
                        f"--data-memory {format_size(given)}")
    if not given and (room is None or in_memory <= room):
        return DataPlan(None, room, False)
    # automatic: what the host has beside the model, less a chunk of test rows read at evaluation
    limit = given or _power_of_two(room - min(config.eval_batch, info.n_test) * row_bytes(info,
                                                                                        config))
    block_rows = block_rows or block_rows_for(info.image_shape,
                                              info.stored_dtype(config.dtype).itemsize)
    order = largest_order(info, config, world_size, limit, block_rows)
    if order is None and not given:   # limits.check_resources refuses it, with every figure
        return DataPlan(None, room, False)
    if order is None:
        least = least_bytes(info, config, world_size, block_rows)
        raise UserError(f"--data-memory {format_size(given)} is too small for --batch-size "
                        f"{config.batch_size} on {world_size} rank(s): each rank streams its "
                        f"{config.virtual_shards // world_size} virtual shards through {SLOTS} "
                        f"windows each, of at least {_window_words(info, config, block_rows)}: "
                        f"{format_size(least)} at least (--data-memory {option_text(least)})")
    return DataPlan(order, limit, bool(given), describe(order, info, config, world_size, limit,
                                                        None if given else in_memory))


def largest_order(info, config, world_size, limit, block_rows):
    """The order of the largest window whose slots fit ``limit`` bytes per rank; None if even the
    smallest a step needs does not."""
    rows, shards = row_bytes(info, config), config.virtual_shards
    # P x limit, the ranks' memory together, fixes the window: the same on any number of ranks
    window = world_size * limit // (shards * SLOTS * block_rows * rows)
    if window < min_window_blocks(info.n_train, config.batch_size, shards, block_rows):
        return None
    return StreamOrder(window, block_rows)


def least_bytes(info, config, world_size, block_rows):
    """What a rank holds with the smallest window a step needs."""
    window = min_window_blocks(info.n_train, config.batch_size, config.virtual_shards, block_rows)
    return window_bytes(info.n_train, config.virtual_shards, world_size,
                        StreamOrder(window, block_rows), row_bytes(info, config))


def _window_words(info, config, block_rows):
    window = min_window_blocks(info.n_train, config.batch_size, config.virtual_shards, block_rows)
    return (f"{window} block{'s' if window > 1 else ''} of {block_rows:,} rows (a block of the "
            "file's chunks)")


def _power_of_two(room):
    """The largest power of two of bytes within ``room``: a figure that the free memory moving a
    little does not change (it fixes the order of the batches)."""
    return 2 ** int(math.log2(room)) if room >= 1 else 0


def describe(order, info, config, world_size, limit, in_memory=None):
    """The start-up line of a streamed run."""
    rows = row_bytes(info, config)
    held = window_bytes(info.n_train, config.virtual_shards, world_size, order, rows)
    window_rows = order.window_blocks * order.block_rows
    why = (f"this rank's data ({format_size(in_memory)}) does not fit the memory this host has "
           f"left for it: streamed (--data-memory {option_text(limit)} keeps these batches); "
           if in_memory is not None else "streamed (--data-memory): ")
    return (f"data: {why}each rank holds {SLOTS} windows of {order.window_blocks} block(s) of "
            f"{order.block_rows:,} rows for each of its {config.virtual_shards // world_size} "
            f"virtual shards, the next read ahead by a thread: {format_size(held)} of "
            f"{format_size(limit)}; rows are shuffled within windows, each step drawing from "
            f"{config.virtual_shards} windows of up to {window_rows:,} rows "
            "(docs/data.md#streaming-data-larger-than-memory)")


def order_for_resume(plan, saved, info, config, world_size, where):
    """The order a resumed run trains with: the checkpoint's (``saved``: its ``data_order``, None:
    in memory), which must fit what this run may hold; CheckpointError naming the --data-memory
    that would."""
    order = None if saved is None else StreamOrder(saved["window_blocks"], saved["block_rows"])
    if order == plan.order:
        return plan
    rows = row_bytes(info, config)
    needed = (shard_bytes(info, config, world_size) if order is None
              else window_bytes(info.n_train, config.virtual_shards, world_size, order, rows))
    if plan.limit is not None and needed > plan.limit:
        how = ("with each rank's shard in memory" if order is None else
               f"on rows streamed through windows of {order.window_blocks} block(s) of "
               f"{order.block_rows:,} rows")
        raise CheckpointError(f"{where}: checkpoint was trained {how}; resuming it on "
                              f"{world_size} rank(s) needs {format_size(needed)} per rank for "
                              f"them: resume with --data-memory {option_text(needed)} (or on "
                              "more ranks)")
    line = "" if order is None else describe(order, info, config, world_size,
                                             plan.limit or needed).replace(
        "data: streamed (--data-memory): ", "data: streamed as the checkpoint was: ")
    return DataPlan(order, plan.limit, plan.given, line)
