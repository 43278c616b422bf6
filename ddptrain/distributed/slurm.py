"""What ddptrain reads from SLURM: the job's run folder, requeues, and srun's tasks.

Outside SLURM none of this applies. The SLURM batch scripts themselves are
in ``slurm/``; see the README's SLURM section.
"""

from __future__ import annotations

import dataclasses
import os
import time

from ddptrain.distributed.comm import MPIComm
from ddptrain.errors import UserError


def default_run_dir(environ=os.environ):
    """runs/slurm-<job id> in a SLURM job (runs/slurm-<array job id>_<task id> in a job array,
    as sbatch's %A_%a), else runs/run-<date-time>. A requeued job keeps its id, hence its folder."""
    job = environ.get("SLURM_JOB_ID")
    if job:
        array_job, array_task = (environ.get("SLURM_ARRAY_JOB_ID"),
                                 environ.get("SLURM_ARRAY_TASK_ID"))
        return (f"runs/slurm-{array_job}_{array_task}" if array_job and array_task
                else f"runs/slurm-{job}")
    return time.strftime("runs/run-%Y%m%d-%H%M%S")


def slurm_restart_count(environ=os.environ):
    """How many times SLURM has requeued this job (SLURM_RESTART_COUNT); 0 outside SLURM."""
    value = environ.get("SLURM_RESTART_COUNT", "").strip()
    return int(value) if value.isdigit() else 0


def resume_if_requeued(config, has_own_checkpoints, environ=os.environ):
    """A requeued SLURM job (SLURM_RESTART_COUNT > 0) continues from its newest checkpoint by
    itself.

    Its run folder is named after the job id, which a requeue keeps, so
    ``--resume auto`` finds what the previous run wrote. A ``--resume PATH``
    given at submission applies only until the job has checkpoints of its own
    (``has_own_checkpoints()``, asked only when it matters).
    """
    if not slurm_restart_count(environ) or config.resume == "auto":
        return config
    if config.resume and not has_own_checkpoints():
        return config
    return dataclasses.replace(config, resume="auto")


def describe_slurm(world_size, environ=os.environ):
    """One line about the SLURM job this run is part of, or None outside SLURM."""
    job = environ.get("SLURM_JOB_ID")
    if not job:
        return None
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        job += f" (array {environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']})"
    restarts = slurm_restart_count(environ)
    line = f"SLURM job {job}" + (f", restart {restarts} (resuming automatically)"
                                 if restarts else "")
    allocated = environ.get("SLURM_NTASKS", "")
    if world_size == 1 and allocated.isdigit() and int(allocated) > 1:
        line += (f"; warning: the job has {allocated} tasks but ddptrain runs as one process: "
                 f"start it with srun or mpirun to use them")
    return line


_SRUN_ADVICE = ("give srun the process-management interface of your MPI library: `srun --mpi=pmi2` "
                "for MPICH (the PyPI wheel) or Intel MPI, `srun --mpi=pmix` for Open MPI "
                "(`srun --mpi=list` shows what this cluster offers), or start the ranks with "
                "mpirun inside the allocation")


def check_srun_world(comm, task):
    """Under srun, refuse a world that is not the step's tasks (raises the same UserError on every
    rank).

    ``task`` is ``(task id, number of tasks)`` if srun started this process
    (``launcher.srun_task()``), else None. The common mistake: srun without a PMI that the MPI
    library understands starts N processes that are N separate worlds of size 1, each of which
    would train the whole model alone and write the same run folder.
    """
    if task is None:
        return
    procid, ntasks = task
    if comm.size == 1 and ntasks > 1:
        how = ("MPI was started" if isinstance(comm, MPIComm) else
               "no MPI launcher variables (PMI_RANK, PMIX_RANK) are set, so ddptrain would run")
        raise UserError(f"srun started {ntasks} tasks (this is task {procid}), but {how} as "
                        f"{ntasks} separate worlds of size 1 instead of one world of {ntasks} "
                        f"ranks: {_SRUN_ADVICE}")
    # DDP: every rank reaches the same verdict
    claims = comm.allgather((comm.rank, procid, ntasks))
    wrong = [(r, p, n) for r, p, n in claims if (p, n) != (r, comm.size)]
    if wrong:
        r, p, n = wrong[0]
        raise UserError(f"srun says this step has {n} tasks and MPI rank {r} is task {p}, but the "
                        f"MPI world has {comm.size} ranks: the ranks do not match the SLURM tasks; "
                        f"{_SRUN_ADVICE}")
