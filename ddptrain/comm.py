"""Communicators: the only module that imports mpi4py.

Everything else receives a communicator object and calls the few collective
operations below. ``SerialComm`` is the world of one process, where every
collective is trivial; a plain ``python -m ddptrain`` runs through exactly the
same training code with it. ``MPIComm`` wraps an mpi4py communicator.

All collectives must be called by every rank, in the same order: never call
one inside an ``if comm.rank == 0`` branch.
"""

from __future__ import annotations

import os
import sys

import numpy as np

# Variables that MPI launchers (mpiexec/mpirun of MPICH, Open MPI, Intel MPI,
# and srun with PMI-2 or PMIx) set in the environment of the ranks they start.
_LAUNCHER_VARIABLES = ("PMI_RANK", "PMI_SIZE", "PMI_FD", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE",
                       "MPI_LOCALNRANKS", "HYDI_CONTROL_FD")


def launched_by_mpi(environ=os.environ):
    return any(name in environ for name in _LAUNCHER_VARIABLES)


class SerialComm:
    """One process: rank 0 of a world of size 1."""

    rank = 0
    size = 1
    local_size = 1    # ranks sharing this node
    library = "none (single process)"

    def allreduce_(self, array):
        """Sum ``array`` over all ranks, in place. Returns it."""
        return array

    def allreduce(self, value):
        """Sum a Python number (or numpy array, as a copy) over all ranks."""
        return value

    def any(self, flag):
        """True on every rank if ``flag`` is true on any rank."""
        return bool(flag)

    def bcast(self, obj, root=0):
        """Rank ``root``'s (picklable) ``obj``, on every rank."""
        return obj

    def bcast_(self, array, root=0):
        """Overwrite ``array`` on every rank with rank ``root``'s, in place."""
        return array

    def allgather(self, obj):
        return [obj]

    def barrier(self):
        pass

    def abort(self, status):
        sys.exit(status)


class MPIComm:
    """An mpi4py communicator behind the same small interface."""

    def __init__(self, mpi_comm=None):
        from mpi4py import MPI
        self._MPI = MPI
        self._comm = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()
        node = self._comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_size = node.Get_size()
        node.Free()
        self.library = MPI.Get_library_version().splitlines()[0].strip()

    def allreduce_(self, array):
        # In place, on the contiguous buffer itself: no pickling, no copy.
        self._comm.Allreduce(self._MPI.IN_PLACE, array, op=self._MPI.SUM)
        return array

    def allreduce(self, value):
        if isinstance(value, np.ndarray):
            out = np.array(value, copy=True)
            return self.allreduce_(out)
        return self._comm.allreduce(value, op=self._MPI.SUM)

    def any(self, flag):
        return bool(self._comm.allreduce(bool(flag), op=self._MPI.LOR))

    def bcast(self, obj, root=0):
        return self._comm.bcast(obj, root=root)

    def bcast_(self, array, root=0):
        self._comm.Bcast(array, root=root)
        return array

    def allgather(self, obj):
        return self._comm.allgather(obj)

    def barrier(self):
        self._comm.Barrier()

    def abort(self, status):
        # Ends every rank of the job: the other ranks may be blocked in a
        # collective that will never complete.
        sys.stdout.flush()
        sys.stderr.flush()
        self._comm.Abort(status)


def world(use_mpi=None):
    """The communicator for this process.

    Under an MPI launcher (mpirun, mpiexec, srun) it is the MPI world; a plain
    ``python -m ddptrain`` gets ``SerialComm`` without initialising MPI at all.
    ``use_mpi`` forces either choice.
    """
    if use_mpi is None:
        use_mpi = launched_by_mpi()
    return MPIComm() if use_mpi else SerialComm()
