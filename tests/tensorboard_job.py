"""A script that trains with ``ddptrain.train(..., tensorboard=True)``, as a user's would, on ranks
that cannot import tensorboardX unless they are rank 0.

    [mpiexec -n P] python tests/tensorboard_job.py DATA RUN_DIR

Every rank but rank 0 has ``sys.modules["tensorboardX"] = None`` before it
imports ddptrain: if such a rank tried to import tensorboardX, the import would
fail and so would the job. Only rank 0 writes the events, and only rank 0 needs
the library.
"""

import sys

from ddptrain.distributed.launcher import rank_and_size

if rank_and_size()[0] != 0:
    sys.modules["tensorboardX"] = None   # an import of it fails from here on

import ddptrain  # noqa: E402


def main(data, run_dir):
    result = ddptrain.train("64-16-10", data=data, epochs=2, batch_size=16, dtype="float64",
                            tensorboard=True, metrics_every=3, threads=1, run_dir=run_dir,
                            quiet=True)
    assert result.epochs == 2


if __name__ == "__main__":
    main(*sys.argv[1:])
