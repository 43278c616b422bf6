"""Whole chunks read straight into place (``data/chunks.py``): the Fletcher-32 check equals HDF5's,
catches what HDF5's catches, and the rows read equal HDF5's read of them; anything but the writer's
layout, and any chunk that does not check, is left to HDF5."""

import os

import h5py
import numpy as np
import pytest

import helpers
from ddptrain.data.chunks import CHECKSUM_BYTES, ChunkReader, fletcher32_matches


def stored_chunks(path, row_shape, chunk_rows, n_rows, seed=0):
    """A dataset of random uint8 rows with Fletcher-32, and each chunk's raw bytes."""
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 256, size=(n_rows, *row_shape), dtype=np.uint8)
    with h5py.File(path, "w", libver="latest") as f:
        f.create_dataset("x", data=values, chunks=(chunk_rows, *row_shape), fletcher32=True)
    with h5py.File(path, "r") as f:
        d = f["x"]
        raws = [np.frombuffer(d.id.read_direct_chunk((start,) + (0,) * len(row_shape))[1],
                              dtype=np.uint8) for start in range(0, n_rows, chunk_rows)]
    return values, raws


# Payloads of an odd byte count, of fewer words than a row of the sums, and of several rows.
@pytest.mark.parametrize("row_shape, chunk_rows", [((3, 5, 5), 7), ((5,), 3), ((8, 8), 4),
                                                   ((28, 28), 64), ((33,), 1000)])
def test_the_checksum_of_every_chunk_hdf5_wrote_is_found_equal(tmp_path, row_shape, chunk_rows):
    _, raws = stored_chunks(tmp_path / "x.h5", row_shape, chunk_rows, 3 * chunk_rows - 1)
    for raw in raws:
        assert fletcher32_matches(raw[:-CHECKSUM_BYTES], raw[-CHECKSUM_BYTES:])


