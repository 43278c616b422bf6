"""A run whose ranks report their peak memory: what tests/test_streaming.py holds a streamed run to.

    [mpiexec -n P] python tests/memory_job.py DATA RUN_DIR OUT_DIR [DATA_MEMORY]

Each rank writes ``OUT_DIR/rank<r>.json``: its resident memory once its libraries are loaded
(numpy, h5py, the BLAS, ddptrain's modules) and MPI is started, before training (``VmRSS``), and
its peak over the whole run (``VmHWM``), in bytes, from ``/proc/self/status``.
"""

import json
import sys
from pathlib import Path

import h5py  # noqa: F401 - loaded before the first measure, as a run loads it
import numpy as np

import ddptrain
import ddptrain.run.runner  # noqa: F401 - ddptrain's modules, which ddptrain.train loads
from ddptrain.distributed.world import world


def status(field):
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def main(data, run_dir, out_dir, data_memory="0"):
    world()   # MPI started, as a run starts it
    np.ones((64, 64)) @ np.ones((64, 64))   # the BLAS loaded
    before = status("VmRSS")
    result = ddptrain.train("3072-16-10", data=data, run_dir=run_dir, epochs=1, batch_size=512,
                            eval_batch=500, data_memory=data_memory, threads=1, gemm="numpy",
                            quiet=True)
    Path(out_dir, f"rank{result.rank}.json").write_text(json.dumps(
        {"before": before, "peak": status("VmHWM"), "status": result.exit_status}))


if __name__ == "__main__":
    main(*sys.argv[1:])
