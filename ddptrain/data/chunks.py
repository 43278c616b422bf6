"""Whole chunks of a data file read straight into a rank's buffer, their checksums verified first.

HDF5 reads a chunk into a buffer of its own, verifies its Fletcher-32
checksum there, and copies it out: about 0.3 ms of CPU for a 784 KiB chunk
of MNIST, which on 2 cores kept a stream's reads to a third of what the disk
gives. ``ChunkReader`` reads a chunk of the layout ddptrain's writer stores
(uint8 rows, one filter: Fletcher-32, whose 4 bytes follow the values) with
one ``preadv`` into its place in the buffer, through the file descriptor
HDF5 itself reads with (the same file, whatever happens to its path), and
verifies the checksum with numpy (``fletcher32_matches``) before anything
uses the rows: the bytes are the same, checked the same way, for half the
CPU.

The chunk index (where each chunk lies) is HDF5's, read once per file; it is
checksummed metadata in files written with ``libver="latest"`` (every file
ddptrain writes), and every extent is checked to lie inside the file. A
chunk this reader does not know how to take (another filter, a skipped
filter, an odd size) is left to HDF5, and so is one whose checksum does not
match: HDF5 then reads it again and raises its own error, so a damaged chunk
ends a run with the same one line whichever way the rows were read.
"""

from __future__ import annotations

import os

import h5py
import numpy as np

CHECKSUM_BYTES = 4
MODULUS = 65535     # Fletcher-32 sums 16-bit words modulo 2**16 - 1
SUM_COLUMNS = 1024  # words summed a row at a time: every partial sum fits in 32 bits
AHEAD_BYTES = 32 * 2 ** 20   # what loading a shard whole asks the disk for ahead of its reads


def fletcher32_matches(values, stored):
    """Whether ``values`` (uint8, 1-D) have the Fletcher-32 checksum ``stored`` (4 bytes, as HDF5
    writes it after a chunk: ``sum2 << 16 | sum1``, little-endian).

    HDF5 sums the bytes as big-endian 16-bit words ``w[i]`` (an odd last byte
    as its high half): ``sum1 = sum(w[i])`` and ``sum2 = sum((n - i) * w[i])``,
    both modulo 65535. As ``65536 = 1 (mod 65535)``, a big-endian word is 256
    times its little-endian reading, so the words are summed as numpy sees
    them and multiplied by 256 at the end. ``sum2`` comes from the rows and
    columns of the words laid out as a matrix (``n - i = (n - r * C) - c``
    for word ``c`` of row ``r``): two vectorised sums instead of a loop. The
    sums are compared modulo 65535 (HDF5's folding may leave 0 as 0xffff).
    """
    values = np.asarray(values, dtype=np.uint8).reshape(-1)
    if len(values) % 2:
        values = np.concatenate([values, np.zeros(1, dtype=np.uint8)])
    words = values.view("<u2")
    n = len(words)
    rows = n // SUM_COLUMNS
    body = words[:rows * SUM_COLUMNS].reshape(rows, SUM_COLUMNS)
    row_sums = body.sum(axis=1, dtype=np.uint32).astype(np.int64)
    column_sums = body.sum(axis=0, dtype=np.uint32).astype(np.int64)
    tail = words[rows * SUM_COLUMNS:].astype(np.int64)
    row_weights = n - SUM_COLUMNS * np.arange(rows, dtype=np.int64)
    tail_weights = n - rows * SUM_COLUMNS - np.arange(len(tail), dtype=np.int64)
    sum1 = int(row_sums.sum()) + int(tail.sum())
    sum2 = (int(row_weights @ row_sums) - int(np.arange(SUM_COLUMNS, dtype=np.int64) @ column_sums)
            + int(tail_weights @ tail))
    checksum = int.from_bytes(bytes(stored), "little")
    return ((256 * sum1 - (checksum & 0xFFFF)) % MODULUS == 0
            and (256 * sum2 - (checksum >> 16)) % MODULUS == 0)


