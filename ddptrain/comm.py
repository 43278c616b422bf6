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
import time

import numpy as np

from .errors import UserError

# Variables that MPI launchers (mpiexec/mpirun of MPICH, Open MPI, Intel MPI,
# and srun with PMI-2 or PMIx) set in the environment of the ranks they start.
_LAUNCHER_VARIABLES = ("PMI_RANK", "PMI_SIZE", "PMI_FD", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE",
                       "MPI_LOCALNRANKS", "HYDI_CONTROL_FD")


def launched_by_mpi(environ=os.environ):
    return any(name in environ for name in _LAUNCHER_VARIABLES)


# Set by mpirun/mpiexec (Hydra of MPICH and Intel MPI, Open MPI) in its ranks. Inside a
# SLURM allocation mpirun starts its proxies with srun, so its ranks also carry the SLURM
# step variables, of a step with one task per node: those say nothing about the ranks.
_MPIRUN_VARIABLES = ("MPI_LOCALNRANKS", "HYDI_CONTROL_FD", "OMPI_COMM_WORLD_SIZE")


def srun_task(environ=os.environ):
    """``(task id, number of tasks)`` if srun itself started this process as a task of a step, else None."""
    if "SLURM_STEP_ID" not in environ or any(name in environ for name in _MPIRUN_VARIABLES):
        return None
    procid = environ.get("SLURM_PROCID", "")
    ntasks = environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS", "")
    if not (procid.isdigit() and ntasks.isdigit()):
        return None
    return int(procid), int(ntasks)


_SRUN_ADVICE = ("give srun the process-management interface of your MPI library: `srun --mpi=pmi2` for "
                "MPICH (the PyPI wheel) or Intel MPI, `srun --mpi=pmix` for Open MPI (`srun --mpi=list` "
                "shows what this cluster offers), or start the ranks with mpirun inside the allocation")


def check_srun_world(comm, task):
    """Under srun, refuse a world that is not the step's tasks (raises the same UserError on every rank).

    The common mistake: srun without a PMI that the MPI library understands
    starts N processes that are N separate worlds of size 1, each of which
    would train the whole model alone and write the same run folder.
    """
    if task is None:
        return
    procid, ntasks = task
    if comm.size == 1 and ntasks > 1:
        how = ("MPI was started" if isinstance(comm, MPIComm) else
               "no MPI launcher variables (PMI_RANK, PMIX_RANK) are set, so ddptrain would run")
        raise UserError(f"srun started {ntasks} tasks (this is task {procid}), but {how} as {ntasks} separate "
                        f"worlds of size 1 instead of one world of {ntasks} ranks: {_SRUN_ADVICE}")
    claims = comm.allgather((comm.rank, procid, ntasks))   # DDP: every rank reaches the same verdict
    wrong = [(r, p, n) for r, p, n in claims if (p, n) != (r, comm.size)]
    if wrong:
        r, p, n = wrong[0]
        raise UserError(f"srun says this step has {n} tasks and MPI rank {r} is task {p}, but the MPI world has "
                        f"{comm.size} ranks: the ranks do not match the SLURM tasks; {_SRUN_ADVICE}")


ABORT_GRACE_SECONDS = 0.5


def find_mpiexec():
    """The mpiexec beside this interpreter (the PyPI mpich wheel puts it there), else the one on PATH."""
    import shutil
    from pathlib import Path
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if found is None:
        raise RuntimeError("no mpiexec: install the 'mpich' extra (pip install -e '.[mpich]') or a system MPI")
    return found


def environ_without_launcher(environ=os.environ):
    """A copy of the environment without the MPI and SLURM variables of whatever started this process,
    for starting a new, independent ddptrain job from within one (tests, benchmarks)."""
    return {name: value for name, value in environ.items()
            if not name.startswith(("PMI_", "PMIX_", "OMPI_", "HYDI_", "MPI_LOCAL", "SLURM_"))}


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
        # Give the launcher a moment to pass on what this rank just printed: Hydra
        # (mpiexec of MPICH) can drop output still in transit when it ends the job.
        time.sleep(ABORT_GRACE_SECONDS)
        self._comm.Abort(status)


def world(use_mpi=None):
    """The communicator for this process.

    Under an MPI launcher (mpirun, mpiexec, srun) it is the MPI world; a plain
    ``python -m ddptrain`` gets ``SerialComm`` without initialising MPI at all.
    ``use_mpi`` forces either choice. Under srun, the world must be the step's
    tasks (a UserError says how to launch otherwise).
    """
    if use_mpi is None:
        use_mpi = launched_by_mpi()
    comm = MPIComm() if use_mpi else SerialComm()
    check_srun_world(comm, srun_task())   # under srun: the MPI world must be the step's tasks
    return comm


class _ThreadHub:
    """What the simulated ranks share: a barrier and one slot per rank."""

    def __init__(self, size):
        import threading
        self.size = size
        self.barrier = threading.Barrier(size)
        self.slots = [None] * size


class ThreadComm:
    """Rank ``rank`` of ``size`` simulated ranks: threads of one process (``--simulate-ranks``).

    The same training code runs in every thread, on that rank's shard, and
    the collectives below exchange data through shared memory. Sums are taken
    in rank order, so a simulated run is deterministic; it equals an MPI run
    up to the order of floating-point additions. Use it to step through the
    distributed logic with pdb, without MPI. If one thread fails, ``abort``
    breaks the barrier so that no other thread waits forever.
    """

    library = "simulated (threads of one process)"

    def __init__(self, hub, rank):
        self._hub, self.rank, self.size = hub, rank, hub.size
        self.local_size = hub.size

    @classmethod
    def create(cls, size):
        hub = _ThreadHub(size)
        return [cls(hub, rank) for rank in range(size)]

    def _exchange(self, value):
        """Every rank's ``value``, in rank order."""
        hub = self._hub
        hub.slots[self.rank] = value
        hub.barrier.wait()
        values = list(hub.slots)
        hub.barrier.wait()   # nobody overwrites a slot before everyone has read them all
        return values

    def allreduce_(self, array):
        values = self._exchange(array.copy())
        total = values[0].copy()
        for value in values[1:]:
            total += value
        array[...] = total
        return array

    def allreduce(self, value):
        if isinstance(value, np.ndarray):
            return self.allreduce_(value.copy())
        values = self._exchange(value)
        total = values[0]
        for v in values[1:]:   # in rank order: deterministic
            total = total + v
        return total

    def bcast(self, obj, root=0):
        return self._exchange(obj)[root]

    def bcast_(self, array, root=0):
        array[...] = self._exchange(array.copy())[root]
        return array

    def allgather(self, obj):
        return self._exchange(obj)

    def barrier(self):
        self._hub.barrier.wait()

    def break_collectives(self):
        """Wake every rank waiting in a collective (with BrokenBarrierError): one of them failed."""
        self._hub.barrier.abort()

    def abort(self, status):
        self.break_collectives()
        raise SystemExit(status)
