"""Making a written file survive a crash: fsync the file, rename it over the target, fsync the folder.

Both the data file (``data.write_dataset``) and checkpoints are written to a
temporary file in the target's folder and renamed over the target only once
they are complete and on disk, so a reader never sees half a file.
"""

from __future__ import annotations

import os


def fsync_file(path):
    """Flush a written file's contents to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder):
    """Make a rename in ``folder`` durable; best effort, as some file systems cannot fsync a folder."""
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
