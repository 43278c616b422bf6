"""The machine's GEMM limit: GFLOP/s of one training step's matrix products at a large batch.

Measured in one process with every thread, and in P single-thread processes
running at the same time; the larger is the machine's limit. It is measured in
every round, like the rows, so that both see the machine in the same state;
the report uses the median over the rounds.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np

from .ddptrain_internals import MPIComm, products_backend, rank_and_size
from .environment import blas_description
from .launching import launch
from .workload import flops_per_sample, layer_sizes


def worker_gemm(args):
    """GFLOP/s of one step's matrix products at a large batch, with ``threads_per_rank`` BLAS
    threads."""
    from threadpoolctl import threadpool_limits

    backend = products_backend(args.gemm)   # the library ddptrain's rows multiply with
    threadpool_limits(limits=args.threads_per_rank, user_api="blas")
    rank, size = rank_and_size()
    comm = MPIComm() if size > 1 else None
    rng = np.random.default_rng(rank)
    batch, sizes = args.batch, layer_sizes(args.model)
    products = []   # (a, b, out): every product of a training step, as train_step computes them
    for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        x = rng.random((batch, n_in), dtype=np.float32)
        w = rng.random((n_in, n_out), dtype=np.float32)
        dout = rng.random((batch, n_out), dtype=np.float32)
        products.append((x, w, np.empty((batch, n_out), np.float32)))          # forward
        products.append((x.T, dout, np.empty((n_in, n_out), np.float32)))     # weight gradient
        if k > 0:
            products.append((dout, w.T, np.empty((batch, n_in), np.float32)))  # input gradient

    def one_step():
        for a, b, out in products:
            backend.matmul(a, b, out=out)

    for _ in range(3):
        one_step()
    flops = flops_per_sample(args.model) * batch
    rates = []
    for _ in range(args.repeats):
        if comm is not None:
            comm.barrier()
        began = time.perf_counter()
        for _ in range(args.steps):
            one_step()
        rates.append(flops * args.steps / (time.perf_counter() - began))
    rate = statistics.median(rates)
    total = comm.allreduce(rate) if comm is not None else rate   # P processes at once: their sum
    if rank == 0:
        result = {"flops": total, "per_process": rate, "blas": blas_description(backend)}
        Path(args.out).write_text(json.dumps(result))


class GemmLimit:
    """The GEMM limit's measurements, round by round, and their medians."""

    def __init__(self, opts, budget, ranks, per_rank):
        self.opts, self.budget, self.ranks, self.per_rank = opts, budget, ranks, per_rank
        self.batch, self.steps, self.repeats = (256, 2, 3) if opts.quick else (4096, 6, 5)
        self.rounds = []

    def measure_round(self):
        """One round: every thread in one process, one core alone, and the ranks' processes at
        once."""
        def measure(processes, threads):
            return launch("gemm", processes, threads, self.batch, self.steps, 0, self.repeats,
                          self.opts)
        all_threads, one_core = measure(1, self.budget), measure(1, 1)
        at_once = measure(self.ranks, self.per_rank) if self.ranks > 1 else all_threads
        self.rounds.append({"all_threads": all_threads, "one_core": one_core, "ranks": at_once,
                            "limit": max(all_threads["flops"], at_once["flops"])})
        print(f"  GEMM limit: {all_threads['flops'] / 1e9:.0f} GFLOP/s in 1 process x "
              f"{self.budget} threads, {at_once['flops'] / 1e9:.0f} in {self.ranks} processes x "
              f"{self.per_rank} thread at once, {one_core['flops'] / 1e9:.0f} on one core alone",
              flush=True)

    def median(self, key):
        """The median over the rounds of one measurement's FLOP/s ("all_threads", "one_core",
        "ranks"), or of the limit ("limit")."""
        return statistics.median([r[key]["flops"] if key != "limit" else r["limit"]
                                  for r in self.rounds])

    @property
    def limit(self):
        """The machine's limit in FLOP/s: what the table's 'of GEMM limit' divides by."""
        return self.median("limit")

    def summary_line(self, per_sample):
        """The line under the rounds: the medians, and the limit in samples/s of the main model."""
        limit, one_core = self.limit, self.median("one_core")
        blas = self.rounds[0]["all_threads"]["blas"].rsplit(",", 1)[0]
        return (f"\nGEMM limit ({blas}; the step's products at batch {self.batch}; median of "
                f"{len(self.rounds)} rounds): {self.median('all_threads') / 1e9:.0f} GFLOP/s "
                f"in 1 process x {self.budget} threads, {self.median('ranks') / 1e9:.0f} in "
                f"{self.ranks} processes x {self.per_rank} thread at once, {one_core / 1e9:.0f} on "
                f"one core alone; "
                f"machine limit {limit / 1e9:.0f} GFLOP/s = {limit / per_sample:,.0f} samples/s "
                f"({one_core / per_sample:,.0f} on one core)")

    def as_json(self):
        return {"rounds": self.rounds, "limit_flops": self.limit}
