"""Command line: ``python -m ddptrain [train|evaluate|export|prepare|plot|info|verify] [options]``.

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
import sys
import traceback

from ddptrain import commands, export, plot, supervisor, verify_command
from ddptrain.api import check_data_file, launch
from ddptrain.data import datasets
from ddptrain.distributed.launcher import rank_and_size
from ddptrain.distributed.world import world
from ddptrain.errors import StartUpInterrupted, UserError, same_on_every_rank
from ddptrain.nn.spec import NAMED_MODELS
from ddptrain.optim.optimizers import OPTIMIZERS
from ddptrain.run.config import (
    BATCHNORM_MODES,
    DENORMAL_MODES,
    DTYPES,
    EARLY_STOP_METRICS,
    EXCHANGES,
    GEMMS,
    LR_SCALINGS,
    SCHEDULES,
    SWITCHES,
    THREAD_WORK,
    Config,
    load_toml,
    make_config,
)
from ddptrain.run.data_memory import SIZE_HELP, parse_size
from ddptrain.run.ending import end_rank, message_of
from ddptrain.run.signals import ignore_stop_signals, restore_default_signals

COMMANDS = ("train", "evaluate", "export", "prepare", "plot", "info", "verify")


def _size(text):
    """--data-memory's argument: bytes (``data_memory.parse_size``)."""
    try:
        return parse_size(text)
    except ValueError as problem:
        raise argparse.ArgumentTypeError(f"must be {problem}") from None


class Interrupted(Exception):
    """Ctrl-C in a command other than training (which stops cleanly after a step instead)."""

    exit_status = 130   # 128 + SIGINT, as a shell reports a program that Ctrl-C ended
    all_ranks = True


class _Parser(argparse.ArgumentParser):
    """An argparse parser that prints help on rank 0 only and reports errors as a UserError line."""

    def _print_message(self, message, file=None):
        if rank_and_size()[0] == 0:
            super()._print_message(message, file)

    def error(self, message):
        failure = UserError(f"{message} (see --help)")
        failure.all_ranks = True
        raise failure


def _named_models():
    def option(name, value):
        flag = "--" + name.replace("_", "-")
        return flag if value is True else f"{flag} {value}"

    return "; ".join(f"{name}: {model.spec} ({model.about}; its defaults: "
                     f"{', '.join(option(k, v) for k, v in model.defaults.items())})"
                     for name, model in NAMED_MODELS.items())


_MODEL_HELP = (
    "the network, as tokens joined by '-'. An MLP: layer sizes, input first and classes last "
    "(784-512-256-10). A CNN starts with a convolution and takes its input from the data: "
    "conv<F>k<K>[s<S>][p<P>] (F filters of KxK, stride S, P pixels of zero padding; then a ReLU), "
    "maxpool<K>[s<S>], avgpool<K>[s<S>], then 'flatten' and layer sizes "
    "(conv32k3p1-bn-maxpool2-flatten-128-10). 'bn' after a size or conv adds batch normalisation "
    "(before its ReLU), 'drop<p>' dropout (after it). Named models, whose defaults apply to the "
    "options you do not set: " + "{named}")


def _option(group, name, help, **kwargs):
    """An option whose default comes from Config (or a --config file), shown in --help."""
    field = name.lstrip("-").replace("-", "_")
    default = getattr(Config(), field)
    help = help.replace("{named}", _named_models()) if field == "model" else help
    shown = "" if kwargs.get("action") == "store_true" else f" (default: {default})"
    group.add_argument(name, help=help.replace("%", "%%") + shown,
                       default=argparse.SUPPRESS, **kwargs)


