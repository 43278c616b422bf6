"""Several fake hosts on this machine, for multi-node tests: a wrapper of ``scripts/fake-hosts.sh``.

A fake host is a Linux network namespace with its own address, hostname and
IPC namespace, linked to the others through a virtual switch; mpiexec started
by :meth:`FakeHosts.mpiexec_argv` runs its ranks on them as on separate nodes
(MPICH's UCX netmod, or Open MPI's, uses TCP over the hosts' ``eth0`` between them,
shared memory within one). Needs root (CI runs as root), ``ip`` and ``unshare``; see the script
for what it creates.

Imported as ``import fakehosts`` (``conftest.py`` puts ``tests/`` on
``sys.path``). A module-scoped fixture::

    import pytest
    import fakehosts

    pytestmark = pytest.mark.slow

    @pytest.fixture(scope="module")
    def fake_hosts():
        reason = fakehosts.why_unavailable()
        if reason:
            pytest.skip(reason)
        with fakehosts.FakeHosts(n=2, prefix="ddptt") as hosts:
            yield hosts

    def test_two_nodes(fake_hosts):
        argv = fake_hosts.mpiexec_argv(2, [sys.executable, "-m", "ddptrain", ...])
        subprocess.run(argv, env=environ_without_launcher(), stdin=subprocess.DEVNULL, check=True)

Every method starts processes: use them only in tests marked ``slow``.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from pathlib import Path

from ddptrain.distributed.launcher import mpiexec_on_hosts_argv

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "fake-hosts.sh"
LAUNCHER = ROOT / "scripts" / "fake-hosts-launcher"


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check,
                          stdin=subprocess.DEVNULL)


@functools.lru_cache(maxsize=None)
def why_unavailable() -> str | None:
    """Why fake hosts cannot be made here (a reason to skip), or None when they can."""
    if os.name != "posix" or not Path("/proc/self/ns/net").exists():
        return "fake hosts need Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root to create network namespaces (CI runs as root)"
    for tool, package in (("ip", "iproute2"), ("unshare", "util-linux")):
        if shutil.which(tool) is None and not _apt_install(package, tool):
            return f"fake hosts need '{tool}' ({package}), and apt-get could not install it"
    probe = f"ddptprobe-{os.getpid()}"
    try:
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"cannot create a network namespace: {made.stderr.strip()}"
        try:
            inside = subprocess.run(["ip", "netns", "exec", probe, "unshare", "--uts", "--ipc",
                                     "true"], capture_output=True, text=True,
                                    stdin=subprocess.DEVNULL)
            if inside.returncode != 0:
                return f"cannot create UTS/IPC namespaces: {inside.stderr.strip()}"
        finally:
            _ip("netns", "del", probe, check=False)
    except OSError as e:
        return f"cannot create a network namespace: {e}"
    return None


def _apt_install(package, tool):
    """Install a Debian package as the SLURM tests do (root, apt-get): a bare CI machine may lack
    iproute2."""
    if shutil.which("apt-get") is None:
        return False
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    command = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package]
    if subprocess.run(command, env=env, capture_output=True,
                      stdin=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True,
                       stdin=subprocess.DEVNULL)
        subprocess.run(command, env=env, capture_output=True, stdin=subprocess.DEVNULL)
    return shutil.which(tool) is not None


def namespaces() -> set[str]:
    """The names of all named network namespaces (``ip netns list``)."""
    return {line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()}


class FakeHosts:
    """``n`` fake hosts ``PREFIX-h1 .. PREFIX-hN``: ``up`` on entering the ``with``, ``down`` on
    leaving it.

    ``down`` runs also when the body raises; entering first removes leftovers of
    the same prefix (of a run that crashed). Use a prefix of your own in tests,
    so that hosts someone made by hand with the default one are left alone.
    """

    def __init__(self, n: int = 2, prefix: str = "ddpt"):
        self.n = n
        self.prefix = prefix
        self.hosts: list[str] = []
        self._addresses: dict[str, str] = {}

    # ------------------------------------------------------------ up and down

    def _script(self, *args):
        proc = subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"fake-hosts.sh {' '.join(map(str, args))} failed "
                               f"({proc.returncode}):\n{proc.stderr.strip()}")
        return proc.stdout

    def up(self):
        out = self._script("up", self.n, self.prefix)
        self._addresses = dict(line.split() for line in out.splitlines() if line.strip())
        self.hosts = list(self._addresses)
        return self

    def down(self):
        self._script("down", self.prefix)
        self.hosts, self._addresses = [], {}

    def __enter__(self):
        return self.up()

    def __exit__(self, exc_type, exc, tb):
        try:
            self.down()
        except Exception:
            if exc_type is None:
                raise
        return False

    # ------------------------------------------------------------ names

    @property
    def bridge(self) -> str:
        """The virtual switch; it lives in the network namespace :attr:`switch_namespace`."""
        return f"{self.prefix}-br"

    @property
    def switch_namespace(self) -> str:
        return f"{self.prefix}-net"

    def namespaces(self) -> set[str]:
        """The network namespaces ``up`` makes: one per host and the switch's."""
        return {*self.hosts, self.switch_namespace}

    def address(self, host: str) -> str:
        """The IPv4 address of ``host`` (on its ``eth0``)."""
        return self._addresses[host]

    # ------------------------------------------------------------ running things

    def run_argv(self, host: str, argv) -> list[str]:
        """The argv that runs ``argv`` on ``host``: its network, hostname and IPC namespace."""
        return [str(SCRIPT), "run", host, *map(str, argv)]

    def mpiexec_argv(self, ranks_per_host: int, program_argv, env: dict | None = None,
                     mpiexec: str | None = None) -> list[str]:
        """The argv, to run from the machine's own namespace, that starts ``program_argv`` as
        ``ranks_per_host`` ranks on every host (ranks 0..k-1 on host 1, and so on).

        mpiexec runs on host 1 and starts the other hosts' proxies (Hydra's) or daemons (Open
        MPI's) through ``scripts/fake-hosts-launcher``, as it would through ssh; ``env`` goes to
        the ranks. Start it with an environment without an MPI context
        (``ddptrain.distributed.launcher.environ_without_launcher()``).
        """
        slots = [(host, ranks_per_host) for host in self.hosts]
        return self.run_argv(self.hosts[0], [*mpiexec_on_hosts_argv(slots, LAUNCHER, mpiexec, env),
                                             *map(str, program_argv)])

    # ------------------------------------------------------------ looking

    def pids(self, host: str) -> list[int]:
        """The processes running on ``host`` (``ip netns pids``)."""
        return sorted(int(pid) for pid in _ip("netns", "pids", host).stdout.split())

    def veth_bytes(self, host: str) -> tuple[int, int]:
        """``(received, sent)`` bytes of ``host``'s link to the switch, as its ``eth0`` counts
        them."""
        link = json.loads(_ip("-n", host, "-s", "-j", "link", "show", "dev", "eth0").stdout)[0]
        stats = link["stats64"]
        return stats["rx"]["bytes"], stats["tx"]["bytes"]
