"""Communicators: the only module that imports mpi4py.

Everything else receives a communicator object and calls the few collective
operations below. ``SerialComm`` is the world of one process, where every
collective is trivial; a plain ``python -m ddptrain`` runs through exactly the
same training code with it. ``MPIComm`` wraps an mpi4py communicator.

All collectives must be called by every rank, in the same order: never call
one inside an ``if comm.rank == 0`` branch.
"""

from __future__ import annotations

import functools
import os
import sys
import time

import numpy as np

ABORT_GRACE_SECONDS = 0.5


SHARED_MEMORY_FOLDER = "/dev/shm/"
# The files that MPI libraries put their node's shared memory in: MPICH's, Open MPI's (vader, sm).
MPI_SEGMENT_PREFIXES = ("mpich_", "vader_segment", "sm_segment")


def unlink_mapped_segments():
    """Remove the names of the MPI shared-memory segments this process maps, on the way out of an
    aborted job (the memory itself goes once the last rank unmaps it). Only this process's own: a
    segment it maps is its job's, never another job's on the node."""
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
            fields = (line.split(None, 5) for line in maps)
            paths = {field[5].strip() for field in fields if len(field) == 6}
    except OSError:
        return
    for path in paths:
        name = path[len(SHARED_MEMORY_FOLDER):]
        if path.startswith(SHARED_MEMORY_FOLDER) and name.startswith(MPI_SEGMENT_PREFIXES):
            try:
                os.unlink(path)
            except OSError:
                pass   # another rank of the node removed it first


def quiet_open_mpi_windows(environ=os.environ):
    """Keep Open MPI's UCX one-sided component out of its choice of window components, unless the
    user chose them (``OMPI_MCA_osc``); read by MPI's initialisation, and ignored by other MPIs.

    On a node whose UCX has no transport for one-sided operations (TCP or shared memory only, as
    the PyPI wheel's on most machines), Open MPI 5 prints "OSC UCX component priority set inside
    component query failed" once per rank and window (open-mpi/ompi#12517, #14086). ddptrain's
    windows are all shared memory (``allocate_shared``), which Open MPI's ``sm`` component serves
    whatever the list, so leaving UCX out changes nothing but the noise on stderr.
    """
    environ.setdefault("OMPI_MCA_osc", "^ucx")


class CollectiveClock:
    """What this process's watchdog (``watchdog.py``) reads: how many collectives it has entered,
    over all of its communicators, and since when it has been inside the one it is in.

    Every rank enters the same collectives in the same order, so a rank that has entered fewer than
    a waiting rank never reached the one that rank waits in. ``slot``: this rank's counter in its
    node's shared memory, where the watchdogs of the node read it (None while nothing watches).
    """

    def __init__(self):
        self.entered = 0
        self.since = None   # time.monotonic() on entering the collective it is in; None outside
        self.slot = None

    def enter(self):
        self.entered += 1
        self.since = time.monotonic()
        if self.slot is not None:
            self.slot[0] = self.entered   # a memory store: the whole per-collective cost

    def leave(self):
        self.since = None


CLOCK = CollectiveClock()   # one per process: the ranks are processes


def _collective(method):
    """``method`` counted and timed by ``CLOCK``; a collective inside another counts once."""
    @functools.wraps(method)
    def counted(*args, **kwargs):
        if CLOCK.since is not None:
            return method(*args, **kwargs)
        CLOCK.enter()
        try:
            return method(*args, **kwargs)
        finally:
            CLOCK.leave()
    return counted


class SerialComm:
    """One process: rank 0 of a world of size 1."""

    rank = 0
    size = 1
    library = "none (single process)"

    def allreduce_(self, array):
        """Sum ``array`` over all ranks, in place. Returns it."""
        return array

    def allreduce(self, value):
        """Sum a Python number (or numpy array, as a copy) over all ranks."""
        return value

    def iallreduce_(self, array):
        """Start summing ``array`` over all ranks, in place; returns a request: ``test()`` lets the
        sum make progress and tells whether it is done, ``wait()`` waits for it. ``array`` must not
        be touched before."""
        return DONE

    def bcast(self, obj, root=0):
        """Rank ``root``'s (picklable) ``obj``, on every rank."""
        return obj

    def bcast_(self, array, root=0):
        """Overwrite ``array`` on every rank with rank ``root``'s, in place."""
        return array

    def allgather(self, obj):
        return [obj]

    def gather(self, obj, root=0):
        """Every rank's (picklable) ``obj``, in rank order, on rank ``root``; None elsewhere."""
        return [obj]

    def reduce_scatter_(self, array, bounds):
        """Sum ``array`` over all ranks into this rank's slice
        ``array[bounds[rank]:bounds[rank + 1]]``, in place (the rest of ``array`` is left as it
        was). Returns the slice."""
        return array[bounds[0]:bounds[1]]

    def allgather_(self, array, bounds):
        """Every rank's slice ``array[bounds[r]:bounds[r + 1]]``, on every rank, in place. Returns
        ``array``."""
        return array

    def barrier(self):
        pass

    def ibarrier(self):
        """Start a barrier; returns a request (``test()``: has every rank reached it?)."""
        return DONE

    def split_by_node(self):
        """``(node, across)``: the ranks that share this rank's memory, and the ranks at this rank's
        place (its rank on its node) on every node. One process is both."""
        return self, self

    def allocate_shared(self, count, dtype):
        """A ``SharedBlock`` of ``count`` zeros that every rank of this communicator (a node's)
        reaches in its own memory: the same array everywhere. A collective."""
        return SharedBlock(np.zeros(count, dtype=dtype), sync=lambda: None)

    def free(self):
        """Release a communicator that ``split_by_node`` made (a collective); the world stays."""

    def abort(self, status):
        sys.exit(status)


