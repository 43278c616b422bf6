"""A rank's training rows streamed from the data file: two windows per shard, read ahead by a
thread.

``WindowStream`` holds, for each virtual shard this rank owns, two slots of
a window each (``stream_order``): the window being trained on and the next,
which a thread reads while the steps run. The thread reads whole blocks (the
file's chunks), each window's blocks in file order, contiguous ones in one
read, with HDF5's checksums verified as in any read; h5py releases the GIL
while HDF5 reads, so the reading overlaps the step (numpy's and BLAS's work
release it too). Everything a rank holds of its shard is the buffer of
``StreamLayout.buffer_rows`` rows, allocated once.

The trainer asks for the windows of a step before it gathers the step's
rows (``wait_for``) and gives back, once they are gathered, the windows no
later step needs (``done_with``): a window's slot is read into only when
the window it held is given back. The thread reads, among the windows whose
slot is free, the one trained on first, across epochs (the next epoch's
first windows are read during the evaluation).

A failed read (a damaged chunk: its Fletcher-32 checksum) is the one-line
``DataError`` of ``format.read_rows``, raised by the step that needs the
window; ``close`` stops the thread on every way out of training.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from ddptrain.data.chunks import ChunkReader
from ddptrain.data.format import _H5PY_ERRORS, _failure, _open
from ddptrain.data.stream_order import SLOTS, StreamedEpochPlan

JOIN_SECONDS = 10   # the longest ``close`` waits for a read under way (a hung file system)


class WindowStream:
    """This rank's training rows, streamed through a buffer of two windows per shard.

    ``images`` and ``labels`` are the buffer (``(rows, *image shape)`` of
    ``dtype``, and int64), which the epoch plans' ``local_rows`` index.
    ``source``: where rows come from (``FileRows``, ``ArrayRows``).
    """

    def __init__(self, layout, source, image_shape, dtype, epochs):
        self.layout, self.source, self.epochs = layout, source, epochs
        self.images = np.empty((layout.buffer_rows, *image_shape), dtype=dtype)
        self.labels = np.empty(layout.buffer_rows, dtype=np.int64)
        n_owned = len(layout.shards)
        # Windows by key (epoch << 32 | window), shard by shard: the next each reads; every one
        # before this given back; the one each slot holds (-1: none).
        self._changed = threading.Condition()
        self._next = np.zeros(n_owned, dtype=np.int64)
        self._released = np.zeros(n_owned, dtype=np.int64)
        self._owner = np.full((n_owned, SLOTS), -1, dtype=np.int64)
        self._epochs = {}                   # epoch -> its windows and first steps, shard by shard
        self._error = None
        self._closing = False
        self._thread = None
        self._waited = None                 # (epoch, step) of the last wait_for that returned
        self.bytes_read = 0
        self.seconds_waited = 0.0           # the steps' time waiting for windows (not overlapped)

    # -- the trainer's side -------------------------------------------------------------------

    def wait_for(self, plan: StreamedEpochPlan, step):
        """Until every window step ``step`` of ``plan`` trains on is in its slot; the read's
        DataError if one failed."""
        if self._waited == (plan.epoch, step - 1) and not plan.reaches[step]:
            self._waited = (plan.epoch, step)   # nothing the step before did not need
            return
        epoch = plan.epoch << 32
        with self._changed:
            if self._thread is None:
                self._start(epoch + plan.first_window[step])
            last = plan.last_window[step]
            needed = np.where(last >= 0, epoch + last, -1)
            started = time.perf_counter()
            while not (self._next > needed).all():
                if self._error is not None:
                    raise self._error
                self._changed.wait()
            self.seconds_waited += time.perf_counter() - started
        self._waited = (plan.epoch, step)

    def done_with(self, plan: StreamedEpochPlan, step):
        """Step ``step``'s rows are gathered: give back the windows no later step of the plan
        trains on (after its last step, every window of its epoch)."""
        if step + 1 == plan.n_steps:
            with self._changed:
                self._give_back(np.full(len(self._released), (plan.epoch + 1) << 32))
        elif plan.gives_back[step]:
            with self._changed:
                self._give_back((plan.epoch << 32) + plan.first_window[step + 1])

    def close(self):
        """Stop the thread (after the read under way, if any); the buffer stays readable."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(JOIN_SECONDS)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _give_back(self, windows):
        """Every window before ``windows`` (keys, shard by shard) is given back. Under the lock."""
        if (windows > self._released).any():
            np.maximum(self._released, windows, out=self._released)
            self._changed.notify_all()

    def _start(self, windows):
        self._next[:] = self._released[:] = windows
        self._thread = threading.Thread(target=self._read_ahead, name="ddptrain-stream",
                                        daemon=True)
        self._thread.start()

    # -- the reading thread -------------------------------------------------------------------

    def _read_ahead(self):
        try:
            with self.source.opened() as reader:
                while True:
                    with self._changed:
                        job = self._next_job()
                        while job is None and not self._closing:
                            self._changed.wait()
                            job = self._next_job()
                        if self._closing:
                            return
                    j, epoch, window, blocks = job
                    # the disk fetches this shard's next window while this one is read and checked
                    following = self._window_after(j, epoch, window)
                    if following is not None:
                        reader.prefetch(following)
                    start = self.layout.slot_start(j, window)
                    self.bytes_read += reader.read(blocks, self.images, self.labels, start)
                    with self._changed:
                        self._owner[j, window % SLOTS] = _key(epoch, window)
                        self._next[j] = _key(epoch, window + 1)
                        self._changed.notify_all()
        except BaseException as error:   # noqa: BLE001 - raised in the trainer by wait_for
            with self._changed:
                self._error = error
                self._changed.notify_all()

    def _next_job(self):
        """``(shard, epoch, window, blocks)``: of the windows whose slot is free, the one trained
        on first; None if none."""
        best, first = None, None
        for j in range(len(self._next)):
            epoch, window = self._next_shard_window(j)
            if epoch >= self.epochs:
                continue
            if self._owner[j, window % SLOTS] >= self._released[j]:
                continue   # its slot still holds a window a step needs
            windows, steps = self._epoch(epoch)[j]
            if first is None or (epoch, steps[window]) < first:
                best, first = (j, epoch, window, windows.blocks[window]), (epoch, steps[window])
        return best

    def _window_after(self, j, epoch, window):
        """The blocks of the window shard ``j`` reads after ``window`` of ``epoch``, or None."""
        windows, _ = self._epoch(epoch)[j]
        if window + 1 < windows.count:
            return windows.blocks[window + 1]
        if epoch + 1 < self.epochs:
            return self._epoch(epoch + 1)[j][0].blocks[0]
        return None

    def _next_shard_window(self, j):
        """The window shard ``j`` reads next, past the end of an epoch (and the windows no step
        reaches) into the next."""
        epoch, window = divmod(int(self._next[j]), 1 << 32)
        while epoch < self.epochs:
            windows, steps = self._epoch(epoch)[j]
            if window < windows.count and steps[window] >= 0:
                break
            epoch, window = epoch + 1, 0
        self._next[j] = _key(epoch, window)
        return epoch, window

    def _epoch(self, epoch):
        """Each owned shard's windows in ``epoch`` and the step each is first trained at
        (cached: the epochs the thread is reading)."""
        if epoch not in self._epochs:
            for old in [e for e in self._epochs if e < epoch - 1]:
                del self._epochs[old]
            lay = self.layout
            shards = []
            for j in range(len(lay.shards)):
                windows = lay.windows(epoch, j)
                shards.append((windows, lay.first_steps(windows, j)))
            self._epochs[epoch] = shards
        return self._epochs[epoch]


