"""Checkpoints in HDF5 that cannot be half-written, verified when read.

A checkpoint holds the parameters, the optimiser state, where training stands
(epoch, global step, step within the epoch and the running training sums of
the unfinished epoch), the full configuration and the metrics so far. Since
the batches and the learning rate are pure functions of (seed, epoch, step),
that position *is* the sampler and RNG state: nothing else is random (the
shuffles are drawn from ``default_rng([seed, epoch, shard])``, the initial
parameters from ``default_rng(seed)``; the seed is in the configuration).

Writing goes to a temporary file in the same folder, which is flushed and
fsynced and then renamed over the target: a reader sees the old file or the
new one, never a mix. A SHA-256 of the contents is stored in the file and
checked on load, so a truncated or corrupted file is refused.

Only rank 0 calls ``save``; every rank may call ``load``.

Layout::

    /params/<name>          one dataset per parameter ("0.weight", ...)
    /optimizer/velocity     the momentum buffer (absent before the first step)
    attrs: format, format_version, model, dtype, sha256,
           state (JSON: epoch, step, step_in_epoch, train_sums, n_train,
                  best_accuracy, world_size),
           optimizer (JSON: momentum, weight_decay, nesterov, steps),
           config (JSON), metrics (JSON list of per-epoch records)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .durable import fsync_file, fsync_folder
from .errors import CheckpointError

FORMAT = "ddptrain-checkpoint"
FORMAT_VERSION = 1
STEP_NAME = re.compile(r"^step-(\d{8,})\.h5$")
TEMPORARY_NAME = re.compile(r"^\..+\.h5\.tmp-\d+$")


@dataclass
class Checkpoint:
    params: dict          # name -> ndarray
    velocity: np.ndarray | None
    optimizer: dict       # momentum, weight_decay, nesterov, steps
    state: dict           # epoch, step, step_in_epoch, train sums
    config: dict
    metrics: list
    model: str
    dtype: str
    path: str = ""


def step_path(checkpoint_dir, step):
    return Path(checkpoint_dir) / f"step-{step:08d}.h5"


def _digest(params, velocity, attrs):
    """SHA-256 over every array's bytes and the JSON attributes, in a fixed order."""
    h = hashlib.sha256()
    for name in sorted(params):
        h.update(name.encode())
        h.update(np.ascontiguousarray(params[name]).tobytes())
    if velocity is not None:
        h.update(b"velocity")
        h.update(np.ascontiguousarray(velocity).tobytes())
    h.update(json.dumps(attrs, sort_keys=True).encode())
    return h.hexdigest()


def save(path, ckpt: Checkpoint, fail_after_write=None):
    """Write ``ckpt`` to ``path`` atomically. Raises OSError on failure, leaving ``path`` as it was.

    ``fail_after_write`` is a test hook: a callable run after the temporary
    file is written and before it is renamed, to simulate a crash there.
    """
    path = Path(path)
    attrs = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "model": ckpt.model, "dtype": ckpt.dtype,
        "state": json.dumps(ckpt.state, sort_keys=True),
        "optimizer": json.dumps(ckpt.optimizer, sort_keys=True),
        "config": json.dumps(ckpt.config, sort_keys=True),
        "metrics": json.dumps(ckpt.metrics, sort_keys=True),
    }
    digest = _digest(ckpt.params, ckpt.velocity, attrs)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            group = f.create_group("params")
            for name, array in ckpt.params.items():
                group.create_dataset(name, data=array)
            optimizer = f.create_group("optimizer")
            if ckpt.velocity is not None:
                optimizer.create_dataset("velocity", data=ckpt.velocity)
            f.attrs.update(attrs)
            f.attrs["sha256"] = digest
            f.flush()
        fsync_file(tmp)
        if fail_after_write is not None:
            fail_after_write()
        os.replace(tmp, path)
        fsync_folder(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def load(path):
    """Read and verify a checkpoint. Raises CheckpointError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise CheckpointError(f"{path}: not a ddptrain checkpoint")
            if int(f.attrs.get("format_version", -1)) != FORMAT_VERSION:
                raise CheckpointError(f"{path}: checkpoint format version {f.attrs.get('format_version')} "
                                      f"is not the supported {FORMAT_VERSION}")
            params = {name: f["params"][name][()] for name in f["params"]}
            velocity = f["optimizer"]["velocity"][()] if "velocity" in f["optimizer"] else None
            attrs = {key: _text(f.attrs[key]) for key in
                     ("format", "model", "dtype", "state", "optimizer", "config", "metrics")}
            attrs["format_version"] = int(f.attrs["format_version"])
            stored = _text(f.attrs.get("sha256", ""))
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, AttributeError) as error:
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({_short(error)})") from None
    if _digest(params, velocity, attrs) != stored:
        raise CheckpointError(f"{path}: checksum mismatch, the checkpoint is corrupt")
    try:
        return Checkpoint(params=params, velocity=velocity, optimizer=json.loads(attrs["optimizer"]),
                          state=json.loads(attrs["state"]), config=json.loads(attrs["config"]),
                          metrics=json.loads(attrs["metrics"]), model=attrs["model"], dtype=attrs["dtype"],
                          path=str(path))
    except ValueError as error:
        raise CheckpointError(f"{path}: malformed metadata ({_short(error)})") from None


def _text(value):
    return value.decode() if isinstance(value, bytes) else str(value) if not isinstance(value, str) else value


def _short(error):
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def step_checkpoints(checkpoint_dir):
    """The ``step-*.h5`` files in the folder, newest (highest step) first."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / name) for name in os.listdir(folder) if (m := STEP_NAME.match(name))]
    return [p for _, p in sorted(found, reverse=True)]


def newest_valid(checkpoint_dir, warn=print, set_aside=False):
    """The newest checkpoint in the folder that loads and verifies, skipping corrupt ones with a warning.

    With ``set_aside``, a corrupt one is renamed ``<name>.corrupt``: kept for
    inspection, but no longer taken for the newest when pruning.
    """
    for path in step_checkpoints(checkpoint_dir):
        try:
            return load(path)
        except CheckpointError as error:
            if set_aside:
                aside = path.with_name(path.name + ".corrupt")
                try:
                    os.replace(path, aside)
                    warn(f"warning: skipping {error} (renamed to {aside.name})")
                    continue
                except OSError:
                    pass
            warn(f"warning: skipping {error}")
    return None


def prune(checkpoint_dir, keep):
    """Delete all but the ``keep`` newest step checkpoints, and temporary files left by a killed writer."""
    for path in step_checkpoints(checkpoint_dir)[keep:]:
        path.unlink(missing_ok=True)
    for name in os.listdir(checkpoint_dir):
        if TEMPORARY_NAME.match(name) and not name.endswith(f".tmp-{os.getpid()}"):
            (Path(checkpoint_dir) / name).unlink(missing_ok=True)