def _add_train_arguments(parser):
    parser.add_argument("--config", metavar="FILE.toml",
                        help="read options from a TOML file (keys as the long options, e.g. "
                             "batch-size = 256); options given on the command line override it")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the options, the data file, the model and the number of "
                             "ranks, then exit")
    group = parser.add_argument_group("data and model")
    _option(group, "--data", "HDF5 data file, or a known set's name (mnist, fashion-mnist: "
            "prepared in the cache on first use); default: MNIST", metavar="PATH|NAME")
    _option(group, "--model", _MODEL_HELP, metavar="SPEC")
    _option(group, "--batchnorm", "global: batch statistics of the whole global batch, the same "
            "for any number of ranks (as PyTorch's SyncBatchNorm); local: each rank's own rows "
            "(as plain DDP), for comparison", choices=BATCHNORM_MODES)
    _option(group, "--dtype", "floating-point type of parameters and data", choices=DTYPES)

    group = parser.add_argument_group("optimisation (the same for any number of ranks)")
    _option(group, "--epochs", "passes over the training set", type=int, metavar="N")
    group.add_argument("--max-steps", type=int, metavar="N", default=argparse.SUPPRESS,
                       help="stop after N optimiser steps in all, counted across epochs (a "
                            "checkpoint at the end, status 0; the learning-rate schedule stays "
                            "that of --epochs) (default: when the epochs end)")
    _option(group, "--early-stop", "stop after PATIENCE epochs in a row in which the test loss "
            "(--early-stop-metric) has not improved on its best by more than "
            "--early-stop-min-delta: every rank after the same epoch, with a checkpoint, best.h5 "
            "holding the best epoch by that metric, status 0; 0: never", type=int,
            metavar="PATIENCE")
    _option(group, "--early-stop-min-delta", "what a test value must beat the best by to count as "
            "an improvement, in the metric's units (an accuracy is from 0 to 1)", type=float,
            metavar="X")
    _option(group, "--early-stop-metric", "what early stopping watches (lower loss, higher "
            "accuracy is better)", choices=tuple(EARLY_STOP_METRICS))
    _option(group, "--batch-size", "GLOBAL batch in samples per step, shared by all ranks",
            type=int, metavar="N")
    _option(group, "--lr", "peak learning rate", type=float, metavar="X")
    _option(group, "--lr-schedule", "after warmup: constant, cosine decay to 0, or step decay",
            choices=SCHEDULES)
    _option(group, "--warmup-epochs", "linear warmup from 0, in epochs (may be fractional)",
            type=float, metavar="E")
    _option(group, "--step-size", "epochs between decays of the step schedule", type=int,
            metavar="E")
    _option(group, "--step-gamma", "factor of each step decay", type=float, metavar="X")
    _option(group, "--lr-scaling", "linear: peak lr = lr * batch-size / reference-batch "
            "(Goyal et al. 2017)", choices=LR_SCALINGS)
    _option(group, "--reference-batch", "the batch size --lr is meant for, with --lr-scaling "
            "linear", type=int, metavar="N")
    _option(group, "--optimizer", "sgd: SGD with momentum; adam: Adam; adamw: Adam with decoupled "
            "weight decay (PyTorch's formulas)", choices=tuple(OPTIMIZERS))
    _option(group, "--momentum", "SGD's momentum", type=float, metavar="X")
    _option(group, "--nesterov", "SGD's Nesterov momentum", action="store_true")
    _option(group, "--beta1", "Adam's and AdamW's decay of the first moment", type=float,
            metavar="X")
    _option(group, "--beta2", "Adam's and AdamW's decay of the second moment", type=float,
            metavar="X")
    _option(group, "--eps", "Adam's and AdamW's epsilon, added outside the square root", type=float,
            metavar="X")
    _option(group, "--weight-decay", "sgd and adam: L2 penalty added to the gradient of all "
            "parameters; adamw: decoupled decay, parameters *= 1 - lr * X", type=float, metavar="X")
    _option(group, "--accumulate", "gradient accumulation: each rank runs its share of the global "
            "batch as K micro-batches (the activations of one only) and reduces the gradient once "
            "per step; the same training as without (not with batch normalisation, refused)",
            type=int, metavar="K")
    _option(group, "--shard-optimizer", "each rank keeps the optimiser state of 1/P of the "
            "parameters (ZeRO stage 1): the gradient is reduce-scattered, each rank updates its "
            "slice, the parameters are allgathered; checkpoints hold the whole state, so a run "
            "resumes on any number of ranks", action="store_true")
    _option(group, "--overlap-allreduce", "reduce the gradient in buckets of --bucket-mb while "
            "backward is still running (non-blocking Allreduces, as PyTorch DDP): can hide "
            "communication between hosts", action="store_true")
    _option(group, "--reproducible", "bitwise the same parameters, metrics and checkpoints on any "
            "number of ranks as in one process: every rank holds the whole global batch and the "
            "matrix products run in fixed blocks of columns shared out among the ranks "
            "(docs/reproducible.md); check it with 'ddptrain verify'", action="store_true")
    _option(group, "--exchange", "how the ranks sum the gradient: shared-memory (the ranks of a "
            "node share one copy of the parameters in the node's memory, sum each other's "
            "gradients there, each updates 1/L of the parameters, and nodes exchange slices with "
            "MPI), allreduce (MPI Allreduce, every rank updates every parameter), or auto: "
            "shared-memory where it works", choices=EXCHANGES)
    _option(group, "--bucket-mb", "the size of --overlap-allreduce's buckets, in MiB", type=float,
            metavar="MB")
    _option(group, "--clip-grad-norm", "clip the allreduced (global) gradient to this 2-norm, as "
            "PyTorch's clip_grad_norm_; the norm is in the step records of --metrics-every; 0: no "
            "clipping", type=float, metavar="X")
    _option(group, "--seed", "fixes the initial parameters and the order of the batches", type=int,
            metavar="N")
    _option(group, "--drop-last", "drop the last, shorter batch of each epoch", action="store_true")
    _option(group, "--virtual-shards", "the training rows are cut into V blocks and the number of "
            "ranks must divide V; keep V fixed to get the same batches on any number of ranks",
            type=int, metavar="V")
    _option(group, "--data-memory", "the most memory each rank holds of the training rows: "
            "beyond it, each rank streams its shard from the file through windows read ahead by a "
            "thread, and rows are shuffled within windows; the same batches on any number of "
            "ranks P with the same P x SIZE (docs/data.md#streaming). SIZE: " + SIZE_HELP + "; 0: "
            "in memory where the host has room for it, streamed (said in one line) otherwise",
            type=_size, metavar="SIZE")

    group = parser.add_argument_group("outputs, checkpoints and resuming")
    _option(group, "--run-dir", "folder for config.json, metrics.jsonl and checkpoints/; default: "
            "runs/slurm-<job id> under SLURM, else runs/run-<date-time>", metavar="DIR")
    _option(group, "--checkpoint-every", "also checkpoint every STEPS steps; 0: at the end of each "
            "epoch only", type=int, metavar="STEPS")
    _option(group, "--keep", "keep the K newest checkpoints (plus best.h5)", type=int, metavar="K")
    _option(group, "--resume", "'auto': the newest valid checkpoint in the run folder, if any; or "
            "a checkpoint file", metavar="auto|PATH")
    _option(group, "--allow-other-data", "resume even on a data file whose content checksum "
            "(content_sha256) is not the one the checkpoint was trained on: a re-encoded copy",
            action="store_true")
    _option(group, "--log-every", "steps between progress lines (when the output is not a "
            "terminal)", type=int, metavar="STEPS")
    _option(group, "--metrics-every", "also append a record to metrics.jsonl every STEPS steps; 0: "
            "per epoch only", type=int, metavar="STEPS")
    _option(group, "--tensorboard", "also write metrics.jsonl's records (per step: loss, learning "
            "rate, gradient norm, samples/s; per epoch: train and test loss and accuracy), a "
            "histogram of each parameter every epoch and the configuration as TensorBoard events "
            "in RUN_DIR/tensorboard (rank 0, with tensorboardX: pip install -e '.[tensorboard]'); "
            "sets --metrics-every 10 unless it is given", action="store_true")
    _option(group, "--record-hashes", "write RUN_DIR/hashes.jsonl: after every step, the sha256 "
            "of the parameters and buffers and the step's loss (what 'ddptrain verify' compares)",
            action="store_true")
    _option(group, "--profile", "record a timeline of STEPS steps (after the first) on every rank: "
            "RUN_DIR/timeline.json, for Perfetto or chrome://tracing; `ddptrain info RUN_DIR` "
            "summarises it; 0: none", type=int, metavar="STEPS")
    group.add_argument("--quiet", action="store_true", help="print only the start-up lines, one "
                       "line per epoch and errors")

    group = parser.add_argument_group("parallelism and debugging")
    _option(group, "--threads", "threads per rank (where they work: --thread-work); 0: the cores "
            "a rank may use, divided by the ranks sharing them", type=int, metavar="N")
    _option(group, "--thread-work", "where a rank's threads work: rows (each thread forward and "
            "backward on a slice of the step's rows, with a one-thread BLAS), blas (the BLAS's "
            "threads inside each matrix product), or auto: rows for a model with convolutions, "
            "blas otherwise (docs/performance.md)", choices=THREAD_WORK)
    _option(group, "--gemm", "the library of the matrix products: numpy (numpy's BLAS, OpenBLAS in "
            "its wheels), mkl (Intel's MKL: pip install -e '.[mkl]'), or auto: MKL where it is "
            "installed and the CPU is Intel's, else numpy", choices=GEMMS)
    _option(group, "--denormals", "flush (the default: floats below 1.2e-38 computed as zero, as "
            "TensorFlow does; SGD's momentum makes them, and they are about 100x slower) or keep",
            choices=DENORMAL_MODES)
    _option(group, "--check-every", "steps between checks that all ranks hold identical parameters",
            type=int, metavar="STEPS")
    _option(group, "--eval-batch", "rows per forward pass during evaluation", type=int, metavar="N")
    _option(group, "--simulate-ranks", "run P ranks as threads of one process, without MPI "
            "(same batches and parameters as mpirun -n P): debug the distributed logic with pdb",
            type=int, metavar="P")
    _option(group, "--stall-timeout", "a rank that waits longer than SECONDS inside a collective "
            "(for a stopped or hung rank) ends the job (status 1), naming the ranks that never "
            "arrived; more than the longest checkpoint write. 0: wait forever", type=float,
            metavar="SECONDS")
    _option(group, "--debug", "float64; check the allreduced gradient against finite differences "
            "of the global-batch loss at the first step; NaN/Inf checks after every layer; replica "
            "check every step", action="store_true")