def _key(epoch, window):
    """A window's key: windows compare as (epoch, window) do."""
    return (epoch << 32) + window


class FileRows:
    """A split of a data file, read block by block into a stream's buffer (``opened`` in the
    reading thread, which alone uses the file)."""

    def __init__(self, path, split):
        self.path, self.split = path, split

    def opened(self):
        return _FileReader(self.path, self.split)


class _FileReader:
    def __init__(self, path, split):
        self.path, self.split = path, split

    def __enter__(self):
        self._file = _open(self.path).__enter__()
        self.images = self._file[f"{self.split}/images"]
        self.labels = self._file[f"{self.split}/labels"]
        # whole chunks read straight into the buffer (None: HDF5 reads every row)
        self._chunks = ChunkReader.of(self.images)
        return self

    def __exit__(self, *exc):
        self._file.close()
        return False

    def prefetch(self, blocks):
        """Ask the kernel to read the chunks of ``blocks`` now, in the background
        (``ChunkReader.advise``)."""
        if self._chunks is not None:
            for start, stop in contiguous(blocks):
                self._chunks.advise(start, stop)

    def read(self, blocks, images, labels, at):
        """Read ``blocks`` (in file order) into ``images``/``labels`` from row ``at``; the bytes
        read. A failed read is ``format.read_rows``'s DataError."""
        read = 0
        try:
            for start, stop in contiguous(blocks):
                rows = stop - start
                if self._chunks is not None:
                    self._chunks.read(start, stop, images[at:at + rows])
                else:
                    self.images.read_direct(images, np.s_[start:stop], np.s_[at:at + rows])
                # as stored, then widened by numpy: HDF5's conversion to int64 costs a fifth of the
                # images' read
                labels[at:at + rows] = self.labels[start:stop]
                at += rows
                read += rows * images[0].nbytes
        except _H5PY_ERRORS as error:
            raise _failure(self.path, f"cannot read '{self.split}' rows", error) from error
        return read


class ArrayRows:
    """A split of in-memory arrays (``arrays.Arrays``), copied block by block into a stream's
    buffer."""

    def __init__(self, arrays, split):
        self.images, self.labels = arrays.splits[split]

    def opened(self):
        return self

    def prefetch(self, blocks):
        pass   # in memory already

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read(self, blocks, images, labels, at):
        read = 0
        for start, stop in contiguous(blocks):
            rows = stop - start
            images[at:at + rows] = self.images[start:stop]   # the file's and arrays' cast
            labels[at:at + rows] = self.labels[start:stop]
            at, read = at + rows, read + rows * images[0].nbytes
        return read


def contiguous(blocks):
    """``blocks`` (``(m, 2)``, in file order) with adjacent ones joined: one read each."""
    runs = []
    for start, stop in blocks.tolist():
        if runs and runs[-1][1] == start:
            runs[-1][1] = stop
        else:
            runs.append([start, stop])
    return runs
