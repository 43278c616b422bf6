"""What started this process, read from the environment before MPI is initialised.

MPI launchers (``mpiexec``/``mpirun`` of MPICH, Open MPI and Intel MPI, and
``srun`` with PMI-2 or PMIx) tell the processes they start who they are
through environment variables. This module is the one place that reads them.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

# Set in the ranks by every MPI launcher ddptrain knows (any one of them is enough).
_LAUNCHER_VARIABLES = ("PMI_RANK", "PMI_SIZE", "PMI_FD", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE",
                       "MPI_LOCALNRANKS", "HYDI_CONTROL_FD")
# (rank, size) pairs, in order of preference; SLURM_PROCID is srun's task number.
_RANK_AND_SIZE = (("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                  ("PMIX_RANK", None), ("SLURM_PROCID", "SLURM_NTASKS"))
# Set by mpirun/mpiexec (Hydra of MPICH and Intel MPI, Open MPI) in its ranks. Inside a
# SLURM allocation mpirun starts its proxies with srun, so its ranks also carry the SLURM
# step variables, of a step with one task per node: those say nothing about the ranks.
_MPIRUN_VARIABLES = ("MPI_LOCALNRANKS", "HYDI_CONTROL_FD", "OMPI_COMM_WORLD_SIZE")
# Everything a launcher or SLURM sets, for starting an independent job from inside one.
_LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "HYDI_", "MPI_LOCAL", "SLURM_")


def launched_by_mpi(environ=os.environ):
    return any(name in environ for name in _LAUNCHER_VARIABLES)


def rank_and_size(environ=os.environ):
    """``(rank, world size)`` as the launcher announced them; ``(0, 1)`` without a launcher."""
    for rank_name, size_name in _RANK_AND_SIZE:
        rank = environ.get(rank_name, "")
        if rank.isdigit():
            size = environ.get(size_name or "", "")
            return int(rank), int(size) if size.isdigit() else 1
    return 0, 1


def srun_task(environ=os.environ):
    """``(task id, number of tasks)`` if srun itself started this process as a task of a step, else
    None."""
    if "SLURM_STEP_ID" not in environ or any(name in environ for name in _MPIRUN_VARIABLES):
        return None
    procid = environ.get("SLURM_PROCID", "")
    ntasks = environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS", "")
    if not (procid.isdigit() and ntasks.isdigit()):
        return None
    return int(procid), int(ntasks)


def environ_without_launcher(environ=os.environ):
    """A copy of the environment without the MPI and SLURM variables of whatever started this
    process, for starting a new, independent ddptrain job from within one (tests, benchmarks)."""
    return {name: value for name, value in environ.items()
            if not name.startswith(_LAUNCHER_PREFIXES)}


def find_mpiexec():
    """The mpiexec beside this interpreter (the PyPI mpich wheel puts it there), else the one on
    PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if found is None:
        raise RuntimeError("no mpiexec: install the 'mpich' extra (pip install -e '.[mpich]') "
                           "or a system MPI")
    return found