class _Done:
    """The request of a collective that finished when it started."""

    def test(self):
        return True

    def wait(self):
        pass


DONE = _Done()


class SharedBlock:
    """An array in memory that the ranks of one node share (``allocate_shared``): what one rank
    writes, the others read, once every rank has passed ``sync()``, a barrier that also orders the
    memory accesses before it and after it (MPI's ``Win_sync``, barrier, ``Win_sync``)."""

    def __init__(self, array, sync, free=lambda: None):
        self.array, self.sync, self._free = array, sync, free

    def free(self):
        """Give the memory back (a collective); ``array`` must not be used after."""
        self.array = None
        self._free()


class _MPIRequest:
    def __init__(self, request):
        self._request = request

    def test(self):
        return self._request.Test()

    @_collective   # where a non-blocking collective waits for the other ranks
    def wait(self):
        self._request.Wait()


class MPIComm:
    """An mpi4py communicator behind the same small interface."""

    def __init__(self, mpi_comm=None):
        quiet_open_mpi_windows()   # before the import, which initialises MPI
        from mpi4py import MPI
        self._MPI = MPI
        self._comm = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()
        # "MPICH Version: 5.0.2", "Open MPI v5.0.11" (before its build details, after a comma)
        self.library = MPI.Get_library_version().splitlines()[0].split(",")[0].strip()

    @_collective
    def allreduce_(self, array):
        # In place, on the contiguous buffer itself: no pickling, no copy.
        self._comm.Allreduce(self._MPI.IN_PLACE, array, op=self._MPI.SUM)
        return array

    @_collective
    def allreduce(self, value):
        if isinstance(value, np.ndarray):
            out = np.array(value, copy=True)
            return self.allreduce_(out)
        return self._comm.allreduce(value, op=self._MPI.SUM)

    @_collective
    def iallreduce_(self, array):
        return _MPIRequest(self._comm.Iallreduce(self._MPI.IN_PLACE, array, op=self._MPI.SUM))

    @_collective
    def bcast(self, obj, root=0):
        return self._comm.bcast(obj, root=root)

    @_collective
    def bcast_(self, array, root=0):
        self._comm.Bcast(array, root=root)
        return array

    @_collective
    def allgather(self, obj):
        return self._comm.allgather(obj)

    @_collective
    def gather(self, obj, root=0):
        return self._comm.gather(obj, root=root)

    @_collective
    def reduce_scatter_(self, array, bounds):
        counts = [int(b - a) for a, b in zip(bounds[:-1], bounds[1:])]
        mine = array[bounds[self.rank]:bounds[self.rank + 1]]
        received = self._received
        if received is None or received.size < mine.size or received.dtype != array.dtype:
            received = self._received = np.empty(max(counts), dtype=array.dtype)
        self._comm.Reduce_scatter(array, received[:mine.size], recvcounts=counts, op=self._MPI.SUM)
        mine[...] = received[:mine.size]
        return mine

    @_collective
    def allgather_(self, array, bounds):
        counts = [int(b - a) for a, b in zip(bounds[:-1], bounds[1:])]
        kind = self._MPI.DOUBLE if array.dtype == np.float64 else self._MPI.FLOAT
        self._comm.Allgatherv(self._MPI.IN_PLACE,
                              [array, counts, [int(b) for b in bounds[:-1]], kind])
        return array

    _received = None   # reduce_scatter_'s receive buffer, kept

    @_collective
    def barrier(self):
        self._comm.Barrier()

    @_collective
    def ibarrier(self):
        return _MPIRequest(self._comm.Ibarrier())

    @_collective
    def split_by_node(self):
        MPI = self._MPI
        node = self._comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)   # ranks in world order
        across = self._comm.Split(color=node.Get_rank(), key=self.rank)
        return MPIComm(node), MPIComm(across)

    @_collective
    def free(self):
        # MPI has a few thousand communicator contexts: a process that trains again and again
        # (ddptrain.train in a loop) must give back those each run made.
        if self._comm != self._MPI.COMM_WORLD:
            self._comm.Free()

    @_collective
    def allocate_shared(self, count, dtype):
        # Rank 0 of the node allocates all of it; the others map the same pages.
        MPI, dtype = self._MPI, np.dtype(dtype)
        window = MPI.Win.Allocate_shared(count * dtype.itemsize if self.rank == 0 else 0,
                                         dtype.itemsize, comm=self._comm)
        memory, _ = window.Shared_query(0)
        array = np.frombuffer(memory, dtype=dtype, count=count)
        # one passive epoch for the whole run: Sync orders the accesses
        window.Lock_all(MPI.MODE_NOCHECK)
        if self.rank == 0:
            array[...] = 0
        comm = self._comm

        @_collective
        def sync():
            window.Sync()
            comm.Barrier()
            window.Sync()

        def free():
            window.Unlock_all()
            window.Free()

        sync()
        return SharedBlock(array, sync, free)

    def abort(self, status):
        # Ends every rank of the job: the other ranks may be blocked in a
        # collective that will never complete.
        sys.stdout.flush()
        sys.stderr.flush()
        # An aborted job never runs MPI's own clean-up: /dev/shm (memory) would keep its segments.
        unlink_mapped_segments()
        # Give the launcher a moment to pass on what this rank just printed: Hydra
        # (mpiexec of MPICH) can drop output still in transit when it ends the job.
        time.sleep(ABORT_GRACE_SECONDS)
        self._comm.Abort(status)
        # MPICH's MPI_Abort may return before the launcher ends this process: a rank that went on
        # would report its error a second time, as if every rank had met it.
        os._exit(status)
