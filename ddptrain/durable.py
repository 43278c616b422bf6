"""Every file ddptrain writes is opened here, and never through a symbolic link.

Whole files (checkpoints, ``config.json``, ``metrics.jsonl`` when a run
starts, the plot) are written by ``write_atomically``: to a temporary file in
the target's folder, fsynced, renamed over the target only once it is complete
and on disk, so a reader never sees half a file. The content is in memory
first, and written with plain writes, so that a full disk is an OSError and
nothing else (HDF5's own write errors can leave it in a state that crashes the
process). A data file, which may not fit in memory, is streamed instead
(``write_streamed``): HDF5 writes it through a ``StreamedFile``, which keeps a
failed write from HDF5 and raises it between blocks; the temporary file is
removed on any error and on a stop signal. Records added to a file
(``metrics.jsonl`` during a run) go through ``append``; the run folder's lock
file is opened by ``open_lock_file``.

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

import contextlib
import errno
import os
import secrets
import shutil
import signal
import threading
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


def _create_temporary(path, access=os.O_WRONLY):
    """A new, empty file beside ``path`` with an unpredictable name: ``(descriptor, its path)``;
    ``access``: ``os.O_WRONLY`` or ``os.O_RDWR``."""
    for _ in range(100):
        tmp = path.with_name(temporary_prefix(path) + secrets.token_hex(8))
        try:
            return os.open(tmp, access | os.O_CREAT | os.O_EXCL | NO_FOLLOW, 0o666), tmp
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


# ---------------------------------------------------------------- streamed files

# Signals that end a process whose handler is the default one: while a streamed file is written
# they are held until the writer's next check, so that the temporary file can be removed.
_HELD_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                      if hasattr(signal, name))


class StreamedFile:
    """The temporary file of ``write_streamed``, as the file object h5py writes through.

    HDF5 (h5py's ``fileobj`` driver) calls ``seek``, ``read``, ``write``,
    ``truncate`` and ``flush``. A write that fails (a full disk) is not raised
    into HDF5, whose state after a write error can crash the process: it is
    kept, the writes after it are dropped, and ``check()``, which the writer
    calls between blocks, raises it in plain Python. ``check()`` also ends the
    write when a stop signal arrived.
    """

    def __init__(self, fd, held):
        self._fd, self._held = fd, held
        self._position = self._size = 0
        self.error = None

    def seek(self, offset, whence=os.SEEK_SET):
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._size}[whence]
        self._position = base + offset
        return self._position

    def tell(self):
        return self._position

    def read(self, size):
        # After a failed write HDF5 only closes the file, which is then removed: what it reads
        # back (perhaps never written) is zeros rather than a short read, which would be an error.
        data = bytes(size) if self.error else os.pread(self._fd, size, self._position)
        self._position += len(data)
        return data

    def write(self, data):
        if self.error is None:
            try:
                self._write_at(memoryview(data), self._position)
            except OSError as e:
                self.error = e
        self._position += len(data)
        self._size = max(self._size, self._position)
        return len(data)

    def _write_at(self, view, offset):
        while view:
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written

    def truncate(self, size):
        if self.error is None:
            try:
                os.ftruncate(self._fd, size)
            except OSError as e:
                self.error = e
        self._size = size

    def flush(self):
        pass

    def check(self):
        """Raise the error of a failed write, or ``Stopped`` once a stop signal arrived."""
        if self.error is not None:
            raise self.error
        if self._held:
            raise Stopped(self._held[0])


class Stopped(BaseException):
    """A stop signal ended a streamed write (a BaseException, like KeyboardInterrupt: nothing
    should catch it on the way out). ``write_streamed`` delivers the signal again once the
    temporary file is gone."""

    def __init__(self, number):
        super().__init__(f"stopped by {signal.Signals(number).name}")
        self.number = number


@contextlib.contextmanager
def write_streamed(path, size=None):
    """Yield the ``StreamedFile`` of a new temporary file beside ``path``, which replaces ``path``
    when the block ends, complete and on disk; on an error, or a stop signal, the temporary file
    is removed and ``path`` is as it was.

    ``size``: the bytes the file will take, about: refused at once (OSError ENOSPC) when the disk
    has less free. A stop signal (SIGINT, SIGTERM, SIGHUP) whose handler is the default one is
    held until the writer's next ``check()``, then delivered again once the temporary file is
    removed, so that it ends the process as it would have (other handlers, a training run's, are
    left to do what they do).
    """
    path = Path(path)
    if size is not None:
        _check_free_space(path.parent, size)
    with _signals_held() as held:
        fd, tmp = _create_temporary(path, os.O_RDWR)   # HDF5 reads back what it wrote
        try:
            streamed = StreamedFile(fd, held)
            yield streamed
            streamed.check()
            os.fsync(fd)
            os.close(fd)
            fd = None
            os.replace(tmp, path)
        finally:
            if fd is not None:
                os.close(fd)
            Path(tmp).unlink(missing_ok=True)
    fsync_folder(path.parent)


def _check_free_space(folder, size):
    try:
        free = shutil.disk_usage(folder).free
    except OSError:   # not knowing is no reason to refuse: a full disk is caught as it fills
        return
    if free < size:
        raise OSError(errno.ENOSPC, f"No space left on device: the file needs about "
                                    f"{_megabytes(size)}, {folder} has {_megabytes(free)} free")


def _megabytes(size):
    return f"{size / 2 ** 20:,.0f} MiB" if size >= 2 ** 20 else f"{size:,} bytes"


@contextlib.contextmanager
def _signals_held():
    """Hold the stop signals whose handler is the default one (see ``write_streamed``); yields
    the list of those that arrived."""
    held, previous = [], {}
    if threading.current_thread() is threading.main_thread():   # only it may set handlers
        for number in _HELD_SIGNALS:
            if signal.getsignal(number) in (signal.SIG_DFL, signal.default_int_handler):
                previous[number] = signal.signal(number, lambda n, frame: held.append(n))
    try:
        yield held
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if held:
            signal.raise_signal(held[0])
