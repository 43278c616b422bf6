"""Time to 98% test accuracy: real runs of ``mpiexec -n P python -m ddptrain``.

The runs themselves are scripts/time_to_accuracy.py's; this prints them.
"""

from __future__ import annotations

import time_to_accuracy  # scripts/time_to_accuracy.py, beside this package

from .workload import RANDOM


def time_to_accuracy_runs(opts, ranks):
    """Run and print the time-to-accuracy command ``--tta-repeats`` times; its results, or None
    where skipped (--no-tta, --quick, random data)."""
    if opts.no_tta:
        return None
    if opts.data == RANDOM:
        print("\ntime to 98% test accuracy: skipped (random data)")
        return None
    print(f"\ntime to 98% test accuracy, {ranks} ranks, {opts.tta_repeats} runs of the command "
          f"line ...", flush=True)
    tta = time_to_accuracy.measure(opts.data, ranks, 98.0, opts.tta_args, opts.tta_repeats)
    for i, run in enumerate(tta["runs"], 1):
        epochs = ", ".join(f"{e['accuracy']:.2f}% at {e['at_seconds']:.2f} s"
                           for e in run["epochs"])
        rates = ", ".join(f"{m['samples_per_second']:,.0f}" for m in run["metrics"])
        reached = ("not reached" if run["seconds_to_target"] is None
                   else f"{run['seconds_to_target']:.2f} s")
        print(f"  run {i}: 98% {reached} (whole run {run['total_seconds']:.2f} s); test accuracy "
              f"per epoch: {epochs}; epoch rates incl. evaluation: {rates} samples/s")
    print(f"  `{tta['command']}`")
    print("time to 98% test accuracy: "
          + ("not reached in every run" if tta["median_seconds"] is None
             else f"{tta['median_seconds']:.2f} s (median of {opts.tta_repeats})"))
    return tta