def _add_export_arguments(parser):
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint file (.h5)")
    parser.add_argument("--format", required=True, choices=tuple(export.FORMATS),
                        help="onnx: the model, from the raw images to the logits and "
                             "probabilities (needs the onnx extra); safetensors: the parameters "
                             "and buffers under their ddptrain names (needs the safetensors extra)")
    parser.add_argument("--output", metavar="PATH", help="default: beside the checkpoint, "
                        "best.h5 -> best.onnx or best.safetensors")
    parser.add_argument("--force", action="store_true", help="replace PATH if it exists")
    parser.add_argument("--data", metavar="PATH", help="data file, or a known set's name, whose "
                        "images the model takes: their shape and class names (default: the data "
                        "the checkpoint was trained on, else the cached MNIST)")
    parser.add_argument("--input", choices=export.INPUTS, default="pixels", help="onnx: the "
                        "input is uint8 pixels as the data file stores them (pixels, the "
                        "default), or float32 values already divided by 255 (scaled)")


def build_parser():
    parser = _Parser(prog="ddptrain", description="Data-parallel training of a numpy MLP or CNN on "
                     "image data in HDF5. Run as `python -m ddptrain` (one process) or `mpirun -n "
                     "4 python -m ddptrain`; the command 'train' is the default.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_train_arguments(commands.add_parser(
        "train", help="train (the default command)",
        description="Train; the options may be given without the word 'train'. The batch size is "
                    "the GLOBAL batch: with P ranks each rank trains on about batch-size/P "
                    "samples per step."))
    evaluate = commands.add_parser("evaluate", help="test loss, accuracy, per-class accuracy and "
                                   "confusion matrix of a checkpoint")
    evaluate.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint file (.h5)")
    evaluate.add_argument("--data", metavar="PATH", help="data file, or a known set's name "
                          "(default: the data the checkpoint was trained on, else the "
                          "cached MNIST)")
    evaluate.add_argument("--eval-batch", type=int, default=Config().eval_batch, metavar="N",
                          help="rows per forward pass (default: %(default)s)")
    _add_export_arguments(commands.add_parser(
        "export", help="a checkpoint's model as ONNX, or its parameters and buffers as "
        "safetensors", description="Export a checkpoint (verified as evaluate verifies it) for "
        "other runtimes and frameworks; see docs/export.md."))
    datasets.add_arguments(commands.add_parser("prepare", help="a data set (mnist, fashion-mnist, "
                                               "or IDX files of your own) as the HDF5 data file"))
    # for --help only: main hands `launch ...` to the supervisor before parsing
    commands.add_parser("launch", add_help=False, help="mpiexec -n N python -m ddptrain OPTIONS, "
                        "passing stop signals on only once every rank can take them (see "
                        "ddptrain launch --help)")
    # for --help only: main hands `verify ...` to verify_command before parsing
    commands.add_parser("verify", add_help=False, help="train your options in one process and on "
                        "P ranks for N steps and compare: bitwise equal at every step, or where "
                        "they part and by how much (see ddptrain verify --help)")
    plot = commands.add_parser("plot", help="PNG curves of train and test loss and test "
                               "accuracy of a run")
    plot.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (holding metrics.jsonl)")
    plot.add_argument("--output", metavar="FILE.png", help="default: RUN_DIR/curves.png")
    info = commands.add_parser("info", help="versions, MPI library and world size, BLAS threads, "
                               "the data file, a model's layers and FLOPs; or what a run folder "
                               "holds, with its timeline's share of the step per phase per rank")
    info.add_argument("run_dir", metavar="RUN_DIR", nargs="?", help="a run folder: its "
                      "configuration, checkpoints, metrics and timeline (--profile)")
    info.add_argument("--data", metavar="PATH", help="data file (or a known set's name) to "
                      "describe (default: the cached MNIST, if any)")
    info.add_argument("--model", metavar="SPEC", default=Config().model,
                      help="model to describe: its layers, parameters and FLOPs per sample on the "
                           "data's images (default: %(default)s)")
    return parser


