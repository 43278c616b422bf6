"""How far each rank's clock is from rank 0's: what puts the ranks of a timeline on one time axis.

``time.perf_counter_ns`` is ``CLOCK_MONOTONIC``: one clock for every process
of a host, but one that starts at an arbitrary point (the host's boot) on
each host. ``clock_offsets`` measures each rank's offset from rank 0 with
collectives only, in the manner of Cristian's algorithm, and bounds its
error by causality alone:

1. rank 0 reads its clock, ``sent``, and broadcasts it; each rank reads its
   own clock on receiving it, ``received``. The broadcast cannot arrive
   before it left: ``offset <= received - sent``.
2. each rank reads its clock again, ``now``, and all ranks allgather those
   readings; rank 0 reads its clock once the allgather returns, ``back``.
   Rank r's reading was taken before it entered the allgather, which
   cannot end on rank 0 before rank r entered it: ``offset >= now - back``.

Each round gives an interval as wide as rank 0's round trip (tens of
microseconds on one host; a scheduler's time slice or more when ranks
outnumber cores); the rounds' intervals are intersected (clocks drift by a
few parts per million: nothing over the milliseconds the rounds take), so
the fastest round trip in either direction sets the width, and the offset is
its middle, give or take half its width. Rounds are cheap: 32 of them give
an oversubscribed job many chances at a round trip that no time slice cut.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

ROUNDS = 32


@dataclass(frozen=True)
class Offset:
    """A rank's clock minus rank 0's, in nanoseconds, known to within ``uncertainty`` either
    way."""

    offset: int
    uncertainty: int


def clock_offsets(comm, clock=time.perf_counter_ns, rounds=ROUNDS):
    """Every rank's ``Offset`` from rank 0's clock, on rank 0 (None on the others). A collective."""
    bounds = None
    for _ in range(rounds):
        sent = comm.bcast(clock() if comm.rank == 0 else None)   # DDP
        received = clock()
        readings = comm.allgather((received, clock()))           # DDP
        back = clock()
        if comm.rank != 0:
            continue
        this = [(now - back, got - sent) for got, now in readings]
        if bounds is None:
            bounds = this
        else:
            bounds = [_intersect(old, new) for old, new in zip(bounds, this)]
    if comm.rank != 0:
        return None
    bounds[0] = (0, 0)   # rank 0's clock is the reference
    return [Offset((low + high) // 2, (high - low + 1) // 2) for low, high in bounds]


def _intersect(old, new):
    """The intersection of two intervals of the offset; the narrower one should they not meet
    (which causality rules out, unless a clock was stepped between the rounds)."""
    low, high = max(old[0], new[0]), min(old[1], new[1])
    if low <= high:
        return low, high
    return min(old, new, key=lambda bound: bound[1] - bound[0])
