"""Checkpoints in HDF5 that cannot be half-written, and whose bytes are verified before HDF5 reads
them.

A checkpoint holds the parameters and buffers of the model, the optimiser's
state, where training stands (epoch, global step, step within the epoch and
the running training sums of the unfinished epoch), the full configuration,
the description of the model and the metrics so far. Since the batches and
the learning rate are pure functions of (seed, epoch, step), that position
*is* the sampler and RNG state: nothing else is random (the shuffles are
drawn from ``default_rng([seed, epoch, shard])``, the initial parameters from
``default_rng(seed)``; the seed is in the configuration).

**Verified before parsed.** The file begins with a 512-byte header, in
HDF5's *user block* (space HDF5 reserves at the start of a file and never
reads), holding the SHA-256 and the length of everything after it. ``load``
reads the whole file, checks the header, the length and the digest, and only
then lets HDF5 parse the bytes it verified, from memory. A flipped bit
anywhere, in the data or in HDF5's own metadata, is refused before HDF5
sees it: no damaged file can make h5py hang, crash or return wrong values.
The file is still an ordinary HDF5 file for h5py, h5dump or HDFView.

**Never half-written.** The file is built in memory, header included, then
written to a temporary file in the same folder (never through a symbolic
link), fsynced and renamed over the target: a reader sees the old file or the
new one, never a mix, and a full disk is a plain OSError (HDF5 never writes to
the disk itself).

Only rank 0 calls ``save``; any rank may call ``load``.

Layout (format 2)::

    bytes 0-511              "ddptrain checkpoint\\nformat 2\\nsha256 <hex>\\nbytes <n>\\n",
                             zero-padded
    /params/<name>           one dataset per parameter ("linear1.weight", ...)
    /buffers/<name>          one dataset per buffer (non-trained state such as running statistics)
    /optimizer/<name>        one dataset per array of the optimiser's state_dict ("velocity", ...)
    attrs: format, format_version, dtype, model_summary,
           model (JSON: the layers' names, types and arguments),
           optimizer (JSON: the optimiser's type and the rest of its state_dict, e.g. steps),
           state (JSON: epoch, step, step_in_epoch, train_sums, n_train, best_accuracy, world_size,
                  data_sha256: the data file's content_sha256, absent in older checkpoints),
           config (JSON), metrics (JSON list of per-epoch records)

Format 1 (ddptrain 0.1) had no header: its files cannot be verified before
they are parsed, and are refused with a line that says so.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ddptrain.durable import write_atomically
from ddptrain.errors import CheckpointError
from ddptrain.files import open_regular
from ddptrain.run import checkpoint_contents as contents

FORMAT = "ddptrain-checkpoint"
FORMAT_VERSION = 2
HEADER_SIZE = 512                  # HDF5 user blocks are 512 bytes or a larger power of two
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_HEADER = re.compile(rb"ddptrain checkpoint\nformat (\d{1,3})\nsha256 ([0-9a-f]{64})\nbytes "
                     rb"(\d{1,15})\n\0*")
STEP_NAME = re.compile(r"^step-(\d{8,})\.h5$")
# durable.write_atomically's temporary files (random hex; a pid in those of ddptrain 0.3 and before)
TEMPORARY_NAME = re.compile(r"^\..+\.h5\.tmp-[0-9a-f]+$")
ARRAY_GROUPS = ("params", "buffers", "optimizer")
JSON_ATTRS = ("model", "optimizer", "state", "config", "metrics")
METADATA = ("dtype", "model_summary", *JSON_ATTRS)


@dataclass
class Checkpoint:
    params: dict          # name -> ndarray
    buffers: dict         # name -> ndarray
    optimizer: dict       # the optimiser's state_dict (arrays and JSON values) and its "type"
    state: dict           # epoch, step, step_in_epoch, train sums, ...
    config: dict
    metrics: list
    model: list           # Sequential.describe()
    model_summary: str    # for messages: "784-512-256-10"
    dtype: str
    path: str = ""


def step_path(checkpoint_dir, step):
    return Path(checkpoint_dir) / f"step-{step:08d}.h5"


# ---------------------------------------------------------------- writing


def save(path, ckpt: Checkpoint):
    """Write ``ckpt`` to ``path`` atomically (``durable.write_atomically``): OSError on failure,
    ``path`` as it was."""
    write_atomically(path, encode(ckpt))


def encode(ckpt: Checkpoint):
    """The bytes of the checkpoint file (a memoryview): the header, then HDF5, built in memory."""
    optimizer_arrays = {k: v for k, v in ckpt.optimizer.items() if isinstance(v, np.ndarray)}
    optimizer_values = {k: v for k, v in ckpt.optimizer.items() if not isinstance(v, np.ndarray)}
    attrs = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "dtype": ckpt.dtype,
        "model_summary": ckpt.model_summary, "model": json.dumps(ckpt.model),
        "optimizer": json.dumps(optimizer_values, sort_keys=True),
        "state": json.dumps(ckpt.state, sort_keys=True),
        "config": json.dumps(ckpt.config, sort_keys=True),
        "metrics": json.dumps(ckpt.metrics, sort_keys=True),
    }
    buffer = io.BytesIO()
    with h5py.File(buffer, "w", userblock_size=HEADER_SIZE) as f:
        for group, arrays in zip(ARRAY_GROUPS, (ckpt.params, ckpt.buffers, optimizer_arrays)):
            created = f.create_group(group)
            for name, array in arrays.items():
                created.create_dataset(name, data=array)
        f.attrs.update(attrs)
    content = buffer.getbuffer()
    body = content[HEADER_SIZE:]
    header = (f"ddptrain checkpoint\nformat {FORMAT_VERSION}\nsha256 "
              f"{hashlib.sha256(body).hexdigest()}\nbytes {len(body)}\n")
    content[:HEADER_SIZE] = header.encode().ljust(HEADER_SIZE, b"\0")
    return content


# ---------------------------------------------------------------- reading


def verified_bytes(path):
    """The whole file, once its header, length and SHA-256 check out; CheckpointError otherwise."""
    path = Path(path)
    try:
        with open_regular(path, "checkpoint", CheckpointError, missing="no such checkpoint") as f:
            header = f.read(HEADER_SIZE)
            stored, length = _parse_header(path, header)
            size = os.fstat(f.fileno()).st_size
            if size != HEADER_SIZE + length:   # checked before reading: a wrong file may be huge
                raise CheckpointError(f"{path}: truncated or extended checkpoint: {size} bytes, "
                                      f"its header says {HEADER_SIZE + length}")
            data = header + f.read(length)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read the checkpoint "
                              f"({error.strerror or error})") from None
    if len(data) != HEADER_SIZE + length:   # it changed while being read
        raise CheckpointError(f"{path}: truncated checkpoint: {len(data)} bytes, its header says "
                              f"{HEADER_SIZE + length}")
    if hashlib.sha256(memoryview(data)[HEADER_SIZE:]).hexdigest() != stored:
        raise CheckpointError(f"{path}: checksum mismatch, the checkpoint is corrupt")
    return data


def _parse_header(path, header):
    """``(sha256, length of the rest)`` from the first 512 bytes, or a CheckpointError."""
    match = _HEADER.fullmatch(header)
    if match is None:
        if header.startswith(HDF5_SIGNATURE):
            raise CheckpointError(f"{path}: not a ddptrain checkpoint: an HDF5 file without the "
                                  f"verified header of format {FORMAT_VERSION} (checkpoints of "
                                  "ddptrain 0.1, format 1, cannot be checked before they are read "
                                  "and are not loaded)")
        raise CheckpointError(f"{path}: not a ddptrain checkpoint (no ddptrain header)")
    version = int(match.group(1))
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {version}, but this ddptrain reads "
                              f"format {FORMAT_VERSION} only")
    return match.group(2).decode(), int(match.group(3))


def load(path):
    """Read and verify a checkpoint. Raises CheckpointError naming the file and the problem.

    Verified bytes prove only that the file is the one written: its metadata
    and the storage, type and shape of every array are then checked
    (``checkpoint_contents``) before any array is read.
    """
    data = verified_bytes(path)
    try:
        with h5py.File(io.BytesIO(data), "r") as f:
            if _text(f.attrs.get("format")) != FORMAT:
                raise CheckpointError(f"{path}: not a ddptrain checkpoint")
            metadata = _metadata(path, {key: _text(f.attrs[key]) for key in METADATA})
            shapes, found = contents.expected_shapes(metadata)
            found = found or contents.array_problems(f, shapes, metadata["dtype"], len(data))
            if found:
                raise CheckpointError(_refusal(path, found))
            arrays = {group: {name: f[group][name][()] for name in f[group]}
                      for group in ARRAY_GROUPS}
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, AttributeError) as error:
        # Verified bytes that HDF5 cannot read: written by something else than this ddptrain.
        raise CheckpointError(f"{path}: unreadable checkpoint ({_short(error)})") from None
    return Checkpoint(params=arrays["params"], buffers=arrays["buffers"],
                      optimizer={**metadata["optimizer"], **arrays["optimizer"]},
                      state=metadata["state"], config=metadata["config"],
                      metrics=metadata["metrics"], model=metadata["model"],
                      model_summary=metadata["model_summary"], dtype=metadata["dtype"],
                      path=str(path))


def _metadata(path, attrs):
    """The attributes, JSON ones parsed, once they match ``checkpoint_contents.SCHEMA``."""
    metadata = dict(attrs)
    for key in JSON_ATTRS:
        try:
            metadata[key] = json.loads(attrs[key])
        except ValueError as error:
            raise CheckpointError(f"{path}: malformed metadata ({key}: {_short(error)})") from None
        except RecursionError:   # [[[[...]]]] deeper than Python's stack
            raise CheckpointError(f"{path}: malformed metadata ({key}: nested too deep)") from None
    found = contents.metadata_problems(metadata)
    if found:
        raise CheckpointError(_refusal(path, found))
    return metadata


def _refusal(path, problems, shown=5):
    """One line naming the first ``shown`` problems of a checkpoint ddptrain did not write."""
    more = f" (and {len(problems) - shown} more)" if len(problems) > shown else ""
    return f"{path}: malformed checkpoint: {'; '.join(problems[:shown])}{more}"


def _text(value):
    return (value.decode() if isinstance(value, bytes) else value if isinstance(value, str)
            else str(value))


def _short(error):
    return str(error).splitlines()[0] if str(error) else type(error).__name__


# ---------------------------------------------------------------- the checkpoint folder


def step_checkpoints(checkpoint_dir):
    """The ``step-*.h5`` files in the folder, newest (highest step) first."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / name) for name in os.listdir(folder)
             if (m := STEP_NAME.match(name))]
    return [p for _, p in sorted(found, reverse=True)]


def newest_valid(checkpoint_dir, warn=print, set_aside=False):
    """The newest checkpoint in the folder that loads and verifies, skipping corrupt ones with a
    warning.

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
    """Delete all but the ``keep`` newest step checkpoints, and temporary files left by a killed
    writer (every one: the run that prunes holds the folder, and its own writes are done)."""
    for path in step_checkpoints(checkpoint_dir)[keep:]:
        path.unlink(missing_ok=True)
    for name in os.listdir(checkpoint_dir):
        if TEMPORARY_NAME.match(name):
            (Path(checkpoint_dir) / name).unlink(missing_ok=True)
