"""``python -m ddptrain`` and the ``ddptrain`` command.

Stop signals are remembered from the first line ddptrain runs, before the
imports that take a few tenths of a second (numpy, h5py, mpi4py): a SIGTERM,
SIGUSR1 or SIGINT that arrives while the program starts stops a training run
after its first step, with a checkpoint, as one that arrives later does.
"""

import sys

from ddptrain.run.signals import remember_early_signals


def main(argv=None):
    remember_early_signals()
    from ddptrain.cli import (
        main as run_command_line,  # after the line above: the slow imports start here
    )
    return run_command_line(argv)


if __name__ == "__main__":
    sys.exit(main())
