"""This rank's rows: a split it holds in memory (or streams), and the rows of each global batch
gathered from it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ddptrain.data.format import PIXEL_MAX


@dataclass
class Split:
    """The rows of one split (train or test) that this rank holds in memory.

    A data file's images stay as their uint8 pixels, a quarter of the memory
    of float32 (and of the memory traffic of gathering a batch), and become
    the model's floats, pixel/255, as rows are taken (``as_input``): the
    operation ``format.read_rows`` would have applied at load, so the same
    values. Floating-point images (in-memory arrays) are kept as given.
    """

    x: np.ndarray              # (rows, *sample shape): uint8 pixels, or floats of the model's dtype
    y: np.ndarray              # (rows,) int64 labels
    dtype: np.dtype = None     # the model's; None: that of x (floats)
    # the data.stream.WindowStream that fills x and y (None: they hold the rows from the start)
    stream: object = None

    def __post_init__(self):
        self.dtype = np.dtype(self.x.dtype if self.dtype is None else self.dtype)
        if self.dtype.kind != "f":
            raise ValueError(f"a Split of {self.x.dtype} images needs the model's floating dtype")

    def as_input(self, x, out=None):
        """Rows taken from ``self.x`` as the model takes them: pixels scaled into ``out`` (a new
        array if None), or the floats themselves."""
        if x.dtype == np.uint8:
            return np.divide(x, PIXEL_MAX, out=out, dtype=self.dtype)
        return x

    @property
    def n_rows(self):
        return len(self.y)

    def rows(self, start, stop):
        """Rows ``start:stop`` as the model takes them, and their labels (for evaluation)."""
        return self.as_input(self.x[start:stop]), self.y[start:stop]


class ReadSplit:
    """The rows ``[start, stop)`` of a split, read from the data when they are asked for (``rows``):
    what a streamed run evaluates on, holding one chunk of them at a time."""

    def __init__(self, info, split, start, stop, dtype, shape):
        self.info, self.split, self.start, self.stop = info, split, start, stop
        self.dtype, self.shape = np.dtype(dtype), shape   # shape: the model's as_input

    @property
    def n_rows(self):
        return self.stop - self.start

    def rows(self, start, stop):
        start, stop = min(self.start + start, self.stop), min(self.start + stop, self.stop)
        stored = self.info.stored_dtype(self.dtype)
        if start == stop:   # evaluation's padding passes (``evaluate``): nothing to read
            x, y = np.empty((0, *self.info.image_shape), stored), np.empty(0, np.int64)
        else:
            x, y = self.info.read_rows(self.split, [(start, stop)], dtype=stored)
        return Split(self.shape(x), y, self.dtype).rows(0, len(y))


class Batches:
    """This rank's rows of each global batch, gathered from its shard into one reused array."""

    def __init__(self, split, max_rows):
        self.split = split
        self._x = np.empty((max_rows, *split.x.shape[1:]), dtype=split.dtype)
        self._pixels = (np.empty((max_rows, *split.x.shape[1:]), dtype=np.uint8)
                        if split.x.dtype == np.uint8 else None)

    def gather(self, rows):
        # mode="clip": with the default mode="raise", np.take fills a temporary and then
        # copies it into `out` (to stay safe on a bad index); the rows are valid by construction.
        x = self._x[:len(rows)]
        if self._pixels is None:
            np.take(self.split.x, rows, axis=0, out=x, mode="clip")
        else:
            self.split.as_input(np.take(self.split.x, rows, axis=0, out=self._pixels[:len(rows)],
                                        mode="clip"), x)
        return x, self.split.y[rows]

    def take(self, plan, step):
        """This rank's rows of global batch ``step`` of ``plan``. Streamed, once the stream has read
        them; and the windows that no later step needs go back to it."""
        stream = self.split.stream
        if stream is not None:
            stream.wait_for(plan, step)
        batch = self.gather(plan.local_batch(step))
        if stream is not None:
            stream.done_with(plan, step)
        return batch
