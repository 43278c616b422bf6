"""Command line: ``python -m ddptrain [train] [options]`` and ``python -m ddptrain prepare``.

Exit statuses (see ``errors``): 0 success, 1 unexpected failure, 2 bad input,
3 stopped by a signal after writing a checkpoint.

Errors are reported once. An error every rank meets the same way (a bad
option, a bad data file, a failed checkpoint write on rank 0) is printed by
rank 0 and every rank exits with its status. An error on some ranks only is
printed with the rank that met it, and the whole MPI job is aborted so that
no rank waits forever in a collective.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from .config import DTYPES, SCHEDULES, Config
from .errors import EXIT_FAILURE, UserError, same_on_every_rank

COMMANDS = ("train", "prepare")


def _launcher_rank():
    """This process's rank as the launcher announced it (before MPI is initialised)."""
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


class _Parser(argparse.ArgumentParser):
    """An argparse parser that prints help on rank 0 only and reports errors as a UserError line."""

    def _print_message(self, message, file=None):
        if _launcher_rank() == 0:
            super()._print_message(message, file)

    def error(self, message):
        failure = UserError(f"{message} (see --help)")
        failure.all_ranks = True
        raise failure


def _add_train_arguments(parser):
    defaults = Config()
    group = parser.add_argument_group("data and model")
    group.add_argument("--data", metavar="PATH", help="HDF5 data file (default: MNIST prepared in the cache, "
                       "downloaded and converted on first use)")
    group.add_argument("--model", metavar="SPEC", default=defaults.model,
                       help="layer sizes of the MLP, input first (default: %(default)s)")
    group.add_argument("--dtype", choices=DTYPES, default=defaults.dtype, help="default: %(default)s")

    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=int, default=defaults.epochs, metavar="N", help="default: %(default)s")
    group.add_argument("--batch-size", type=int, default=defaults.batch_size, metavar="N",
                       help="GLOBAL batch size in samples, shared by all ranks (default: %(default)s)")
    group.add_argument("--lr", type=float, default=defaults.lr, metavar="X",
                       help="peak learning rate (default: %(default)s)")
    group.add_argument("--lr-schedule", choices=SCHEDULES, default=defaults.lr_schedule,
                       help="after warmup (default: %(default)s)")
    group.add_argument("--warmup-epochs", type=float, default=defaults.warmup_epochs, metavar="E",
                       help="linear warmup length in epochs (default: %(default)s)")
    group.add_argument("--momentum", type=float, default=defaults.momentum, metavar="X",
                       help="default: %(default)s")
    group.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    group.add_argument("--weight-decay", type=float, default=defaults.weight_decay, metavar="X",
                       help="L2 penalty on all parameters (default: %(default)s)")
    group.add_argument("--seed", type=int, default=defaults.seed, metavar="N",
                       help="fixes initial parameters and batch order (default: %(default)s)")
    group.add_argument("--drop-last", action="store_true", help="drop the last, shorter batch of each epoch")
    group.add_argument("--virtual-shards", type=int, default=defaults.virtual_shards, metavar="V",
                       help="the training rows are cut into V blocks; the number of ranks must divide V; "
                            "keep V fixed to get the same batches on any number of ranks (default: %(default)s)")

    group = parser.add_argument_group("outputs, checkpoints and resuming")
    group.add_argument("--run-dir", metavar="DIR",
                       help="where metrics.jsonl, config.json and checkpoints/ go "
                            "(default: runs/slurm-<job id> under SLURM, else runs/run-<date-time>)")
    group.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every, metavar="STEPS",
                       help="also checkpoint every STEPS steps; 0: only at the end of each epoch "
                            "(default: %(default)s)")
    group.add_argument("--keep", type=int, default=defaults.keep, metavar="K",
                       help="keep the K newest checkpoints, plus best.h5 (default: %(default)s)")
    group.add_argument("--resume", metavar="auto|PATH",
                       help="'auto': the newest valid checkpoint in the run folder, if any; or a checkpoint file")
    group.add_argument("--log-every", type=int, default=defaults.log_every, metavar="STEPS",
                       help="steps between progress lines (default: %(default)s)")
    group.add_argument("--quiet", action="store_true", help="print only the start-up and per-epoch lines")

    group = parser.add_argument_group("parallelism and checks")
    group.add_argument("--threads", type=int, default=defaults.threads, metavar="N",
                       help="BLAS threads per rank; 0: the node's cores divided by its ranks (default: %(default)s)")
    group.add_argument("--check-every", type=int, default=defaults.check_every, metavar="STEPS",
                       help="steps between checks that all ranks hold identical parameters (default: %(default)s)")
    group.add_argument("--eval-batch", type=int, default=defaults.eval_batch, metavar="N",
                       help="rows per forward pass during evaluation (default: %(default)s)")


def build_parser():
    parser = _Parser(prog="ddptrain", description="Data-parallel training of a numpy MLP on MNIST in HDF5. "
                     "Run as `python -m ddptrain` (one process) or `mpirun -n 4 python -m ddptrain`.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_train_arguments(commands.add_parser("train", help="train (the default command)",
                                             description="Train; every option below may be given without "
                                                         "the word 'train'."))
    from . import mnist
    mnist.add_arguments(commands.add_parser("prepare", help="convert MNIST IDX files to the HDF5 data file"))
    return parser


def config_from_args(args):
    names = {f for f in Config.__dataclass_fields__} - {"extra"}
    return Config(**{name: getattr(args, name) for name in names if hasattr(args, name)})


def parse(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv.insert(0, "train")
    return build_parser().parse_args(argv)


def main(argv=None):
    comm = None
    try:
        args = parse(argv)
        if args.command == "prepare":
            from . import mnist
            return mnist.run(args)
        from .comm import world
        from .runner import run_training
        comm = world()
        with same_on_every_rank():
            config = config_from_args(args).validated()
        return run_training(config, comm, quiet=args.quiet)
    except UserError as error:
        return _fail(str(error), error, comm)
    except SystemExit:
        raise
    except BaseException as error:   # includes KeyboardInterrupt outside the training loop
        return _fail(f"{type(error).__name__}: {error}", error, comm, traceback.format_exc())


def _fail(message, error, comm, details=None):
    """Print the error once and end this rank (and, if only some ranks failed, the whole job)."""
    status = getattr(error, "exit_status", EXIT_FAILURE)
    rank, size = (comm.rank, comm.size) if comm is not None else (_launcher_rank(), 1)
    every_rank_failed = size == 1 or getattr(error, "all_ranks", False)
    if every_rank_failed:
        if rank == 0:
            if details and status == EXIT_FAILURE:
                sys.stderr.write(details)
            print(f"ddptrain: error: {message}", file=sys.stderr, flush=True)
        return status
    if details:
        sys.stderr.write("".join(f"[rank {rank}] {line}\n" for line in details.splitlines()))
    print(f"ddptrain: error on rank {rank} of {size}: {message}", file=sys.stderr, flush=True)
    comm.abort(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
