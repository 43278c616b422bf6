"""Which samples each rank trains on at each step: pure functions, no MPI.

The property we need: the sequence of *global* batches (which samples are
trained together at each step) depends only on the seed, the epoch and the
dataset size, never on the number of ranks P; yet each rank reads only its
own part of the file.

The design:

1. The ``n`` training rows are cut into ``V`` *virtual shards*, contiguous
   blocks of rows; shard ``v`` is rows ``[start(v), start(v+1))`` and the
   first ``n % V`` shards hold one row more than the others.
2. Rank ``r`` of ``P`` owns the shards ``v`` with ``v % P == r`` and reads
   each with one contiguous (hyperslab) read. This needs ``V % P == 0``.
3. Every epoch, each shard's rows are shuffled by a generator seeded with
   ``(seed, epoch, v)``, so a rank can shuffle its shards without the others.
4. The epoch order interleaves the shards round-robin: position ``k`` of the
   epoch holds row number ``k // V`` (after shuffling) of shard ``k % V``.
   Global batch ``t`` is positions ``[t*B, (t+1)*B)``.

Because position ``k`` belongs to shard ``k % V`` and so to rank
``k % P``, a rank's share of every global batch is the positions ``k`` with
``k % P == rank``: local batches differ by at most one sample, and every
global batch draws about ``B / V`` samples from every shard. Within an epoch
each row appears exactly once; the last, shorter batch is kept unless
``drop_last`` is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ddptrain.errors import UserError

DEFAULT_VIRTUAL_SHARDS = 24   # divisible by 1, 2, 3, 4, 6, 8, 12 and 24 ranks


def shard_bounds(n, n_shards):
    """Row boundaries of the virtual shards: shard v is ``[b[v], b[v+1])``."""
    q, extra = divmod(n, n_shards)
    sizes = np.full(n_shards, q, dtype=np.int64)
    sizes[:extra] += 1
    return np.concatenate([[0], np.cumsum(sizes)])


def check_world(global_batch, world_size, n_shards=DEFAULT_VIRTUAL_SHARDS):
    """Raise a UserError if this many ranks cannot share these shards and batches (whatever the
    data)."""
    if global_batch < 1:
        raise UserError(f"--batch-size must be positive, got {global_batch}")
    if world_size < 1:
        raise UserError(f"the world size must be positive, got {world_size}")
    if n_shards < 1:
        raise UserError(f"--virtual-shards must be positive, got {n_shards}")
    if n_shards % world_size:
        raise UserError(
            f"{world_size} ranks cannot share {n_shards} virtual shards evenly: "
            f"--virtual-shards must be a multiple of the number of ranks "
            f"(keep it fixed to compare runs on different numbers of ranks)")
    if global_batch < world_size:
        raise UserError(f"--batch-size {global_batch} is smaller than the number of ranks "
                        f"({world_size}): every rank needs at least one sample per step")


def check_layout(n, global_batch, world_size, n_shards=DEFAULT_VIRTUAL_SHARDS):
    """Raise a UserError if this many ranks cannot train these batches of ``n`` rows."""
    check_world(global_batch, world_size, n_shards)
    if n < n_shards:
        raise UserError(f"the training set has {n} rows, fewer than the {n_shards} virtual shards")


def steps_per_epoch(n, global_batch, drop_last=False):
    return n // global_batch if drop_last else -(-n // global_batch)


def owned_shards(rank, world_size, n_shards):
    """The virtual shards rank ``rank`` reads: ``rank, rank + P, rank + 2P, ...``."""
    return list(range(rank, n_shards, world_size))


def owned_blocks(n, rank, world_size, n_shards=DEFAULT_VIRTUAL_SHARDS):
    """The ``(start, stop)`` row ranges rank ``rank`` reads from the file."""
    bounds = shard_bounds(n, n_shards)
    return [(int(bounds[v]), int(bounds[v + 1])) for v in owned_shards(rank, world_size, n_shards)]


def evaluation_block(n, rank, world_size):
    """The contiguous ``(start, stop)`` rows of an evaluation split that rank ``rank`` evaluates."""
    return n * rank // world_size, n * (rank + 1) // world_size


def shard_permutation(shard_size, seed, epoch, shard):
    """The order of one shard's rows in one epoch: a pure function of its arguments."""
    rng = np.random.default_rng([seed, epoch, shard])
    return rng.permutation(shard_size)


class StepSlices:
    """What an epoch plan, in memory or streamed, answers from ``local_rows``, ``step_bounds`` and
    ``global_counts``: its steps, and this rank's rows of each."""

    @property
    def n_steps(self):
        return len(self.global_counts)

    def local_batch(self, step):
        return self.local_rows[self.step_bounds[step]:self.step_bounds[step + 1]]


@dataclass(frozen=True)
class EpochPlan(StepSlices):
    """One rank's view of one epoch.

    ``local_rows`` lists, in epoch order, the rows of this rank's in-memory
    shard (its blocks concatenated in ``owned_blocks`` order); ``global_rows``
    the same samples as row numbers of the whole file; ``positions`` their
    positions in the epoch; ``step_bounds[t]:step_bounds[t+1]`` slices out the
    local batch of step ``t``, and ``global_counts[t]`` is the size of the
    global batch of step ``t``.
    """

    local_rows: np.ndarray
    global_rows: np.ndarray
    positions: np.ndarray
    step_bounds: np.ndarray
    global_counts: np.ndarray
    global_batch: int

    def positions_in_batch(self, step):
        """Where this rank's rows of step ``step`` sit in its global batch (0 .. count - 1)."""
        return (self.positions[self.step_bounds[step]:self.step_bounds[step + 1]]
                - step * self.global_batch)


def epoch_plan(n, global_batch, rank, world_size, seed, epoch,
               n_shards=DEFAULT_VIRTUAL_SHARDS, drop_last=False):
    """Plan one epoch for one rank (see the module docstring for the design)."""
    check_layout(n, global_batch, world_size, n_shards)
    bounds = shard_bounds(n, n_shards)
    sizes = np.diff(bounds)
    n_used = steps_per_epoch(n, global_batch, drop_last) * global_batch
    n_used = min(n_used, n)

    # Epoch positions k owned by this rank: k = rank, rank + P, ... (< n_used).
    positions = np.arange(rank, n_used, world_size, dtype=np.int64)
    shard_of = positions % n_shards
    rank_in_shard = positions // n_shards

    # Offset of each owned shard inside this rank's in-memory array.
    mine = owned_shards(rank, world_size, n_shards)
    local_start = np.zeros(n_shards, dtype=np.int64)
    local_start[mine] = np.concatenate([[0], np.cumsum(sizes[mine])[:-1]])

    shuffled = np.empty(len(positions), dtype=np.int64)   # row within its shard
    for v in mine:
        at = shard_of == v
        perm = shard_permutation(int(sizes[v]), seed, epoch, v)
        shuffled[at] = perm[rank_in_shard[at]]
    local_rows = local_start[shard_of] + shuffled
    global_rows = bounds[shard_of] + shuffled

    step_starts = np.arange(0, n_used, global_batch, dtype=np.int64)
    # The first position >= s with k % P == rank has index ceil((s - rank) / P).
    edges = np.append(step_starts, n_used)
    step_bounds = -(-(edges - rank) // world_size)
    step_bounds = np.clip(step_bounds, 0, len(positions))
    global_counts = np.minimum(step_starts + global_batch, n_used) - step_starts
    return EpochPlan(local_rows, global_rows, positions, step_bounds, global_counts, global_batch)