@pytest.mark.parametrize("row_shape, chunk_rows", [((3, 5, 5), 7), ((28, 28), 64)])
def test_a_flipped_bit_a_zeroed_byte_or_two_swapped_words_do_not_match(tmp_path, row_shape,
                                                                       chunk_rows):
    _, raws = stored_chunks(tmp_path / "x.h5", row_shape, chunk_rows, chunk_rows)
    payload, stored = raws[0][:-CHECKSUM_BYTES].copy(), raws[0][-CHECKSUM_BYTES:]
    rng = np.random.default_rng(1)
    for at in [0, 1, len(payload) - 1, *rng.integers(0, len(payload), 20)]:
        flipped = payload.copy()
        flipped[at] ^= 1 << int(rng.integers(0, 8))
        assert not fletcher32_matches(flipped, stored)
    zeroed = payload.copy()
    zeroed[len(payload) // 2] = 0 if payload[len(payload) // 2] else 1
    assert not fletcher32_matches(zeroed, stored)
    swapped = payload.copy()
    swapped[0:2], swapped[2:4] = payload[2:4], payload[0:2]
    assert (payload[0:2] == payload[2:4]).all() or not fletcher32_matches(swapped, stored)
    assert not fletcher32_matches(payload, bytes(a ^ 1 for a in stored))


def opened_reader(path):
    """The file, opened by h5py, and the reader of its dataset "x" (through HDF5's descriptor)."""
    f = h5py.File(path, "r")
    return f, ChunkReader.of(f["x"])


@pytest.mark.parametrize("start, stop", [(0, 7), (0, 20), (3, 5), (5, 16), (6, 20), (19, 20),
                                         (14, 20), (0, 1)])
def test_any_rows_read_are_the_rows_hdf5_reads_and_whole_chunks_skip_hdf5(tmp_path, start, stop):
    values, _ = stored_chunks(tmp_path / "x.h5", (3, 5, 5), 7, 20)   # the last chunk: 6 rows
    f, reader = opened_reader(tmp_path / "x.h5")
    with f:
        assert reader is not None and reader.fd == f.id.get_vfd_handle()
        hdf5_reads = []
        reader.dataset = _Recording(f["x"], hdf5_reads)
        out = np.full((stop - start, 3, 5, 5), 7, dtype=np.uint8)
        reader.read(start, stop, out)
        assert (out == values[start:stop]).all()
        assert hdf5_reads == []   # every chunk read and checked here, HDF5 asked for none


class _Recording:
    """A dataset whose reads are recorded."""

    def __init__(self, dataset, reads):
        self.dataset, self.reads = dataset, reads

    def read_direct(self, out, source, dest):
        self.reads.append((source, dest))
        self.dataset.read_direct(out, source, dest)


def test_a_chunk_that_does_not_match_its_checksum_is_hdf5_s_error_never_its_rows(tmp_path):
    path = tmp_path / "x.h5"
    stored_chunks(path, (8, 8), 4, 12)
    with h5py.File(path, "r") as f:
        offset = f["x"].id.get_chunk_info(1).byte_offset
    with open(path, "r+b") as file:
        file.seek(offset + 10)
        byte = file.read(1)
        file.seek(offset + 10)
        file.write(bytes([byte[0] ^ 0x10]))
    f, reader = opened_reader(path)
    with f:
        out = np.zeros((12, 8, 8), dtype=np.uint8)
        reader.read(0, 4, out[:4])            # chunk 0 is whole
        with pytest.raises(OSError, match="checksum|filter returned failure"):
            reader.read(4, 8, out[4:8])       # chunk 1 is not: HDF5 reads it and refuses


@pytest.mark.parametrize("what, make", [
    ("compressed", dict(compression="gzip", fletcher32=True)),
    ("without a checksum", dict()),
    ("shuffled", dict(shuffle=True, fletcher32=True)),
    ("chunks of part of a row", dict(chunks=(4, 4, 8), fletcher32=True)),
    ("floats", dict(dtype=np.float32, fletcher32=True)),
])
def test_datasets_of_another_layout_are_left_to_hdf5(tmp_path, what, make):
    path = tmp_path / "x.h5"
    make = {"chunks": (4, 8, 8), **make}
    with h5py.File(path, "w", libver="latest") as f:
        f.create_dataset("x", data=np.ones((12, 8, 8), dtype=make.pop("dtype", np.uint8)), **make)
    f, reader = opened_reader(path)
    f.close()
    assert reader is None, what


def test_a_file_hdf5_holds_in_memory_is_left_to_hdf5(tmp_path):
    stored_chunks(tmp_path / "x.h5", (8, 8), 4, 12)
    with h5py.File(tmp_path / "x.h5", "r", driver="core") as f:   # no descriptor to read from
        assert ChunkReader.of(f["x"]) is None


def test_a_chunk_the_index_places_past_the_end_of_the_file_is_left_to_hdf5(tmp_path):
    path, short = tmp_path / "x.h5", tmp_path / "short.h5"
    values, _ = stored_chunks(path, (8, 8), 4, 12)
    with h5py.File(path, "r") as f:
        last = f["x"].id.get_chunk_info(2)
    short.write_bytes(path.read_bytes()[:last.byte_offset + last.size - 1])
    with h5py.File(path, "r") as f:
        fd = os.open(short, os.O_RDONLY)   # a file that ends one byte into the last chunk
        try:
            reader = ChunkReader.of(f["x"], fd)
            assert reader.sizes.tolist() == [4 * 64 + 4, 4 * 64 + 4, 0]
            hdf5_reads = []
            reader.dataset = _Recording(f["x"], hdf5_reads)
            out = np.zeros((12, 8, 8), dtype=np.uint8)
            reader.read(0, 12, out)
            assert (out == values).all() and len(hdf5_reads) == 1
        finally:
            os.close(fd)


def test_loading_rows_whole_asks_the_disk_for_each_chunk_once_ahead_of_its_read_within_a_bound(
        tmp_path, monkeypatch):
    from ddptrain.data import chunks, format as data_format
    path = helpers.make_chunked_dataset(tmp_path / "x.h5", n_train=160, chunk_rows=4)
    with h5py.File(path, "r") as f:   # 40 chunks of 256 bytes
        images = f["train/images"]
        values = images[:]
        place = {images.id.get_chunk_info(c).byte_offset: c for c in range(40)}
    monkeypatch.setattr(chunks, "AHEAD_BYTES", 1024)   # 4 chunks' rows
    events = []
    real_preadv = os.preadv
    monkeypatch.setattr(chunks.os, "posix_fadvise",
                        lambda fd, offset, size, advice: events.append(("advise", place[offset])))

    def preadv(fd, buffers, offset):
        events.append(("read", place[offset]))
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(chunks.os, "preadv", preadv)
    blocks = [(0, 40), (40, 100), (100, 160)]   # whole chunks, a shard's blocks in file order
    x, _ = data_format.read_rows(path, "train", blocks, dtype="uint8")
    assert (x == values).all()
    reads = [c for kind, c in events if kind == "read"]
    advised = [c for kind, c in events if kind == "advise"]
    assert reads == list(range(40))
    # each chunk but the first advised once, in the order read, each before its read, and never
    # more than AHEAD_BYTES (4 chunks) past the chunk being read
    assert advised == list(range(1, 40))
    read_so_far = -1
    for kind, chunk in events:
        if kind == "read":
            read_so_far = chunk
        else:
            assert read_so_far < chunk <= read_so_far + 1 + 4, (read_so_far, chunk)
