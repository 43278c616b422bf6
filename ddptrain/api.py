"""The Python API: ``ddptrain.train(model, data=..., **options)``, and ``launch``, which the command
line shares.

A script that calls ``ddptrain.train`` runs unchanged in one process
(``python my_experiment.py``), under ``mpiexec -n P`` or ``srun``, and with
``simulate_ranks=P``; every rank calls it with the same arguments, and every
rank gets the same ``Result``. The options are the command line's, by the
same names with ``_`` for ``-`` (``batch_size=256`` is ``--batch-size
256``), checked by the same code: a bad one raises the ``UserError`` whose
message the command line prints after ``ddptrain: error:``.
"""

from __future__ import annotations

import difflib
import os
import traceback
from collections.abc import Iterable

from ddptrain.data import datasets
from ddptrain.data.arrays import WHAT as IN_MEMORY, Arrays
from ddptrain.data.readable import check_readable
from ddptrain.distributed.launcher import launched_by_mpi
from ddptrain.distributed.simulate import run_simulated
from ddptrain.distributed.world import world
from ddptrain.errors import DataError, UserError, same_on_every_rank
from ddptrain.nn.model import Sequential
from ddptrain.run.config import Config, coerce, make_config
from ddptrain.run.ending import end_rank, message_of
from ddptrain.run.runner import run_training
from ddptrain.training.trainer import Callback

# ddptrain.train's own arguments besides the Config fields (model and data are Config fields too).
_OWN_ARGUMENTS = ("quiet", "dry_run", "callbacks")


def train(model=None, data=None, *, quiet=False, dry_run=False, callbacks=(), **options):
    """Train ``model`` on ``data`` on every rank of this job; returns the ``runner.Result`` (every
    rank the same).

    ``model``: an ``nn.Sequential`` of ddptrain layers (trained in place: it
    holds the final parameters afterwards), or a --model spec string
    (``"784-512-256-10"``, ``"cnn"``); None: the default MLP.
    ``data``: a data file's path, the name of a prepared set (``"mnist"``,
    ``"fashion-mnist"``: prepared in the cache on first use), or in-memory
    arrays ``(x_train, y_train, x_test, y_test)`` (or ``Arrays``) of which
    each rank copies only its shard; None: MNIST.
    ``options``: the command line's training options (``epochs``,
    ``batch_size``, ``lr``, ``optimizer``, ``run_dir``, ``resume``,
    ``simulate_ranks``...). ``callbacks``: ``trainer.Callback`` objects run
    after ddptrain's own. ``quiet`` and ``dry_run`` as on the command line.

    Raises ``errors.UserError`` (``DataError``, ``CheckpointError``...) on
    bad input, the same on every rank. An error that only some ranks meet (a
    bug, a failed read) ends the whole MPI job, as on the command line: the
    other ranks may be waiting in a collective operation that will never end.
    """
    with same_on_every_rank():
        config, model, arrays = checked_arguments(model, data, options)
        callbacks = _callbacks(callbacks)
    return launch(config, quiet=quiet, dry_run=dry_run, callbacks=callbacks, model=model,
                  arrays=arrays)


def checked_arguments(model, data, options):
    """``(Config, model object or None, Arrays or None)`` from ``train``'s arguments; UserError if
    one is bad."""
    fields = Config.__dataclass_fields__
    for name in options:
        if name not in fields or name in ("model", "data"):
            close = difflib.get_close_matches(name, [*fields, *_OWN_ARGUMENTS], n=1)
            hint = (f" (did you mean {close[0]!r}?)" if close else " (the options are those of "
                    "`python -m ddptrain train --help`, with '_' for '-')")
            raise UserError(f"ddptrain.train got an unknown option {name!r}{hint}")
    values = {name: coerce(name, _plain(value), "ddptrain.train")
              for name, value in options.items()}
    if isinstance(model, Sequential):
        values["model"] = model.summary()
        values.setdefault("dtype", str(model.dtype))
    elif isinstance(model, str):
        values["model"] = model
        model = None
    elif model is not None:
        raise UserError("ddptrain.train: model must be an nn.Sequential or a --model spec string, "
                        f"got {type(model).__name__}")
    arrays = None
    if isinstance(data, (str, os.PathLike)):
        values["data"] = os.fspath(data)
    elif data is not None:
        arrays = Arrays.of(data)
        values["data"] = IN_MEMORY
    return make_config(values, model_given=model is not None), model, arrays


def _callbacks(callbacks):
    """``callbacks`` as a tuple, each with every hook of ``Callback``; a UserError otherwise, raised
    before the run folder is made (not a TypeError from the trainer once the run is under way)."""
    if isinstance(callbacks, (str, bytes)) or not isinstance(callbacks, Iterable):
        raise UserError("ddptrain.train: callbacks must be a list of ddptrain.Callback objects, "
                        f"got {type(callbacks).__name__}")
    callbacks = tuple(callbacks)
    hooks = [name for name in vars(Callback) if name.startswith("on_")]
    for position, callback in enumerate(callbacks):
        missing = [name for name in hooks if not callable(getattr(callback, name, None))]
        if missing:
            raise UserError(f"ddptrain.train: callbacks[{position}] is not a ddptrain.Callback: "
                            f"{type(callback).__name__} has no {missing[0]}()")
    return callbacks


def _plain(value):
    """numpy scalars as Python numbers (``epochs=np.int64(5)`` is 5)."""
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", None) == 0 else value


def launch(config, quiet=False, dry_run=False, callbacks=(), model=None, arrays=None):
    """Run the validated ``config`` on this job's ranks: one process, MPI ranks, or simulated ranks.

    What ``train`` and the command line share. Returns the ``Result``; errors
    met by every rank are raised on every rank, and one met by some ranks only
    ends the MPI job (``errors.end_rank``).
    """
    with same_on_every_rank():
        if arrays is None:
            check_data_file(config.data)
        if config.simulate_ranks and launched_by_mpi():
            raise UserError("--simulate-ranks runs the ranks as threads of one process: start it "
                            "without mpirun/srun")
    if config.simulate_ranks:
        # Rank 0 trains the caller's model; the others train replicas of it, as MPI ranks would
        # their own.
        return run_simulated(config.simulate_ranks, lambda comm: run_training(
            config, comm, quiet, dry_run, callbacks,
            model if model is None or comm.rank == 0 else model.replica(), arrays))
    comm = world()
    try:
        return run_training(config, comm, quiet, dry_run, callbacks, model, arrays)
    except BaseException as error:
        if comm.size > 1 and not getattr(error, "all_ranks", False):
            details = None if isinstance(error, UserError) else traceback.format_exc()
            end_rank(message_of(error), error, comm, details)   # aborts the job
        raise


def check_data_file(path):
    """Before MPI starts, while checking costs a fork (milliseconds): a damaged data file must not
    hang a rank.

    ``path`` given: a damaged file is refused here. Without it (or with the
    name of a known set), the cached file, if there is one, is checked but
    not refused: the run prepares it again if it is damaged
    (``datasets.ensure_prepared``). What passes here is not checked again
    once MPI runs (``readable.check_readable``).
    """
    if path and path not in datasets.KNOWN_DATASETS:
        check_readable(path)
        return
    cached = datasets.cached_path(path or "mnist")
    if cached.exists():
        try:
            check_readable(cached)
        except DataError:
            pass
