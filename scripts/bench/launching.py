"""Starting a worker in fresh processes: one, P ranks under mpiexec, or one rank per fake host.

Each worker is this benchmark's own command with ``--worker``; it writes its
result to a temporary JSON file, which ``launch`` reads back.
"""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import time_to_accuracy  # scripts/time_to_accuracy.py, beside this package

SCRIPTS = Path(__file__).resolve().parent.parent
ROOT = SCRIPTS.parent
COMMAND = SCRIPTS / "benchmark.py"   # the benchmark's command, which runs the workers too
FAKE_HOSTS = SCRIPTS / "fake-hosts.sh"
FAKE_HOSTS_LAUNCHER = SCRIPTS / "fake-hosts-launcher"
HOSTS_PREFIX = "dbench"   # the benchmark's own fake hosts, apart from the tests' ("ddpt", "ddptt")


def mpiexec():
    from ddptrain.distributed.launcher import find_mpiexec
    return find_mpiexec()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_hosts(command, n=2):
    """``scripts/fake-hosts.sh up N`` / ``down`` for the rows across hosts; True if it worked."""
    argv = [str(FAKE_HOSTS), command, *([str(n)] if command == "up" else []), HOSTS_PREFIX]
    return subprocess.run(argv, capture_output=True, text=True, check=False).returncode == 0


def across_hosts(argv, ranks):
    """``argv`` as ``ranks`` ranks, one on each fake host: mpiexec on host 1, the others through the
    launcher."""
    from ddptrain.distributed.launcher import mpiexec_on_hosts_argv
    hosts = [f"{HOSTS_PREFIX}-h{k}" for k in range(1, ranks + 1)]
    one_slot_each = [(host, 1) for host in hosts]
    return [str(FAKE_HOSTS), "run", hosts[0],
            *mpiexec_on_hosts_argv(one_slot_each, FAKE_HOSTS_LAUNCHER, mpiexec()), *argv]


def launch(kind, ranks, threads_per_rank, batch, steps, warmup, repeats, opts, extra=()):
    """Run one worker (under mpiexec when ranks > 1; one rank per fake host with ``--hosts`` in
    ``extra``) in fresh processes; returns its JSON result."""
    hosts = "--hosts" in extra
    extra = tuple(e for e in extra if e != "--hosts")
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        argv = [sys.executable, str(COMMAND), "--worker", kind, "--out", out,
                "--batch", str(batch), "--threads-per-rank", str(threads_per_rank),
                "--model", opts.model, "--data", str(opts.data), "--steps", str(steps),
                "--warmup", str(warmup), "--repeats", str(repeats), "--lr", str(opts.lr),
                "--gemm", opts.gemm, "--denormals", opts.denormals, *extra]
        if hosts:
            argv = across_hosts(argv, ranks)
        elif ranks > 1:
            argv = [*time_to_accuracy.mpiexec(ranks), *argv]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False,
                              env=time_to_accuracy.clean_env(), cwd=ROOT, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(argv)} failed ({proc.returncode}):\n"
                               f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        return json.loads(Path(out).read_text())
    finally:
        Path(out).unlink(missing_ok=True)
