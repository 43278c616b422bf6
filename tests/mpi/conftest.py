"""What the tests under mpiexec share: the world's communicator, a folder every rank sees, and a
small data set in it."""

import tempfile
from pathlib import Path

import pytest

from ddptrain.distributed.comm import MPIComm
from helpers import make_dataset


@pytest.fixture(scope="module")
def comm():
    return MPIComm()


@pytest.fixture(scope="module")
def shared_dir(comm):
    """A temporary folder that every rank sees: rank 0 names it, the others are told."""
    path = tempfile.mkdtemp(prefix="ddptrain-mpi-") if comm.rank == 0 else None
    return Path(comm.bcast(path))


@pytest.fixture(scope="module")
def dataset(comm, shared_dir):
    """A 240 + 60 row data set of 8x8 images, written by rank 0."""
    if comm.rank == 0:
        make_dataset(shared_dir / "data.h5", n_train=240, n_test=60)
    comm.barrier()
    return str(shared_dir / "data.h5")
