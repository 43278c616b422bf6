"""The ``evaluate`` and ``info`` commands.

``evaluate`` runs on any number of ranks, like training: each rank evaluates
its block of the test set and rank 0 prints the totals. ``info`` describes
the machine, a data file and a model; ``info RUN_DIR`` what a run folder
holds, with the summary of its timeline (``--profile``).
"""

from __future__ import annotations

import json
import math
import platform
import sys
from pathlib import Path

import numpy as np

from ddptrain import __version__
from ddptrain.backends import gemm
from ddptrain.backends.threads import configure_blas_threads
from ddptrain.data import datasets, format as data
from ddptrain.data.arrays import WHAT as IN_MEMORY
from ddptrain.data.readable import check_readable
from ddptrain.data.sampler import evaluation_block
from ddptrain.errors import EXIT_OK, UserError, same_on_every_rank
from ddptrain.files import open_regular
from ddptrain.nn.model import (
    Sequential,
    layer_flops,
    layers_from_description,
    name_layers,
    training_flops,
)
from ddptrain.nn.spec import parse_spec
from ddptrain.run import checkpoint as ckpt_io
from ddptrain.run.config import Config
from ddptrain.run.limits import check_resources
from ddptrain.run.preflight import check_fits_data, configure_gemm
from ddptrain.run.rank0 import run_on_rank0, timeline_paths
from ddptrain.run.resume import check_description_fits
from ddptrain.run.runner import read_split
from ddptrain.training.evaluation import evaluate as evaluate_split
from ddptrain.training.profiler import clocks_phrase
from ddptrain.training.trace import format_phases, read_trace


def data_for(checkpoint, given):
    """--data (a file, or a known set's name), else the data the checkpoint was trained on, else the
    cached MNIST: what ``evaluate`` evaluates on, and whose images ``export``'s model takes."""
    trained_on = given or checkpoint.config.get("data")
    if trained_on in datasets.KNOWN_DATASETS or not trained_on:
        return str(datasets.ensure_prepared(trained_on or "mnist"))
    if trained_on == IN_MEMORY and not given:
        raise UserError(f"{checkpoint.path}: the model was trained on {IN_MEMORY}: give a data "
                        "file of its kind of images with --data FILE")
    if given or Path(trained_on).is_file():
        return trained_on
    return str(datasets.ensure_prepared("mnist"))


def format_per_class(accuracy, confusion, class_names):
    """One line per class: its number, its name, its accuracy and its test rows."""
    width = max(5, *(len(name) for name in class_names))
    lines = [f"{'class':>5}  {'name':<{width}}  {'accuracy':>8}  {'rows':>6}"]
    for c, (name, value, rows) in enumerate(zip(class_names, accuracy, confusion.sum(axis=1))):
        lines.append(f"{c:>5}  {name:<{width}}  {100 * value:>7.1f}%  {rows:>6,}")
    return "\n".join(lines)


def format_confusion(confusion):
    """The confusion matrix as text: rows are true classes, columns predicted ones."""
    n = len(confusion)
    width = max(5, len(str(confusion.max())) + 1)
    lines = ["true\\pred" + "".join(f"{c:>{width}}" for c in range(n))]
    lines += [f"{r:>9}" + "".join(f"{v:>{width}}" for v in row) for r, row in enumerate(confusion)]
    return "\n".join(lines)


def evaluate(args, comm):
    """Test loss, accuracy, per-class accuracy and confusion matrix of a checkpoint."""
    # the library a run multiplies with by default, so that its figures match
    backend = gemm.backend(configure_gemm(comm, "auto"))
    blas_threads = configure_blas_threads(comm, library=backend.name)
    with same_on_every_rank():
        checkpoint = ckpt_io.load(args.checkpoint)
        path = run_on_rank0(comm, lambda: data_for(checkpoint, args.data))
        run_on_rank0(comm, lambda: check_readable(path))
        info = data.inspect(path)
        if args.eval_batch < 1:
            raise UserError(f"--eval-batch must be positive, got {args.eval_batch}")
        # The layers first, without arrays: their sizes are checked against the file's arrays, the
        # data and the memory before the model allocates anything.
        layers = layers_from_description(checkpoint.model)
        check_description_fits(checkpoint, layers)
        check_fits_data(layers, info, f"{args.checkpoint}: model {checkpoint.model_summary}")
        check_resources(layers, Config(dtype=checkpoint.dtype, batch_size=1,
                                       eval_batch=args.eval_batch), info, comm.size,
                        blas_threads.ranks_on_host)
    model = Sequential(layers, dtype=checkpoint.dtype, backend=backend)
    model.load_state(checkpoint.params, checkpoint.buffers)
    test_rows = evaluation_block(info.n_test, comm.rank, comm.size)
    test = read_split(info, "test", [test_rows], checkpoint.dtype, model)
    result = evaluate_split(model, comm, test, info.n_classes, args.eval_batch)
    if comm.rank == 0:
        step = checkpoint.state.get("step")
        print(f"checkpoint {args.checkpoint} (model {checkpoint.model_summary}, step {step}) on "
              f"{path}, {info.n_test:,} test rows, {comm.size} rank(s)")
        print(f"test loss {result.loss:.4f}  test accuracy {100 * result.accuracy:.2f}%")
        print("per-class accuracy:")
        print(format_per_class(result.per_class_accuracy, result.confusion, info.class_names))
        print("confusion matrix (rows: true class, columns: predicted class):")
        print(format_confusion(result.confusion))
    return EXIT_OK


