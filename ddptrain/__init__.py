"""ddptrain: a data-parallel trainer of numpy networks, over MPI, on image data in HDF5.

The pieces, each in a module of its own:

- ``nn``, ``losses``, ``optim``: the numpy network (no MPI in sight);
- ``data``, ``mnist``, ``sampler``: HDF5 data, preparation, and which rank
  trains on which rows at each step (``plan``: with the learning rate);
- ``comm``: the only module that imports mpi4py;
- ``step``: one data-parallel training step; ``evaluation``: evaluation;
- ``train``: the loop, with ``callbacks`` around it (progress, metrics,
  replica checks, checkpoints; ``debug`` for --debug);
- ``checkpoint``, ``resume``: verified checkpoints, and resuming from them;
- ``rank0``: what only rank 0 does (printing, the run folder);
- ``runner``: setting a run up; ``cli``: options and exit statuses.
"""

__version__ = "0.2.0"
