"""The benchmark's command line: its options, and whether this process runs the benchmark or one of
its workers (``--worker``, started by the benchmark itself in fresh processes)."""

from __future__ import annotations

import argparse

import time_to_accuracy  # scripts/time_to_accuracy.py, beside this package

from . import __doc__ as DESCRIPTION
from .ddptrain_internals import DENORMAL_MODES, GEMMS, denormals_flushed
from .workload import use_images_of


def parser():
    p = argparse.ArgumentParser(description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="HDF5 data file, or 'random' for random data of MNIST's shape "
                                  "(default: ddptrain's MNIST in the cache, prepared if missing)")
    p.add_argument("--model", default="784-512-256-10")
    p.add_argument("--bn-model", help="the model of the batch-normalisation rows (default: --model "
                                      "with 'bn' after every hidden size, 784-512-bn-256-bn-10 for "
                                      "the default)")
    p.add_argument("--no-bn", action="store_true", help="skip the batch-normalisation rows")
    p.add_argument("--cnn-model", default="cnn",
                   help="the model of the CNN rows (default: %(default)s)")
    p.add_argument("--no-cnn", action="store_true", help="skip the CNN rows")
    p.add_argument("--cnn-samples", type=int, default=7680,
                   help="samples per timed repetition of the CNN rows (default: %(default)s)")
    p.add_argument("--batch-sizes", default="128,512",
                   help="global batch sizes (default: %(default)s)")
    p.add_argument("--ranks", type=int, default=2,
                   help="MPI ranks / DDP processes (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0,
                   help="thread budget, shared by the ranks (default: every core this process may "
                        "use)")
    p.add_argument("--rounds", type=int, default=3,
                   help="launches per row, interleaved (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed repetitions per launch (default: %(default)s)")
    p.add_argument("--samples", type=int, default=61440,
                   help="samples per timed repetition (default: %(default)s, about one epoch)")
    p.add_argument("--lr", type=float, default=0.01, help="learning rate of the timed steps")
    p.add_argument("--tta-repeats", type=int, default=3,
                   help="runs of the time-to-accuracy command")
    p.add_argument("--tta-args", default=time_to_accuracy.DEFAULT_OPTIONS,
                   help="options of the time-to-accuracy run (default: %(default)r)")
    p.add_argument("--no-tta", action="store_true", help="skip the time-to-accuracy runs")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
    p.add_argument("--recipe", default="cnn-fast", metavar="MODEL",
                   help="the named model whose recipe is timed to --recipe-target on --ranks "
                        "ranks, in ddptrain and in PyTorch (default: %(default)s)")
    p.add_argument("--recipe-target", type=float, default=99.3, metavar="PERCENT",
                   help="test accuracy of the recipe's time to accuracy (default: %(default)s)")
    p.add_argument("--recipe-seeds", default="0,1,2",
                   help="the recipe's runs, one per seed, each side (default: %(default)s)")
    p.add_argument("--no-recipe", action="store_true",
                   help="skip the recipe's time-to-accuracy runs")
    p.add_argument("--no-hosts", action="store_true",
                   help="skip the rows across 2 fake hosts (network namespaces: they need root and "
                        "`ip`)")
    p.add_argument("--gemm", choices=GEMMS, default="auto",
                   help="the library of ddptrain's matrix products, as ddptrain's --gemm (default: "
                        "%(default)s); where it is MKL, rows with --gemm numpy are added")
    p.add_argument("--denormals", choices=DENORMAL_MODES, default="flush",
                   help="ddptrain's --denormals in its rows (default: %(default)s, as in a run)")
    p.add_argument("--isa", choices=("native", "avx2"), default="native",
                   help="the vector instructions every library may use in every row: the CPU's own "
                        "(default), or AVX2 only, to measure a CPU without AVX-512 on one with it")
    p.add_argument("--stream-memory", default="20M", metavar="SIZE",
                   help="the --data-memory per rank of the streamed row (default: %(default)s; the "
                        "MNIST file's shards hold 23 MiB per rank on 2 ranks)")
    p.add_argument("--read-file-mib", type=float, default=1024, metavar="MIB",
                   help="the reads of the file (disk, whole shards, streams) are measured on a "
                        "file of at least MIB MiB: the data file, or its training rows repeated "
                        "to that size in a temporary file (default: %(default)s)")
    p.add_argument("--no-reproducible", action="store_true",
                   help="skip the rows of --reproducible (beside the default, as ratios)")
    p.add_argument("--no-stream", action="store_true",
                   help="skip the rows of streamed shards and the reads of the file")
    p.add_argument("--json", metavar="PATH", help="also write every measurement to PATH")
    p.add_argument("--quick", action="store_true",
                   help="tiny settings, to check that the benchmark runs (numbers meaningless)")
    # Internal: one measurement in this process (started by the benchmark itself).
    p.add_argument("--worker", choices=("ddptrain", "torch", "gemm", "stream-read",
                                        "torch-recipe"),
                   help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--threads-per-rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--no-allreduce", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--end-to-end", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shard-optimizer", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--overlap-allreduce", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bucket-mb", type=float, default=0.25, help=argparse.SUPPRESS)
    p.add_argument("--exchange", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--batchnorm", default="global", help=argparse.SUPPRESS)
    p.add_argument("--stream", help=argparse.SUPPRESS)   # "memory", or --data-memory
    p.add_argument("--reproducible", action="store_true", help=argparse.SUPPRESS)
    return p


def run_worker(opts):
    """One measurement in this process, its result written to ``--out``."""
    from .ddptrain_rows import worker_ddptrain
    from .gemm_limit import worker_gemm
    from .streaming import worker_stream_read
    from .torch_recipe import worker_torch_recipe
    from .torch_rows import worker_torch

    use_images_of(opts.data)
    # ddptrain's rows flush denormals as its runs do (--denormals); PyTorch's keep its default.
    with denormals_flushed(opts.worker == "ddptrain" and opts.denormals == "flush"):
        {"ddptrain": worker_ddptrain, "torch": worker_torch, "gemm": worker_gemm,
         "stream-read": worker_stream_read, "torch-recipe": worker_torch_recipe}[opts.worker](opts)
    return 0


def main(argv=None):
    opts = parser().parse_args(argv)
    if opts.worker:
        return run_worker(opts)
    from .run import run_benchmark
    return run_benchmark(opts)
