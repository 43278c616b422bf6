"""A script that trains through ``ddptrain.train``, as a user's would, and saves what each rank ends
with.

    [mpiexec -n P] python tests/api_job.py DATA OUT_DIR [arrays]

The model is the example's (``scripts/custom_model.py``: Linear layers and a
PReLU layer of the script's own), in float64, on ``DATA`` (a file of 8x8
images), or on the same data as in-memory arrays with ``arrays``. Each rank
writes ``OUT_DIR/rank<r>.npz``: its trained parameters and its result's
per-epoch metrics.
"""

import json
import sys
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from custom_model import build_model  # noqa: E402

import ddptrain  # noqa: E402


def arrays_of(path):
    with h5py.File(path, "r") as f:
        return tuple(f[f"{split}/{name}"][()] for split in ("train", "test")
                     for name in ("images", "labels"))


def main(data, out_dir, source="file"):
    out_dir = Path(out_dir)
    model = build_model(dtype=np.float64, seed=3, hidden=(16,), n_inputs=64)
    result = ddptrain.train(model, data=arrays_of(data) if source == "arrays" else data, epochs=2,
                            batch_size=32, lr=0.1, optimizer="adamw", weight_decay=0.01,
                            virtual_shards=12, seed=5, run_dir=str(out_dir / f"run-{source}"),
                            quiet=True)
    np.savez(out_dir / f"rank{result.rank}.npz", params=model.params,
             metrics=json.dumps(result.metrics), world_size=result.world_size)


if __name__ == "__main__":
    main(*sys.argv[1:])
