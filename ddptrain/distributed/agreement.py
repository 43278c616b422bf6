"""What every rank must agree on before training: the verdict of a check, the software, the data,
the model.

On one host the ranks share a file system and an installation; across
nodes they need not, and a difference must stop the run with one line that
names the rank and its host, on every rank, rather than hang a collective or
train replicas that differ. ``hosts`` is each rank's host name, in rank
order (``BlasThreads.hosts`` inverted: ``hosts_by_rank``).
"""

from __future__ import annotations

import os

import numpy as np

from ddptrain import __version__
from ddptrain.errors import CheckpointError, DataError, UserError

# The kinds of UserError a verdict passes on as they are (by name: what crosses between ranks is
# plain data).
_kinds = {kind.__name__: kind for kind in (UserError, DataError, CheckpointError)}


def hosts_by_rank(ranks_by_host):
    """``[host of rank 0, host of rank 1, ...]`` from ``{host: [ranks]}``."""
    hosts = {}
    for host, ranks in ranks_by_host.items():
        hosts.update({rank: host for rank in ranks})
    return [hosts[rank] for rank in range(len(hosts))]


def _on(rank, hosts):
    return f"rank {rank} (on {hosts[rank]})" if hosts else f"rank {rank}"


def _everywhere(error):
    error.all_ranks = True
    return error


def _first_difference(comm, mine):
    """``(rank, its value, rank 0's value)`` for the first rank whose ``mine`` differs from rank
    0's, or None. Collective: every rank gets the same answer."""
    everyone = comm.allgather(mine)
    return next(((rank, value, everyone[0]) for rank, value in enumerate(everyone)
                 if value != everyone[0]), None)


def verdict_on_every_rank(comm, check, hosts):
    """``check()``'s result on this rank, if it passed on every rank; else every rank raises the
    first rank's UserError: as it is where every rank met the same one, naming that rank and its
    host where only some did (a file missing on one node)."""
    try:
        result, problem = check(), None
    except UserError as error:
        name = type(error).__name__
        result, problem = None, (name if name in _kinds else "UserError", str(error))
    problems = comm.allgather(problem)   # DDP: hosts may differ; the verdict may not
    failed = [rank for rank, p in enumerate(problems) if p]
    if not failed:
        return result
    kind, message = problems[failed[0]]
    if len(failed) < comm.size:
        message = f"{_on(failed[0], hosts)}: {message}"
    raise _everywhere(_kinds[kind](message))


def check_same_software(comm, hosts):
    """Every rank runs the same ddptrain and numpy (a rank of another version could compute
    otherwise)."""
    difference = _first_difference(comm, (__version__, np.__version__))
    if difference:
        rank, (version, numpy), (version0, numpy0) = difference
        raise _everywhere(UserError(
            f"{_on(rank, hosts)} runs ddptrain {version} with numpy {numpy}, but {_on(0, hosts)} "
            f"runs ddptrain {version0} with numpy {numpy0}: install the same environment on every "
            "node (or one on a shared file system)"))


def content_id(attrs):
    """What identifies a data file's content among its attributes: ``content_sha256``, else the MD5s
    of the files it was converted from; None for a file with neither."""
    if "content_sha256" in attrs:
        return attrs["content_sha256"]
    md5s = tuple(sorted((key, value) for key, value in attrs.items() if key.startswith("md5_")))
    return md5s or None


def check_same_data_file(comm, info, hosts):
    """Every rank reads the same data file: the same size and the same content attribute
    (``content_id``). Across nodes the path may name different copies; each rank reads only its
    shard, and shards of different files would be a data set no one chose."""
    difference = _first_difference(comm, (os.path.getsize(info.path), content_id(info.attrs)))
    if difference:
        rank, (size, _), (size0, _) = difference
        differs = (f"{size:,} bytes there, {size0:,} on rank 0" if size != size0
                   else "its content checksum attribute differs from rank 0's")
        raise _everywhere(DataError(
            f"{info.path}: {_on(rank, hosts)} reads another file than {_on(0, hosts)} ({differs}): "
            "every node must see the same data file (on a shared file system, or copied whole)"))


def check_same_arrays(comm, arrays):
    """Every rank passed the same in-memory data (``Arrays.fingerprint``): each trains on its shard
    of it."""
    difference = _first_difference(comm, arrays.fingerprint())
    if difference:
        raise _everywhere(DataError(
            f"data: the in-memory arrays of rank {difference[0]} differ from rank 0's; every rank "
            "must pass the same arrays (each trains on its own shard of them)"))


def check_same_model(comm, model):
    """Every rank built the same network (a script builds its model on each rank)."""
    difference = _first_difference(comm, (model.params.size, model.buffers.size,
                                          [layer.label() for layer in model.layers]))
    if difference:
        raise _everywhere(UserError(
            f"the model differs between ranks (rank {difference[0]}'s is not rank 0's): build the "
            "same model on every rank"))