def _version(module_name):
    try:
        module = __import__(module_name)
        return getattr(module, "__version__", "installed")
    except ImportError:
        return "not installed"


def info(args, comm):
    """Versions, MPI library and world size, BLAS and its threads, the data file's summary; or,
    given a run folder, what it holds."""
    if getattr(args, "run_dir", None):
        lines = run_lines(args.run_dir)   # on every rank: the same files, the same errors
        if comm.rank == 0:
            print("\n".join(lines))
        return EXIT_OK
    products = configure_gemm(comm, "auto")   # what a run with the default --gemm multiplies with
    backend = gemm.backend(products)
    thread_line = configure_blas_threads(comm, library=backend.name).description
    if comm.rank != 0:
        return EXIT_OK
    from threadpoolctl import threadpool_info
    lines = [
        f"ddptrain     {__version__}",
        f"python       {platform.python_version()} ({sys.executable})",
        f"numpy        {np.__version__}",
        f"h5py         {_version('h5py')} (HDF5 {_hdf5_version()})",
        f"mpi4py       {_version('mpi4py')}",
        f"MPI          {comm.library}; world size {comm.size}",
        f"threads      {thread_line}",
        f"products     {products.description} (--gemm auto)",
    ]
    for lib in threadpool_info():
        # MKL's threads run on an OpenMP runtime
        kind = "BLAS" if lib.get("user_api") == "blas" else "OpenMP"
        # OpenBLAS names its kernel; MKL picks its code for each call, from the instruction set it
        # settled on
        kernel = lib.get("architecture") or (f"{backend.code_path()} kernels"
                                             if lib.get("internal_api") == "mkl"
                                             and backend.name == "mkl" else "?")
        lines.append(f"{kind:<12} {lib.get('internal_api')} {lib.get('version')} "
                     f"({kernel}, {lib.get('threading_layer', '?')}), "
                     f"{lib.get('num_threads')} threads now")
    lines.append(f"matplotlib   {_version('matplotlib')} (for `ddptrain plot`)")
    line, image_shape = _data_line(args.data)
    lines.append(line)
    lines += model_lines(args.model, image_shape or (28, 28))
    print("\n".join(lines))
    return EXIT_OK


def model_lines(spec, image_shape):
    """The model of ``spec`` on images of ``image_shape``: each layer's output, parameters and
    FLOPs."""
    try:
        parsed = parse_spec(spec)
        layers = parsed.layers(image_shape)
        name_layers(layers)
        counts = layer_flops(layers, image_shape)
    except UserError as error:
        return [f"model        {error} ({'x'.join(map(str, image_shape))} images)"]
    n_params = sum(math.prod(shape) for layer in layers for shape in layer.param_shapes().values())
    lines = [f"model        {parsed.describe()} on {'x'.join(map(str, image_shape))} images: "
             f"{n_params:,} parameters, {sum(f for *_, f in counts) / 1e6:.2f} MFLOP per image "
             f"forward, {training_flops(counts) / 1e6:.2f} MFLOP per sample per training step",
             f"  {'layer':<12} {'':<32} {'output':>10} {'parameters':>11} {'MFLOP':>7}"]
    for layer, output, flops in counts:
        size = sum(math.prod(shape) for shape in layer.param_shapes().values())
        lines.append(f"  {layer.name:<12} {layer.label():<32} {'x'.join(map(str, output)):>10} "
                     f"{size:>11,} {flops / 1e6:>7.2f}")
    return lines


def _hdf5_version():
    import h5py
    return h5py.version.hdf5_version


def _data_line(given):
    known = given in datasets.KNOWN_DATASETS or not given
    path = str(datasets.cached_path(given or "mnist")) if known else given
    try:
        check_readable(path)
        summary = data.inspect(path)
    except UserError as error:
        if known:
            return (f"data         none prepared yet at {path} (`python -m ddptrain prepare "
                    f"{given or 'mnist'}` makes it)"), None
        return f"data         {error}", None
    source = summary.attrs.get("source", "unknown source")
    return (f"data         {path}: {summary.n_train:,} training and {summary.n_test:,} test images "
            f"of {summary.image_text} ({summary.n_features} values), {summary.n_classes} classes "
            f"({_some(summary.class_names)}); source {source}"), summary.image_shape


