"""Time to accuracy: real runs of ``mpiexec -n P python -m ddptrain`` (the MLP to 98%, a named
model's recipe to its target) and of the same recipe in PyTorch.

The runs themselves are timed by scripts/time_to_accuracy.py; this prints them.
"""

from __future__ import annotations

import statistics
import sys

import time_to_accuracy  # scripts/time_to_accuracy.py, beside this package

from .launching import COMMAND, free_port
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


def recipe_runs(opts, ranks, use_torch):
    """The named model ``--recipe``'s time to ``--recipe-target`` on ``ranks`` ranks: one run of
    ``python -m ddptrain --model M --seed S`` per seed of ``--recipe-seeds`` and, with PyTorch,
    the same recipe in PyTorch (``torch_recipe``) for the same seed right after it, on as many
    ranks and (its best launch on few cores) in one process, all timed by
    ``time_to_accuracy.run_command`` (launch to the first epoch line at the target). Returns
    ``{"ddptrain": [...], "pytorch": [...] or None, "pytorch_one": [...] or None, "target",
    "model", "ranks"}`` with each side's median, or None where skipped (--no-recipe, --no-tta,
    random data)."""
    if opts.no_recipe or opts.no_tta or opts.data == RANDOM:
        return None
    seeds = [int(seed) for seed in opts.recipe_seeds.split(",")]
    target, model = opts.recipe_target, opts.recipe
    print(f"\ntime to {target}% test accuracy of --model {model} with its own training defaults, "
          f"{ranks} ranks, seeds {opts.recipe_seeds}, ddptrain"
          + (" and the same recipe in PyTorch" if use_torch else "") + " ...", flush=True)
    sides = {"ddptrain": f"ddptrain, {ranks} ranks"}
    if use_torch:
        sides["pytorch"] = f"PyTorch DDP, {ranks} ranks"
        if ranks > 1:
            sides["pytorch_one"] = "PyTorch, 1 process"
    runs = {"pytorch": None, "pytorch_one": None, **{side: [] for side in sides},
            "target": target, "model": model, "ranks": ranks, "labels": sides}
    for seed in seeds:
        for side, label in sides.items():
            if side == "ddptrain":
                run = time_to_accuracy.run_once(opts.data, ranks, target,
                                                ["--model", model, "--seed", str(seed),
                                                 "--quiet"], timeout=900)
            else:
                argv = torch_recipe_command(opts, ranks if side == "pytorch" else 1, model, seed)
                run = {**time_to_accuracy.run_command(argv, target, timeout=900),
                       "command": " ".join(argv)}
            runs[side].append(run)
            print(f"  {label}, seed {seed}: {recipe_line(run, target)}", flush=True)
    for side, label in sides.items():
        runs[f"{side}_median_seconds"] = median = median_seconds(runs[side])
        print(f"{label}: time to {target}% "
              + ("not reached in every run" if median is None
                 else f"{median:.2f} s (median of {len(seeds)} seeds)"))
    return runs


def torch_recipe_command(opts, ranks, model, seed):
    """The PyTorch side: this benchmark's worker ``torch-recipe`` on ``ranks`` ranks."""
    argv = [sys.executable, str(COMMAND), "--worker", "torch-recipe", "--data", str(opts.data),
            "--model", model, "--seed", str(seed),
            "--threads-per-rank", str(max(1, (opts.threads or opts.cores) // ranks)),
            "--port", str(free_port())]
    return argv if ranks == 1 else [*time_to_accuracy.mpiexec(ranks), *argv]


def recipe_line(run, target):
    epochs = ", ".join(f"{e['accuracy']:.2f}% at {e['at_seconds']:.1f} s" for e in run["epochs"])
    reached = ("not reached" if run["seconds_to_target"] is None
               else f"{run['seconds_to_target']:.2f} s")
    return f"{target}% {reached} (whole run {run['total_seconds']:.1f} s); epochs: {epochs}"


def median_seconds(runs):
    times = [run["seconds_to_target"] for run in runs]
    return statistics.median(times) if all(t is not None for t in times) else None
