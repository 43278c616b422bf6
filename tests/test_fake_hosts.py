"""The fake hosts of scripts/fake-hosts.sh (network namespaces) that multi-node tests run MPI
across.

Skipped unless fake hosts can be made here (root; see fakehosts.why_unavailable).
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fakehosts
from ddptrain.distributed.launcher import environ_without_launcher, find_mpiexec

pytestmark = [pytest.mark.slow, pytest.mark.mpiexec]   # every test here starts processes

PREFIX = "ddptt"   # not the script's default: hosts made by hand or by other tests stay up

# Each rank writes what it sees to DIR/rank-R.json (Hydra's merged stdout can split lines).
PROGRAM = """
import json, socket, sys
import numpy as np
from mpi4py import MPI

world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()
x = np.full({elements}, rank + 1.0)
total = np.empty_like(x)
correct = True
for _ in range({repetitions}):
    world.Allreduce(x, total)
    correct = correct and bool(np.all(total == size * (size + 1) / 2))
seen = {{"rank": rank, "size": size, "processor": MPI.Get_processor_name(),
        "hostname": socket.gethostname(),
        "shared": world.Split_type(MPI.COMM_TYPE_SHARED).Get_size(), "allreduce_correct": correct}}
with open(f"{{sys.argv[1]}}/rank-{{rank}}.json", "w") as f:
    json.dump(seen, f)
