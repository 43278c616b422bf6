"""One benchmark run: the header, the rounds of rows and GEMM limits, the table, the verdicts, and
the JSON output."""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

from .accuracy_runs import recipe_runs, time_to_accuracy_runs
from .ddptrain_internals import ensure_default_dataset, gemm
from .environment import (
    cpu_flags,
    describe_machine,
    isa_environment,
    machine_lines,
    torch_available,
    torch_version,
)
from .gemm_limit import GemmLimit
from .json_output import write_json
from .launching import free_port, launch
from .notes import notes
from .report import add_figures, table
from .rows import plan_rows, row_models
from .streaming import measure_reads, stream_lines, stream_verdicts
from .targets import (
    CNN_TITLE,
    REPRODUCIBLE_TITLE,
    cnn_verdicts,
    mlp_title,
    mlp_verdicts,
    recipe_verdicts,
    reproducible_verdicts,
    verdict_lines,
)
from .workload import RANDOM, flops_per_sample, use_images_of, with_batchnorm


def run_benchmark(opts):
    opts.bn_model = opts.bn_model or with_batchnorm(opts.model)
    if opts.quick:
        opts.rounds, opts.repeats, opts.samples = 1, 2, 256
        opts.no_tta, opts.batch_sizes = True, "32"
    batches = [int(b) for b in opts.batch_sizes.split(",")]
    opts.cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                  else os.cpu_count())
    budget, ranks = opts.threads or opts.cores, opts.ranks
    per_rank = max(1, budget // ranks)
    if opts.data is None:
        opts.data = str(ensure_default_dataset())
    elif opts.data != RANDOM:
        opts.data = str(Path(opts.data).resolve())   # the workers run in the repository root
    use_images_of(opts.data)
    torch_ver = None if opts.no_torch or not torch_available() else torch_version()
    use_torch = torch_ver is not None
    limits = isa_environment(opts.isa)
    if limits and "avx2" not in cpu_flags():
        print("--isa avx2 needs an x86-64 CPU with AVX2", file=sys.stderr)
        return 2
    os.environ.update(limits)   # every row, the GEMM limit and the time-to-accuracy runs inherit it

    machine = describe_machine(opts.cores, torch_ver, opts.no_torch)
    for line in machine_lines(machine):
        print(line, flush=True)
    if limits:
        print(f"vector code limited to AVX2 in every row (--isa avx2): "
              f"{', '.join(f'{name}={value!r}' for name, value in limits.items())}", flush=True)
    products = gemm.choose(opts.gemm)
    print(f"ddptrain's matrix products (--gemm {opts.gemm}): {products.description}", flush=True)
    per_sample = flops_per_sample(opts.model)
    data_note = ("random data of MNIST's shape" if opts.data == RANDOM
                 else f"real batches of {opts.data}")
    print(f"model {opts.model}, float32, {per_sample / 1e6:.2f} MFLOP per sample per step; "
          f"{data_note}; thread budget {budget}; {opts.rounds} rounds x {opts.repeats} "
          f"repetitions of {opts.samples:,} samples per row, after warmup", flush=True)
    header = {**machine, "isa": opts.isa, "isa_environment": limits,
              "gemm": {"asked": opts.gemm, "library": products.name,
                       "description": products.description},
              "model": opts.model, "flops_per_sample": per_sample, "data": opts.data,
              "batch_sizes": batches, "thread_budget": budget, "ranks": ranks,
              "threads_per_rank": per_rank,
              "rounds": opts.rounds, "repeats": opts.repeats, "samples": opts.samples}

    gemm_limit = GemmLimit(opts, budget, ranks, per_rank)
    rows = plan_rows(opts, products.name, use_torch, budget, ranks, per_rank)
    models = row_models(rows, opts.model)
    results = run_rounds(opts, rows, models, batches, gemm_limit)

    limit = gemm_limit.limit
    print(gemm_limit.summary_line(per_sample))
    add_figures(results, limit, models)
    print()
    print("\n".join(table(results, rows, batches)))
    print()
    print("\n".join(notes(results, batches, models, ranks, opts.bn_model)), flush=True)
    reads = measure_reads(opts, 512 if 512 in batches else batches[-1], ranks)
    print("\n".join(stream_lines(results, reads, batches, ranks, opts)), flush=True)

    tta = time_to_accuracy_runs(opts, ranks)
    recipe = recipe_runs(opts, ranks, use_torch)
    verdicts = mlp_verdicts(results, limit, per_sample, tta)
    print()
    print("\n".join(verdict_lines(mlp_title(opts.isa), verdicts, use_torch)))
    if not opts.no_cnn or recipe:
        cnn = (cnn_verdicts(results, batches, ranks, opts.cnn_model)
               + recipe_verdicts(recipe))
        print("\n".join(verdict_lines(CNN_TITLE, cnn, use_torch)))
        verdicts += cnn
    reproducible = reproducible_verdicts(results, batches, ranks)
    if reproducible:
        print("\n".join(verdict_lines(REPRODUCIBLE_TITLE, reproducible, True)))
        verdicts += reproducible
    streamed = stream_verdicts(results, reads)
    if streamed:
        print("\n".join(verdict_lines("targets of streamed shards:", streamed, True)))
        verdicts += streamed
    if opts.json:
        write_json(opts.json, header, gemm_limit, results, tta, verdicts, reads, recipe)
    return 0


def run_rounds(opts, rows, models, batches, gemm_limit):
    """Every row at every batch size, round after round, with the GEMM limit measured first in each;
    {(key, batch): {"label", "rates" (every repetition's samples/s), "runs" (each launch's
    result)}}."""
    results = {}
    for round_ in range(opts.rounds):
        gemm_limit.measure_round()
        for batch in batches:
            for key, label, kind, n, threads, extra in rows:
                if kind == "torch" and n > 1:
                    extra += ("--port", str(free_port()))
                if round_ > 0:   # the end-to-end timings once per batch size are enough
                    extra = tuple(e for e in extra if e != "--end-to-end")
                print(f"  round {round_ + 1}/{opts.rounds}, batch {batch}: {label.strip()} ...",
                      end="", flush=True)
                cnn_row = models[key] == opts.cnn_model
                steps = max(4, (opts.cnn_samples if cnn_row else opts.samples) // batch)
                # Fewer warmup steps for the CNN, whose steps take longer.
                warmup = 3 if opts.quick else max(20 if not cnn_row else 5,
                                                  4096 // batch // (1 + 3 * cnn_row))
                result = launch(kind, n, threads, batch, steps, warmup, opts.repeats, opts, extra)
                print(f" {statistics.median(result['rates']):,.0f} samples/s", flush=True)
                entry = results.setdefault((key, batch), {"label": label, "rates": [], "runs": []})
                entry["rates"] += result["rates"]
                entry["runs"].append(result)
    return results
