"""ddptrain: a data-parallel MNIST trainer written with numpy and MPI.

The pieces, each in a module of its own:

- ``nn``, ``losses``, ``optim``: the numpy network (no MPI in sight);
- ``data``, ``mnist``, ``sampler``: HDF5 data, preparation, and which rank
  trains on which rows at each step;
- ``comm``: the only module that imports mpi4py;
- ``train``: one training step, evaluation and the epoch loop;
- ``checkpoint``: rank-0 checkpoints that cannot be half-written;
- ``cli``: options, the startup line, exit statuses.
"""

__version__ = "0.1.0"
