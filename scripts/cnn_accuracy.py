#!/usr/bin/env python3
"""The accuracy target of ``--model cnn``: final test accuracy and wall time of real runs, one per
seed.

Runs ``mpiexec -n P python -m ddptrain --model cnn --seed S`` (the model's own
training defaults: no option tuned here) for each seed, and prints each run's
test accuracy after every epoch (the curve) with the wall time at which it
was printed, the final accuracy, the whole run's time, and the median final
accuracy over the seeds against the target (99.3%, in under 10 minutes per
run).

    python scripts/cnn_accuracy.py                      # 3 seeds, 2 ranks, the cached MNIST
    python scripts/cnn_accuracy.py --seeds 0,1,2,3,4 --ranks 4 --model cnn
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))   # time_to_accuracy.py, beside this file

import time_to_accuracy  # noqa: E402

TARGET, MINUTES = 99.3, 10


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="HDF5 data file (default: ddptrain's MNIST in the cache, "
                        "prepared if missing)")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated (default: %(default)s)")
    parser.add_argument("--train-args", default="",
                        help="more options for python -m ddptrain, as one string")
    parser.add_argument("--json", metavar="PATH", help="also write the runs to PATH")
    args = parser.parse_args(argv)
    data = args.data
    if data is None:
        from ddptrain.data.datasets import ensure_prepared
        data = ensure_prepared("mnist")

    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        options = ["--model", args.model, "--seed", str(seed), "--quiet", *args.train_args.split()]
        run = time_to_accuracy.run_once(data, args.ranks, TARGET, options, timeout=3 * 60 * MINUTES)
        run["seed"], run["final"] = seed, run["epochs"][-1]["accuracy"]
        runs.append(run)
        curve = ", ".join(f"{e['accuracy']:.2f}" for e in run["epochs"])
        print(f"seed {seed}: final test accuracy {run['final']:.2f}% after {len(run['epochs'])} "
              f"epochs, whole run {run['total_seconds']:.1f} s ({run['total_seconds'] / 60:.1f} "
              f"min); test accuracy per epoch: {curve}", flush=True)
    words = runs[0]["command"].split()
    seed_at = words.index("--seed")
    print(f"command: {' '.join(words[:seed_at] + ['--seed', 'S'] + words[seed_at + 2:])}")
    median = statistics.median(run["final"] for run in runs)
    slowest = max(run["total_seconds"] for run in runs)
    met = median >= TARGET and slowest < 60 * MINUTES
    print(f"[{'MET ' if met else 'MISSED'}] median final test accuracy {median:.2f}% over "
          f"{len(runs)} seeds (target {TARGET}%), slowest run {slowest / 60:.1f} min "
          f"(target under {MINUTES} min)")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