"""
ELEMENTS, REPETITIONS = 2**20, 10          # an 8 MiB float64 Allreduce, 10 times


@pytest.fixture(scope="module")
def available():
    reason = fakehosts.why_unavailable()
    if reason:
        pytest.skip(reason)


def machine_network():
    """What the machine's own network namespace has: its links, addresses and routes, and
    /etc/hosts."""
    def ip(*args):   # without the lifetimes, which count down
        out = subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout
        return re.sub(r"\b(valid_lft|preferred_lft|expires)\s+\S+", "", out)
    return {"links": ip("-o", "link", "show"), "addresses": ip("-o", "addr", "show"),
            "routes": ip("route", "show", "table", "all"),
            "etc_hosts": Path("/etc/hosts").read_text()}


def ours():
    """Our network namespaces (other tests may make fake hosts of their own meanwhile)."""
    return {name for name in fakehosts.namespaces() if name.startswith(f"{PREFIX}-")}


def our_etc_netns():
    return sorted(p.name for p in Path("/etc/netns").glob(f"{PREFIX}-*"))


def links_in(namespace):
    """``{name: link}`` of a namespace's links (``ip -j link``), names without the ``@peer``
    tail."""
    out = subprocess.run(["ip", "-n", namespace, "-j", "link", "show"], capture_output=True,
                         text=True, check=True).stdout
    return {link["ifname"]: link for link in json.loads(out)}


def test_up_makes_exactly_the_named_hosts_and_down_removes_them(available):
    before_network = machine_network()
    with fakehosts.FakeHosts(n=2, prefix=PREFIX) as hosts:
        assert hosts.hosts == [f"{PREFIX}-h1", f"{PREFIX}-h2"]
        assert ours() == {f"{PREFIX}-h1", f"{PREFIX}-h2", f"{PREFIX}-net"}
        assert our_etc_netns() == [f"{PREFIX}-h1", f"{PREFIX}-h2"]
        # nothing added to the machine's own network
        assert machine_network() == before_network

        switch = links_in(hosts.switch_namespace)
        assert set(switch) == {"lo", hosts.bridge, f"{PREFIX}-h1-v", f"{PREFIX}-h2-v"}
        assert {switch[f"{host}-v"].get("master") for host in hosts.hosts} == {hosts.bridge}

        subnet = hosts.address(hosts.hosts[0]).rsplit(".", 1)[0]
        assert [hosts.address(host) for host in hosts.hosts] == [f"{subnet}.1", f"{subnet}.2"]
        for host in hosts.hosts:
            assert set(links_in(host)) == {"lo", "eth0"}
            assert all("UP" in link["flags"] for link in links_in(host).values())
            etc_hosts = Path(f"/etc/netns/{host}/hosts").read_text()
            assert f"{hosts.address(f'{PREFIX}-h1')}\t{PREFIX}-h1" in etc_hosts
            assert f"{hosts.address(f'{PREFIX}-h2')}\t{PREFIX}-h2" in etc_hosts

        # On a host: its hostname, its /etc/hosts, its address, and the others' names resolve.
        other = hosts.hosts[1]
        probe = ("import socket; print(socket.gethostname(), "
                 "socket.gethostbyname(socket.gethostname())," f" socket.gethostbyname({other!r}))")
        out = subprocess.run(hosts.run_argv(hosts.hosts[0], [sys.executable, "-c", probe]),
                             capture_output=True, text=True, check=True,
                             stdin=subprocess.DEVNULL).stdout.split()
        assert out == [hosts.hosts[0], hosts.address(hosts.hosts[0]), hosts.address(other)]
        assert hosts.pids(hosts.hosts[0]) == []          # nothing left running there
    assert ours() == set() and our_etc_netns() == []
    assert machine_network() == before_network


def test_up_removes_the_leftovers_of_a_crashed_run_and_down_succeeds_when_nothing_is_there(
        available):
    subprocess.run([str(fakehosts.SCRIPT), "up", "3", PREFIX], check=True, capture_output=True)
    assert len(ours()) == 4
    # no `down` in between: as after a crash
    with fakehosts.FakeHosts(n=2, prefix=PREFIX) as hosts:
        assert ours() == hosts.namespaces() == {f"{PREFIX}-h1", f"{PREFIX}-h2", f"{PREFIX}-net"}
        assert our_etc_netns() == [f"{PREFIX}-h1", f"{PREFIX}-h2"]
    assert ours() == set() and our_etc_netns() == []
    subprocess.run([str(fakehosts.SCRIPT), "down", PREFIX], check=True, capture_output=True)


def test_down_runs_when_the_body_raises(available):
    with pytest.raises(ZeroDivisionError):
        with fakehosts.FakeHosts(n=2, prefix=PREFIX) as hosts:
            assert ours() == hosts.namespaces()
            raise ZeroDivisionError("the body fails")
    assert ours() == set()


def test_two_hosts_of_two_ranks_group_by_host_and_allreduce_over_the_network(available, tmp_path):
    program = tmp_path / "ranks.py"
    program.write_text(PROGRAM.format(elements=ELEMENTS, repetitions=REPETITIONS))
    with fakehosts.FakeHosts(n=2, prefix=PREFIX) as hosts:
        h1, h2 = hosts.hosts
        before = {host: hosts.veth_bytes(host) for host in hosts.hosts}
        argv = hosts.mpiexec_argv(2, [sys.executable, program, tmp_path], mpiexec=find_mpiexec())
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                              env=environ_without_launcher(), stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        after = {host: hosts.veth_bytes(host) for host in hosts.hosts}
        assert hosts.pids(h1) == [] and hosts.pids(h2) == []     # the ranks and proxies are gone

    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(4)]
    assert [r["hostname"] for r in ranks] == [h1, h1, h2, h2]
    assert [r["processor"] for r in ranks] == [h1, h1, h2, h2]
    assert [r["shared"] for r in ranks] == [2, 2, 2, 2]          # MPI groups the ranks by host
    assert all(r["allreduce_correct"] and r["size"] == 4 for r in ranks)
    # Each host needs the other's partial sums, 8 MiB per Allreduce: they crossed the veth links
    # (had the hosts shared memory, the counters would have grown by a few kilobytes).
    volume = ELEMENTS * 8 * REPETITIONS
    for host in (h1, h2):
        received, sent = (a - b for a, b in zip(after[host], before[host]))
        assert received >= volume and sent >= volume, (host, received, sent, volume)
