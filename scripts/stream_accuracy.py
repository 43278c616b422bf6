#!/usr/bin/env python3
"""Final test accuracy of runs whose shards are streamed (--data-memory) against the same runs in
memory: what a window shuffle costs (docs/data.md#streaming).

    python scripts/stream_accuracy.py [--ranks 2] [--seeds 0,1,2] [--data-memory 20M[,40M...]]
                                      [--no-memory] [--sets mnist:5,fashion-mnist:15] [--json PATH]

For each set (NAME:EPOCHS, prepared in the cache on first use), seed and way
(in memory, unless --no-memory; streamed with each --data-memory), it runs
``mpiexec -n RANKS python -m ddptrain --data NAME --epochs EPOCHS --seed
SEED`` with the default model and options, in alternation, and prints each
run's final test accuracy, then the median of each way. The runs share nothing but the data file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import time_to_accuracy  # beside this script: mpiexec and a clean environment

ROOT = Path(__file__).resolve().parent.parent


def run(name, epochs, seed, ranks, data_memory, folder):
    run_dir = Path(folder) / f"{name}-{seed}-{data_memory or 'memory'}"
    argv = [time_to_accuracy.mpiexec(), "-n", str(ranks), sys.executable, "-m", "ddptrain",
            "--data", name, "--epochs", str(epochs), "--seed", str(seed), "--run-dir",
            str(run_dir), "--quiet", *(["--data-memory", data_memory] if data_memory else [])]
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT,
                          env=time_to_accuracy.clean_env(), check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    line = next((line for line in proc.stdout.splitlines() if line.startswith("data: ")), "")
    return {"accuracy": records[-1]["test_accuracy"], "seconds": time.perf_counter() - started,
            "data_line": line}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--data-memory", default="20M", help="per rank; several, comma-separated")
    p.add_argument("--no-memory", action="store_true", help="no runs in memory")
    p.add_argument("--sets", default="mnist:5,fashion-mnist:15")
    p.add_argument("--json", metavar="PATH")
    opts = p.parse_args(argv)
    seeds = [int(s) for s in opts.seeds.split(",")]
    results = {}
    with tempfile.TemporaryDirectory(prefix="ddptrain-stream-accuracy-") as folder:
        for item in opts.sets.split(","):
            name, epochs = item.split(":")
            for seed in seeds:
                ways = [] if opts.no_memory else [("in memory", None)]
                ways += [(f"streamed, --data-memory {size}", size)
                         for size in opts.data_memory.split(",")]
                for way, memory in ways:
                    result = run(name, int(epochs), seed, opts.ranks, memory, folder)
                    results.setdefault(f"{name}|{way}", []).append({"seed": seed, **result})
                    print(f"{name}, {epochs} epochs, seed {seed}, {way}: "
                          f"{100 * result['accuracy']:.2f}% ({result['seconds']:.1f} s)",
                          flush=True)
    print()
    for key, runs in results.items():
        name, way = key.split("|")
        accuracies = [100 * r["accuracy"] for r in runs]
        print(f"{name}, {way}: median {statistics.median(accuracies):.2f}% "
              f"({', '.join(f'{a:.2f}' for a in accuracies)})")
        if runs[0]["data_line"]:
            print(f"  {runs[0]['data_line']}")
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