def _some(names, shown=10):
    """The first ``shown`` names, joined: a thousand class names do not fit in a line."""
    return ", ".join(names[:shown]) + (f", ... ({len(names) - shown} more)"
                                       if len(names) > shown else "")


# ---------------------------------------------------------------- info RUN_DIR


def run_lines(run_dir):
    """What the run folder ``run_dir`` holds: its configuration, checkpoints, metrics and
    timelines, the newest timeline as a table of the share of the step per phase per rank."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise UserError(f"{run_dir}: no such run folder")
    config = _json_file(folder / "config.json")
    if config is None:
        raise UserError(f"{run_dir}: no config.json: not a ddptrain run folder (or its run had "
                        "not started)")
    lines = [f"run folder   {folder}", _config_line(config), _checkpoints_line(folder),
             _metrics_line(folder)]
    timelines = timeline_paths(folder)
    if not timelines:
        lines.append("timeline     none (train with --profile STEPS to record one)")
        return lines
    trace = read_trace(timelines[-1])
    about = trace.get("otherData") if isinstance(trace.get("otherData"), dict) else {}
    lines.append(f"timeline     {timelines[-1]}{_timeline_about(about)}")
    if len(timelines) > 1:
        lines.append(f"             earlier attempts' timelines: "
                     f"{', '.join(path.name for path in timelines[:-1])}")
    return lines + format_phases(trace)


def _json_file(path):
    """The JSON object in ``path``; None if there is no such file; a UserError if it is not
    one."""
    if not path.exists():
        return None
    with open_regular(path, "JSON file") as f:
        try:
            value = json.loads(f.read(2 ** 20 + 1))
        except (ValueError, RecursionError):
            value = None
    if not isinstance(value, dict):
        raise UserError(f"{path}: not a JSON object")
    return value


def _config_line(config):
    get = config.get
    return (f"config       model {get('model')} ({get('dtype')}), data {get('data') or 'mnist'}, "
            f"{_count(get('epochs'), 'epoch')} of global batch {get('batch_size')}, "
            f"{get('optimizer')} at lr {get('lr')} ({get('lr_schedule')}), seed {get('seed')}")


def _checkpoints_line(folder):
    steps = ckpt_io.step_checkpoints(folder / "checkpoints")
    if not steps:
        return "checkpoints  none"
    best = folder / "checkpoints" / "best.h5"
    newest, size = steps[0], steps[0].stat().st_size
    older = f", {len(steps) - 1} older" if len(steps) > 1 else ""
    return (f"checkpoints  newest {newest.name} (step {int(newest.stem[5:])}, "
            f"{size / 2 ** 20:.2f} MiB){older}{'; best.h5' if best.is_file() else ''}")


def _metrics_line(folder):
    path = folder / "metrics.jsonl"
    if not path.exists():
        return "metrics      none"
    with open_regular(path, "metrics file") as f:
        records = []
        for line in f.read().decode("utf-8", errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    epochs = [r for r in records if isinstance(r, dict) and r.get("kind") != "step"
              and isinstance(r.get("test_accuracy"), (int, float))]
    if not epochs:
        return f"metrics      {len(records)} records, no finished epoch"
    last = epochs[-1]
    best = max(epochs, key=lambda r: r["test_accuracy"])
    seconds = sum(r["seconds"] for r in epochs if isinstance(r.get("seconds"), (int, float)))
    return (f"metrics      {_count(len(epochs), 'epoch')}: test accuracy "
            f"{100 * last['test_accuracy']:.2f}% after epoch {last.get('epoch')} (best "
            f"{100 * best['test_accuracy']:.2f}%, epoch {best.get('epoch')}), {seconds:.1f} s of "
            "epochs")


def _count(number, noun):
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _timeline_about(about):
    """The timeline's window, ranks, clock alignment and recording cost, from its otherData."""
    steps, clock, cost = about.get("steps"), about.get("clock"), about.get("overhead")
    parts = []
    if isinstance(steps, list) and len(steps) == 2:
        threads = about.get("threads")
        parts.append(f"steps {steps[0]} to {steps[1]} on {about.get('ranks')} rank(s)"
                     + (f" x {threads} threads (the shares below: thread 0's)"
                        if isinstance(threads, int) and threads > 1 else ""))
    if isinstance(clock, dict) and isinstance(clock.get("uncertainty_us_max"), (int, float)):
        parts.append(clocks_phrase(clock["uncertainty_us_max"]))
    if isinstance(cost, dict) and isinstance(cost.get("per_step_us"), (int, float)):
        share = cost.get("share_of_step")
        parts.append(f"recording cost about {cost['per_step_us']:.0f} us a step"
                     + (f" ({100 * share:.2g}% of a step)" if isinstance(share, (int, float))
                        else ""))
    return f": {', '.join(parts)}" if parts else ""
