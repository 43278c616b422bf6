"""Everything that exists because training is distributed: communicators (``comm``, the only module
that imports mpi4py), the launcher and SLURM, the checks that every rank agrees, and the gradient
exchange (``exchange``: one interface, four variants) with what it builds on (node memory, sharding,
buckets)."""
