"""The communicator of this process: the MPI world under a launcher, ``SerialComm`` without one."""

from __future__ import annotations

from ddptrain.distributed.comm import MPIComm, SerialComm
from ddptrain.distributed.launcher import launched_by_mpi, srun_task
from ddptrain.distributed.slurm import check_srun_world


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
