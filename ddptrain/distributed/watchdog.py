"""``--stall-timeout``: a rank that waits too long inside a collective ends the job, naming the
ranks that never arrived, instead of waiting forever for one that was stopped (SIGSTOP) or hangs.

Each rank counts the collectives it enters (``comm.CLOCK``) and, while watched, stores the count in
its slot of an array in its node's shared memory: one store per collective, nothing sent. A daemon
thread per rank looks at its own rank every ``POLL_SECONDS``: once it has been inside one collective
longer than the timeout, the ranks of the node whose count is below its own are those that did not
reach it. The job is then aborted (status 1) with one line.

Only time inside a collective counts: a rank slower than the timeout in its own computation
fires nothing on itself, but the ranks waiting for it do. Across nodes only this node's slots are
seen: a stall elsewhere is reported as on another node.
"""

from __future__ import annotations

import sys
import threading
import time

import numpy as np

from ddptrain.distributed.comm import CLOCK, MPIComm
from ddptrain.errors import EXIT_FAILURE

POLL_SECONDS = 1.0


def watch_for_stalls(comm, seconds):
    """Start the watchdog of this rank (a collective); returns it, or None when there is nothing to
    watch (``seconds`` 0, one rank, or ranks that are threads of one process)."""
    if not seconds or comm.size == 1 or not isinstance(comm, MPIComm):
        return None
    return Watchdog(comm, seconds)


class Watchdog:
    def __init__(self, comm, seconds):
        self.comm, self.seconds = comm, seconds
        self.node, self.across = comm.split_by_node()
        self.node_ranks = self.node.allgather(comm.rank)   # world rank of each place on the node
        self._block = self.node.allocate_shared(self.node.size, np.int64)
        self.counts = self._block.array
        CLOCK.slot = self.counts[self.node.rank:self.node.rank + 1]
        CLOCK.slot[0] = CLOCK.entered
        self._block.sync()   # every slot written before any watchdog reads it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="ddptrain-stall-watchdog",
                                        daemon=True)
        self._thread.start()

    def stop(self, release=True):
        """End the thread; ``release``: also give the shared memory back (a collective, so only
        when every rank gets here: not after an error)."""
        self._stop.set()
        self._thread.join()
        CLOCK.slot = None
        if release:
            self._block.free()
            self.node.free()
            self.across.free()

    def _watch(self):
        poll = min(POLL_SECONDS, self.seconds / 4)
        while not self._stop.wait(poll):
            since, entered = CLOCK.since, CLOCK.entered
            if since is None or time.monotonic() - since <= self.seconds:
                continue
            # One line, not one per waiting rank: of the ranks of the node that reached this
            # collective, the first reports; the others after a second timeout, in case the first
            # was stopped inside it.
            first = next(place for place, count in enumerate(self.counts) if count >= entered)
            if first == self.node.rank or time.monotonic() - since > 2 * self.seconds:
                self._abort(time.monotonic() - since, entered)

    def _abort(self, waited, entered):
        # read without Win_sync: a stalled rank's count has not changed for seconds
        missing = [self.node_ranks[place] for place, count in enumerate(self.counts)
                   if count < entered]
        absent = (f"rank(s) {', '.join(map(str, missing))}" if missing
                  else "a rank on another node (or one stopped inside it)")
        print(f"ddptrain: error: rank {self.comm.rank} waited {waited:.0f} s in a collective that "
              f"{absent} never reached (a stopped or hung process? --stall-timeout "
              f"{self.seconds:g})", file=sys.stderr, flush=True)
        self.comm.abort(EXIT_FAILURE)
