"""Resuming: which checkpoint to continue from, and whether it fits this run.

A checkpoint fits when it holds a parameter and a buffer of the same name,
shape and dtype for every one of the model's, state for the same optimiser,
was trained on as many rows of the same data (its ``content_sha256``, unless
``--allow-other-data``), and on the same sequence of global batches.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from ddptrain.errors import CheckpointError
from ddptrain.optim.optimizers import optimizer_name
from ddptrain.run import checkpoint as ckpt_io
from ddptrain.run.config import option_name

# Options that fix the sequence of global batches: resuming with another value
# would not continue the run the checkpoint belongs to.
MUST_MATCH_ON_RESUME = ("batch_size", "seed", "virtual_shards", "drop_last")


def _shape(array):
    return "x".join(map(str, array.shape)) or "a scalar"


def _first_difference(kind, theirs, mine):
    """A few words on the first array that differs between the checkpoint's and the model's, or
    None."""
    for name in sorted(set(theirs) | set(mine)):
        if name not in mine:
            return f"it holds {kind} {name}, which the model has not"
        if name not in theirs:
            return f"it has no {kind} {name}"
        if theirs[name].shape != mine[name].shape:
            return f"{kind} {name} is {_shape(theirs[name])} there, {_shape(mine[name])} here"
    return None


def check_model_fits(checkpoint, model):
    """The checkpoint's parameters and buffers must be the model's: same names, shapes and dtype."""
    where = checkpoint.path
    difference = (_first_difference("parameter", checkpoint.params, dict(model.named_params()))
                  or _first_difference("buffer", checkpoint.buffers, dict(model.named_buffers())))
    if difference:
        raise CheckpointError(f"{where}: checkpoint is for model {checkpoint.model_summary}, not "
                              f"{model.summary()} ({difference})")
    stored = {str(a.dtype) for a in (*checkpoint.params.values(), *checkpoint.buffers.values())}
    if checkpoint.dtype != str(model.dtype) or stored - {checkpoint.dtype}:
        raise CheckpointError(f"{where}: checkpoint holds {checkpoint.dtype} parameters, not "
                              f"{model.dtype} (--dtype {checkpoint.dtype})")


def check_description_fits(checkpoint, layers):
    """Before a model is built from a checkpoint's description: its parameters and buffers must be
    the arrays the checkpoint holds, so that a description cannot ask for more memory than the file
    holds."""
    def shapes(group):
        return {f"{layer.name}.{name}": SimpleNamespace(shape=tuple(shape))
                for layer in layers for name, shape in getattr(layer, group)().items()}

    difference = (_first_difference("parameter", checkpoint.params, shapes("param_shapes"))
                  or _first_difference("buffer", checkpoint.buffers, shapes("buffer_shapes")))
    if difference:
        raise CheckpointError(f"{checkpoint.path}: its model description does not match its arrays "
                              f"({difference})")


def check_fits(checkpoint, model, optimizer, n_train, config):
    """Refuse a checkpoint from another model, optimiser, data set or batch sequence."""
    where = checkpoint.path
    check_model_fits(checkpoint, model)
    kind = checkpoint.optimizer.get("type")
    if kind != optimizer_name(optimizer):
        raise CheckpointError(f"{where}: checkpoint holds the state of optimiser {kind}, "
                              f"not {optimizer_name(optimizer)}")
    for name, array in checkpoint.optimizer.items():
        if hasattr(array, "shape") and (array.shape != model.params.shape
                                        or array.dtype != model.dtype):
            raise CheckpointError(f"{where}: optimiser state {name} does not fit the model's "
                                  f"{model.params.size} {model.dtype} parameters")
    if checkpoint.state.get("n_train") != n_train:
        raise CheckpointError(f"{where}: checkpoint was trained on "
                              f"{checkpoint.state.get('n_train')} rows, this data file has "
                              f"{n_train}")
    for name in MUST_MATCH_ON_RESUME:
        saved, given = checkpoint.config.get(name), getattr(config, name)
        if saved != given:
            option = option_name(name)
            hint = (f"resume with {option}" if isinstance(saved, bool) and saved
                    else f"resume without {option}" if isinstance(saved, bool)
                    else f"resume with {option} {saved}")
            raise CheckpointError(f"{where}: checkpoint was trained with {option} {saved}, not "
                                  f"{given}; {hint}")


def data_sha256(info):
    """The ``content_sha256`` attribute of the data file ``info`` describes, or None (a file
    without one, in-memory arrays)."""
    value = info.attrs.get("content_sha256")
    return value if isinstance(value, str) else None


def check_same_data(checkpoint, checksum, allow_other_data, warn):
    """Refuse a checkpoint trained on other data than the file of checksum ``checksum`` (as many
    rows, other values), unless ``allow_other_data``; say so when they cannot be compared."""
    where, state = checkpoint.path, checkpoint.state
    recorded = state.get("data_sha256")
    if recorded is None or checksum is None:
        why = ("it was written before checkpoints recorded it" if "data_sha256" not in state
               else "its data file had none" if recorded is None else "this data file has none")
        warn(f"warning: {where}: the data could not be compared with the data the checkpoint was "
             f"trained on (no content_sha256: {why})")
    elif recorded != checksum:
        if not allow_other_data:
            raise CheckpointError(f"{where}: checkpoint was trained on data of content_sha256 "
                                  f"{recorded}, this data file's is {checksum}; resume with "
                                  "--allow-other-data if it holds the same data")
        warn(f"warning: {where}: checkpoint was trained on data of content_sha256 {recorded}, this "
             f"data file's is {checksum}; resuming on it (--allow-other-data)")


def load_checkpoint(config, checkpoint_dir, model, optimizer, data, warn):
    """Rank 0: the verified checkpoint to resume from (fitting this run), or None to start fresh.

    ``--resume auto`` takes the newest step checkpoint in the folder that
    verifies (setting damaged ones aside with a warning), else ``best.h5`` (a
    fresh start would overwrite it); ``--resume PATH`` takes that file.
    ``data``: the DatasetInfo of the data this run trains on.
    """
    if not config.resume:
        return None
    if config.resume == "auto":
        checkpoint = (ckpt_io.newest_valid(checkpoint_dir, warn=warn, set_aside=True)
                      or _best(checkpoint_dir, warn))
        if checkpoint is None:
            warn(f"--resume auto: no valid checkpoint in {checkpoint_dir}; starting from "
                 "the beginning")
            return None
    else:
        checkpoint = ckpt_io.load(config.resume)
    check_fits(checkpoint, model, optimizer, data.n_train, config)
    check_same_data(checkpoint, data_sha256(data), config.allow_other_data, warn)
    return checkpoint


def _best(checkpoint_dir, warn):
    """``best.h5``, when no step checkpoint is left to resume from; None if it is missing or
    damaged."""
    path = Path(checkpoint_dir) / "best.h5"
    if not path.exists():
        return None
    try:
        checkpoint = ckpt_io.load(path)
    except CheckpointError as error:
        warn(f"warning: skipping {error}")
        return None
    warn(f"--resume auto: no valid step checkpoint in {checkpoint_dir}; resuming from best.h5 "
         f"(step {checkpoint.state['step']})")
    return checkpoint
