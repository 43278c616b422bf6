"""Making a written file survive a crash: fsync the file, rename it over the target, fsync the
folder.

The data file (``data.write_dataset``), checkpoints, ``config.json`` and
``metrics.jsonl`` are all written by ``write_atomically``: to a temporary file
in the target's folder, renamed over the target only once it is complete and
on disk, so a reader never sees half a file. The content is in memory first,
and written with plain writes, so that a full disk is an OSError and nothing
else (HDF5's own write errors can leave it in a state that crashes the process).
"""

from __future__ import annotations

import os
from pathlib import Path


def temporary_path(path):
    """Where ``write_atomically`` writes ``path`` first: ``.<name>.tmp-<pid>`` beside it (one per
    writer)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_atomically(path, content):
    """Replace ``path`` by ``content`` (bytes-like), whole or not at all. OSError on failure,
    ``path`` as it was."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(content)
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_folder(path.parent)


def fsync_file(path):
    """Flush a written file's contents to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder):
    """Make a rename in ``folder`` durable; best effort, as some file systems cannot fsync a
    folder."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