def config_from_args(args):
    """Config defaults, overridden by a named model's defaults (``--model cnn``), overridden by the
    --config file, overridden by the options given.

    The file's ``quiet`` and ``dry-run`` switch those on (``args`` is updated).
    """
    values = load_toml(args.config) if getattr(args, "config", None) else {}
    for switch in SWITCHES:
        if values.pop(switch, False):
            setattr(args, switch, True)
    given = {name: value for name, value in vars(args).items()
             if name in Config.__dataclass_fields__}
    return make_config({**values, **given})


def training_options(words):
    """The training options ``words`` (``train``'s): the names of those given, and their validated
    Config. For ``ddptrain verify``, which passes them on to its runs."""
    args = parse(["train", *words])
    with same_on_every_rank():
        config = config_from_args(args)
    return set(vars(args)), config


def parse(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv.insert(0, "train")
    return build_parser().parse_args(argv)


def main(argv=None, callbacks=()):
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    ``callbacks`` (``ddptrain.training.trainer.Callback``) are added to a training run's own.
    """
    comm = None
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        if argv[:1] == ["launch"]:   # mpiexec under a supervisor: nothing of MPI in this process
            return supervisor.main(argv[1:])
        if argv[:1] == ["verify"]:   # its own options, and train's passed on to its runs
            restore_default_signals()
            return verify_command.main(argv[1:], training_options)
        args = parse(argv)
        if args.command != "train":
            restore_default_signals()   # only a training run stops cleanly after a step
        if args.command == "prepare":
            return datasets.run(args)
        if args.command == "plot":
            return plot.run(args)
        if args.command == "info":
            return commands.info(args, world())
        if args.command == "export":
            return export.run(args)
        if args.command == "evaluate":
            with same_on_every_rank():
                # without it, the checkpoint names the data: checked once it is known
                if args.data:
                    check_data_file(args.data)
            comm = world()
            return commands.evaluate(args, comm)
        # Training: the options become a Config, and the run is the one ddptrain.train launches.
        with same_on_every_rank():
            config = config_from_args(args)
        status = launch(config, quiet=args.quiet, dry_run=args.dry_run,
                        callbacks=callbacks).exit_status
        ignore_stop_signals()   # the run is over: a late signal cannot change its status now
        return status
    except (UserError, StartUpInterrupted) as error:
        return end_rank(str(error), error, comm)
    except SystemExit:
        raise
    except KeyboardInterrupt:   # Ctrl-C in a command other than training
        return end_rank(message_of(KeyboardInterrupt()), Interrupted(), comm)
    except BaseException as error:
        return end_rank(message_of(error), error, comm, traceback.format_exc())


if __name__ == "__main__":
    sys.exit(main())
