"""One flipped bit, anywhere in a checkpoint or a data file: the run ends within seconds, with exit
0 and exactly the pristine file's result, or with exit 2 and one line. Never a traceback, a hang or
another result.

Each case flips one bit of a copy and runs ddptrain on it (``tests/flip_and_run.py``: a training run
of one step for a data file, ``evaluate`` for a checkpoint). The positions cover every structure of
the file: a few hundred spread over its metadata (HDF5's superblock, object headers, chunk indexes,
the checkpoint's own header) and some over the stored values, a different bit at each.
"""

import json
import selectors
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

import helpers
from ddptrain.distributed.comm import SerialComm
from ddptrain.run.config import Config
from ddptrain.run.runner import run_training
from helpers import make_dataset, model_spec

pytestmark = pytest.mark.slow   # a process runs the cases

# a case that hangs HDF5 is cut short by ddptrain after 10 s (data.CHECK_SECONDS)
SECONDS_PER_CASE = 30
FLIPPER = helpers.ROOT / "tests" / "flip_and_run.py"


def value_ranges(path):
    """The byte ranges ``[start, stop)`` holding datasets' values (everything else is metadata)."""
    ranges = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            if obj.chunks is None:
                ranges.append((obj.id.get_offset(),
                               obj.id.get_offset() + obj.id.get_storage_size()))
            else:
                for index in range(obj.id.get_num_chunks()):
                    chunk = obj.id.get_chunk_info(index)
                    ranges.append((chunk.byte_offset, chunk.byte_offset + chunk.size))
    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return ranges


def cases(path, metadata=250, values=50):
    """``[[position, bit], ...]``: ``metadata`` positions spread evenly over the metadata,
    ``values`` over the stored values, the bit going round 0..7."""
    size = len(open(path, "rb").read())
    in_values = np.zeros(size, dtype=bool)
    for start, stop in value_ranges(path):
        in_values[start:stop] = True
    chosen = []
    for pool, count in ((np.flatnonzero(~in_values), metadata),
                        (np.flatnonzero(in_values), values)):
        chosen += [int(p) for p in pool[np.linspace(0, len(pool) - 1,
                                                    min(count, len(pool))).astype(int)]]
    return [[position, i % 8] for i, position in enumerate(chosen)]


def run_cases(kind, pristine, data, work, case_list):
    """Run the cases in one process; the result of each, or a failure naming the case that hung."""
    work.mkdir(parents=True, exist_ok=True)
    spec = work / "cases.json"
    spec.write_text(json.dumps({"kind": kind, "pristine": str(pristine), "data": str(data),
                                "work": str(work), "cases": case_list}))
    proc = subprocess.Popen([sys.executable, str(FLIPPER), str(spec)], stdout=subprocess.PIPE,
                            text=True, env=helpers.clean_env(), cwd=helpers.ROOT)
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    results, started = [], None
    try:
        while True:
            if not selector.select(timeout=SECONDS_PER_CASE if started is None else
                                   max(0.0, started[1] + SECONDS_PER_CASE - time.monotonic())):
                position, bit = case_list[started[0]]
                pytest.fail(f"{kind}: case {started[0]} (byte {position}, bit {bit}) did not end "
                            f"within {SECONDS_PER_CASE} s")
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("START "):
                started = (int(line.split()[1]), time.monotonic())
            else:
                results.append(json.loads(line))
                started = None
    finally:
        proc.kill()
        proc.wait()
    assert len(results) == len(case_list), f"the flipper ended early ({proc.returncode})"
    return results


def assert_each_run_is_the_pristine_one_or_refused_in_one_line(results, case_list, kind):
    for result in results:
        position, bit = case_list[result["case"]]
        where = f"{kind}, byte {position}, bit {bit}"
        lines = [line for line in result["stderr"].splitlines() if line.strip()]
        if result["status"] == 0:
            assert result["same"], f"{where}: exit 0 with another result"
            assert lines == [], f"{where}: {lines}"
        else:
            assert result["status"] == 2, (f"{where}: status {result['status']}: "
                                           f"{result['stderr'][-2000:]}")
            assert len(lines) == 1 and lines[0].startswith("ddptrain: error: "), f"{where}: {lines}"
            assert "Traceback" not in result["stderr"]


def test_a_flipped_bit_anywhere_in_a_data_file_is_refused_in_one_line_or_changes_nothing(tmp_path):
    pristine = make_dataset(tmp_path / "data.h5")
    case_list = cases(pristine)
    results = run_cases("data", pristine, pristine, tmp_path / "work", case_list)
    assert_each_run_is_the_pristine_one_or_refused_in_one_line(results, case_list, "data file")
    refused = [r for r in results if r["status"] == 2]
    # Every flip in the values is caught (Fletcher-32), and most flips in the metadata (HDF5's
    # checksums); the rest fell on bytes HDF5 does not read (free space, padding).
    assert all(r["status"] == 2 for r in results[-50:])
    assert len(refused) > 0.8 * len(results)


def test_a_flipped_bit_anywhere_in_a_checkpoint_is_refused_in_one_line(small_data, tmp_path):
    config = Config(data=small_data, model=model_spec(), batch_size=16, epochs=1, threads=1,
                    run_dir=str(tmp_path / "run")).validated()
    assert run_training(config, SerialComm(), quiet=True).exit_status == 0
    pristine = tmp_path / "run" / "checkpoints" / "step-00000015.h5"
    # The header (the digest, the length, the padding), then HDF5's metadata and the stored arrays.
    case_list = [[p, i % 8] for i, p in enumerate(range(0, 512, 8))] + \
        [[p, b] for p, b in cases(pristine, metadata=200, values=50) if p >= 512]
    results = run_cases("checkpoint", pristine, small_data, tmp_path / "work", case_list)
    assert_each_run_is_the_pristine_one_or_refused_in_one_line(results, case_list, "checkpoint")
    # the digest covers every byte: nothing is unchecked
    assert all(r["status"] == 2 for r in results)
    said = "".join(r["stderr"] for r in results)
    assert "checksum mismatch, the checkpoint is corrupt" in said
    assert "not a ddptrain checkpoint" in said
