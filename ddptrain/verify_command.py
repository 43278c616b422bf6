"""``ddptrain verify --ranks 1,2,4 --steps N [training options]``: your configuration trained on one
process and on each rank count, compared step by step (``verification``).

Each run is a process of its own, as you would start it: one process for 1
rank, and ``ddptrain launch -n P`` (mpiexec under the supervisor, with
``--mpiexec PATH`` if given) for P ranks, each into its own temporary run
folder with ``--max-steps N --record-hashes`` and the training options
passed through unchanged. The options are checked here first, as ``train``
checks them, so that a bad one is one line before any run starts.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ddptrain.distributed.launcher import launched_by_mpi
from ddptrain.errors import EXIT_FAILURE, EXIT_OK, UserError
from ddptrain.run.config import option_name
from ddptrain.verification import (
    OWN_OPTIONS,
    check_rank_counts,
    check_steps,
    check_tolerance,
    compare_runs,
    parse_ranks,
)

DESCRIPTION = """\
Train your configuration for N steps in one process and on each number of ranks of --ranks, and
compare: per rank count, whether the parameters and buffers are bitwise those of one process after
every step, or the first step where they differ and the largest difference of the final
parameters. Exit status 0 only when every rank count is bitwise equal (with --reproducible among
the training options) or within --tolerance (without). The training options are those of
`ddptrain train` (--data, --model, --batch-size, --reproducible, ...), passed to every run; see
docs/reproducible.md."""


class RunFailed(UserError):
    """A run of the verification ended with an error: one line, naming its rank count."""

    exit_status = EXIT_FAILURE


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"verify: {message} (see ddptrain verify --help)")


def build_parser():
    parser = _Parser(prog="ddptrain verify", description=DESCRIPTION, allow_abbrev=False,
                     usage="ddptrain verify --ranks 1,2,4 --steps N [--tolerance X] "
                           "[--mpiexec PATH] [--dry-run] [--keep-runs] [training options]")
    parser.add_argument("--ranks", default="1,2,4", metavar="P,Q,...",
                        help="the numbers of ranks to compare with one process (default: "
                             "%(default)s); each must share the data's --virtual-shards evenly")
    parser.add_argument("--steps", type=int, default=10, metavar="N",
                        help="optimiser steps each run trains (default: %(default)s)")
    parser.add_argument("--tolerance", type=float, metavar="X",
                        help="without --reproducible: the largest absolute difference of the "
                             "final parameters that passes (default: 1e-4 in float32, 1e-10 in "
                             "float64)")
    parser.add_argument("--mpiexec", metavar="PATH", help="the MPI launcher of the runs on more "
                        "than one rank (default: ddptrain launch's: the mpiexec beside this "
                        "Python, else on PATH)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the options and print the commands, without running them")
    parser.add_argument("--keep-runs", action="store_true",
                        help="keep the runs' folders (hashes.jsonl, checkpoints) and say where")
    return parser


def main(argv, training_options):
    """Run ``ddptrain verify ARGV``; returns the exit status. ``training_options(words)``: the
    ``(names given, Config)`` of the training options ``words`` (``cli``'s parsing), or a
    UserError."""
    args, rest = build_parser().parse_known_args(argv)
    if launched_by_mpi():
        raise UserError("verify starts the ranks itself: run it as one process, without "
                        "mpirun/srun")
    given, config = training_options(rest)
    for name in OWN_OPTIONS:
        if name in given or name in ("resume", "simulate_ranks") and getattr(config, name):
            raise UserError(f"verify: {option_name(name)} is verify's to set in each run (or to "
                            "leave out): drop it")
    steps = check_steps(args.steps)
    counts = check_rank_counts(parse_ranks(args.ranks), config.batch_size, config.virtual_shards)
    check_tolerance(args.tolerance, config.dtype)
    if args.mpiexec is not None and shutil.which(args.mpiexec) is None:
        raise UserError(f"verify --mpiexec {args.mpiexec}: no such program")
    work = Path(tempfile.mkdtemp(prefix="ddptrain-verify-"))
    try:
        commands = {count: command(count, rest, work / f"ranks-{count}", steps, args.mpiexec)
                    for count in sorted({1, *counts})}
        if args.dry_run:
            for count, argv in commands.items():
                print(f"{_ranks(count)}: {shlex.join(argv)}")
            print("dry run: the options check out; nothing was run")
            return EXIT_OK
        print(f"verify: {steps} steps in one process and on {', '.join(map(str, counts))} "
              f"rank(s){', --reproducible' if config.reproducible else ''}", flush=True)
        for count, argv in commands.items():
            run(count, argv)
        result = compare_runs({count: work / f"ranks-{count}" for count in commands},
                              args.tolerance)
        print("\n".join(result.lines()))
        return EXIT_OK if result.ok else EXIT_FAILURE
    finally:
        if args.keep_runs:
            print(f"verify: the runs' folders are in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def command(count, options, run_dir, steps, mpiexec=None):
    """The command line of the run on ``count`` ranks: the training ``options`` and what verify
    adds."""
    train = ["train", *options, "--run-dir", str(run_dir), "--max-steps", str(steps),
             "--record-hashes", "--quiet"]
    if count == 1:
        return [sys.executable, "-m", "ddptrain", *train]
    launcher = ["launch", "-n", str(count), *(["--mpiexec", mpiexec] if mpiexec else []), "--"]
    return [sys.executable, "-m", "ddptrain", *launcher, *train]


def run(count, argv):
    """Run one command to its end; a RunFailed naming the rank count and the end of its errors if
    it fails."""
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        tail = lines[-1][:300] if lines else "no output"
        raise RunFailed(f"verify: the run on {_ranks(count)} failed (status {proc.returncode}): "
                        f"{tail}")
    print(f"  ran {_ranks(count)} in {time.perf_counter() - started:.1f} s", flush=True)


def _ranks(count):
    return f"{count} rank{'s' if count > 1 else ''}"