class ChunkReader:
    """The rows of one chunked uint8 dataset, read a whole chunk at a time from the open file
    descriptor ``fd`` (``of`` builds one, or gives None for a dataset HDF5 must read)."""

    def __init__(self, dataset, fd, offsets, sizes):
        self.dataset, self.fd = dataset, fd
        self.offsets, self.sizes = offsets, sizes        # by chunk number; size 0: HDF5 reads it
        self.chunk_rows = dataset.chunks[0]
        self.row_bytes = int(np.prod(dataset.shape[1:], dtype=np.int64))
        self.n_rows = dataset.shape[0]
        self._checksum = np.empty(CHECKSUM_BYTES, dtype=np.uint8)
        self._scratch = None                             # a chunk, for one read only in part

    @classmethod
    def of(cls, dataset, fd=None):
        """A reader of ``dataset`` (an h5py dataset), through ``fd`` (default: the descriptor HDF5
        itself reads the file with, so both read the same file whatever happens to its path), or
        None where its layout is not the writer's: values not uint8, chunks not whole rows,
        filters other than Fletcher-32 alone, a chunk index HDF5 cannot list, or a file not
        opened by HDF5's default (POSIX) driver."""
        if fd is None:
            if dataset.file.driver != "sec2":
                return None
            fd = dataset.file.id.get_vfd_handle()
        chunks = dataset.chunks
        if (dataset.dtype != np.uint8 or not chunks or dataset.ndim < 1
                or tuple(chunks[1:]) != tuple(dataset.shape[1:])):
            return None
        pipeline = dataset.id.get_create_plist()
        if (pipeline.get_nfilters() != 1
                or pipeline.get_filter(0)[0] != h5py.h5z.FILTER_FLETCHER32):
            return None
        rows = chunks[0]
        count = -(-dataset.shape[0] // rows)
        payload = rows * int(np.prod(chunks[1:], dtype=np.int64))
        file_size = os.fstat(fd).st_size
        offsets, sizes = np.zeros(count, dtype=np.int64), np.zeros(count, dtype=np.int64)

        def visit(info):
            chunk = info.chunk_offset[0] // rows
            if (0 <= chunk < count and info.filter_mask == 0 and info.byte_offset is not None
                    and info.size == payload + CHECKSUM_BYTES
                    and 0 <= info.byte_offset <= file_size - info.size):
                offsets[chunk], sizes[chunk] = info.byte_offset, info.size

        try:
            dataset.id.chunk_iter(visit)
        except (OSError, RuntimeError, ValueError, AttributeError):
            return None
        return cls(dataset, fd, offsets, sizes)

    def advise(self, start, stop):
        """Ask the kernel to read the chunks of rows ``start:stop`` into its page cache now, in the
        background (``posix_fadvise``): the disk serves many requests at once, where one read at a
        time waits for each. A hint: a failure is left to the read."""
        for chunk in range(start // self.chunk_rows, -(-stop // self.chunk_rows)):
            self.advise_chunk(chunk)

    def advise_chunk(self, chunk):
        if self.sizes[chunk]:
            try:
                os.posix_fadvise(self.fd, int(self.offsets[chunk]), int(self.sizes[chunk]),
                                 os.POSIX_FADV_WILLNEED)
            except OSError:
                pass

    def read(self, start, stop, out, ahead=None):
        """Rows ``start:stop`` into ``out`` (uint8, ``(stop - start, *row shape)``, C-contiguous),
        chunk by chunk (``ahead``: a ``ReadAhead`` told of each); a chunk HDF5 must read (or
        whose checksum does not match) is read by HDF5, which raises its own error for a damaged
        one."""
        flat = out.reshape(len(out), self.row_bytes)
        row = start
        while row < stop:
            chunk = row // self.chunk_rows
            if ahead is not None:
                ahead.reading(chunk)
            first = chunk * self.chunk_rows
            end = min(stop, first + self.chunk_rows)
            into = flat[row - start:end - start]
            if not (self.sizes[chunk] and self._read_chunk(chunk, row - first, into)):
                self.dataset.read_direct(out, np.s_[row:end], np.s_[row - start:end - start])
            row = end

    def _read_chunk(self, chunk, skip, into):
        """Rows ``skip:skip + len(into)`` of chunk ``chunk`` into ``into``: True when read and
        verified. A whole chunk lands in place; a part goes through a scratch chunk."""
        whole = skip == 0 and len(into) == self.chunk_rows
        if whole:
            target = into
        else:
            if self._scratch is None:
                self._scratch = np.empty((self.chunk_rows, self.row_bytes), dtype=np.uint8)
            target = self._scratch
        size = int(self.sizes[chunk])
        got = os.preadv(self.fd, [target, self._checksum], int(self.offsets[chunk]))
        if got != size or not fletcher32_matches(target.reshape(-1), self._checksum):
            return False
        if not whole:
            into[:] = target[skip:skip + len(into)]
        return True


class ReadAhead:
    """Keeps the kernel reading the chunks of ``blocks`` (``(start, stop)`` rows, in the order they
    are read) up to ``AHEAD_BYTES`` past the chunk being read (``reading``): enough requests at
    once for the disk, never so far ahead that what was fetched is evicted before it is read."""

    def __init__(self, reader, blocks):
        self.reader = reader
        rows = reader.chunk_rows
        self.order = []                   # the chunks, in the order they are read
        for start, stop in blocks:
            for chunk in range(start // rows, -(-stop // rows)):
                if not self.order or self.order[-1] != chunk:
                    self.order.append(chunk)
        self.count = max(1, AHEAD_BYTES // (rows * reader.row_bytes))   # chunks ahead
        self._at = 0         # where in ``order`` the reads are
        self._advised = 0    # the chunks of ``order`` before this one are advised (or read)

    def reading(self, chunk):
        """``chunk`` is about to be read: advise the next ``count`` chunks after it."""
        while self._at < len(self.order) - 1 and self.order[self._at] != chunk:
            self._at += 1
        self._advised = max(self._advised, self._at + 1)
        stop = min(len(self.order), self._at + 1 + self.count)
        for position in range(self._advised, stop):
            self.reader.advise_chunk(self.order[position])
        self._advised = max(self._advised, stop)
