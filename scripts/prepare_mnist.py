#!/usr/bin/env python3
"""Write an HDF5 data file that ddptrain trains on: MNIST, Fashion-MNIST, or a set of your own.

    python scripts/prepare_mnist.py [NAME] [--idx-dir DIR | --npy-dir DIR] [--name NAME]
                                    [--classes N] [--class-names A,B,...] [--output FILE]

The same as ``python -m ddptrain prepare``.

Works from a checkout without installing ddptrain.
"""

import argparse
import pathlib
import sys

try:
    import ddptrain  # noqa: F401  (installed, or the checkout is already on sys.path)
except ImportError:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from ddptrain.data import datasets  # noqa: E402
from ddptrain.errors import UserError  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(prog="prepare_mnist", description=__doc__.splitlines()[0])
    datasets.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return datasets.run(args)
    except UserError as e:
        print(f"prepare_mnist: error: {e}", file=sys.stderr)
        return e.exit_status


if __name__ == "__main__":
    sys.exit(main())
