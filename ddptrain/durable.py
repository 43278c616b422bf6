"""Every file ddptrain writes is opened here, and never through a symbolic link.

Whole files (the data file of ``writer.write_dataset``, checkpoints,
``config.json``, ``metrics.jsonl`` when a run starts, the plot) are written by
``write_atomically``: to a temporary file in the target's folder, fsynced,
renamed over the target only once it is complete and on disk, so a reader never
sees half a file. The content is in memory first, and written with plain
writes, so that a full disk is an OSError and nothing else (HDF5's own write
errors can leave it in a state that crashes the process). Records added to a
file (``metrics.jsonl`` during a run) go through ``append``; the run folder's
lock file is opened by ``open_lock_file``.

None of them follows a symbolic link: someone who can write in a run folder
could otherwise plant ``config.json -> ~/victim`` and have a run overwrite a
file outside it. The temporary file has a name nobody can predict and is
created only if nothing, a link included, has that name (``O_CREAT | O_EXCL |
O_NOFOLLOW``, as ``tempfile.mkstemp`` does, but with the permissions the umask
gives rather than mkstemp's owner-only ones: a shared data cache stays
readable); appends and the lock are opened with
``O_NOFOLLOW``. The rename replaces a link at the target by the file, never
the file it points to.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)


def temporary_prefix(path):
    """How the temporary file of ``path`` is named: ``.<name>.tmp-`` and random characters, beside
    it."""
    return f".{Path(path).name}.tmp-"


def write_atomically(path, content):
    """Replace ``path`` by ``content`` (bytes-like), whole or not at all. OSError on failure,
    ``path`` as it was."""
    path = Path(path)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    fsync_folder(path.parent)


def _create_temporary(path):
    """A new, empty file beside ``path`` with an unpredictable name: ``(descriptor, its path)``."""
    for _ in range(100):
        tmp = path.with_name(temporary_prefix(path) + secrets.token_hex(8))
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NO_FOLLOW, 0o666), tmp
        except FileExistsError:   # 2**-64 by chance; or someone is planting names: another draw
            continue
    raise FileExistsError(f"{path.parent}: cannot create a temporary file (every name taken)")


def append(path, text):
    """Add ``text`` at the end of ``path`` (created if missing); OSError if ``path`` is a link."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | NO_FOLLOW, 0o644)
    with os.fdopen(fd, "a") as f:
        f.write(text)


def open_lock_file(path):
    """A descriptor of ``path`` for reading and writing, created if missing; OSError if it is a
    link."""
    return os.open(path, os.O_RDWR | os.O_CREAT | NO_FOLLOW, 0o644)


def fsync_file(path):
    """Flush a written file's contents to the disk."""
    fd = os.open(path, os.O_RDONLY | NO_FOLLOW)
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
