"""Running ddptrain as a user would: ``python -m ddptrain`` or ``mpiexec -n P python -m ddptrain``."""

import subprocess
import sys
from pathlib import Path

from ddptrain.comm import environ_without_launcher, find_mpiexec

ROOT = Path(__file__).resolve().parent.parent


def mpiexec():
    return find_mpiexec()


def command(args, ranks=None):
    """The argv that runs ``python -m ddptrain ARGS``, under mpiexec with ``ranks`` ranks if given."""
    python = [sys.executable, "-m", "ddptrain", *map(str, args)]
    return python if ranks is None else [mpiexec(), "-n", str(ranks), *python]


def clean_env(extra=None):
    # A test must not inherit an MPI or SLURM context from whatever started pytest.
    return {**environ_without_launcher(), **(extra or {})}


def run(args, ranks=None, timeout=120, env=None, cwd=None):
    """Run ddptrain to completion; returns the CompletedProcess (stdout and stderr as text)."""
    return subprocess.run(command(args, ranks), capture_output=True, text=True, timeout=timeout,
                          env=clean_env(env), cwd=cwd or ROOT)


def start(args, ranks=None, env=None, cwd=None):
    """Start ddptrain in the background (for signal tests); returns the Popen."""
    return subprocess.Popen(command(args, ranks), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env(env), cwd=cwd or ROOT, start_new_session=True)
