"""Which rows the benchmark runs, ddptrain's and PyTorch's for the options and what is installed."""

from __future__ import annotations

import atexit
import os
from typing import NamedTuple

from .launching import fake_hosts


class Row(NamedTuple):
    key: str          # its name in the results and the JSON: "ddp1", "ddpP", "torch1", ...
    label: str        # its line in the table
    worker: str       # "ddptrain" or "torch"
    processes: int
    threads: int      # per process; 0: ddptrain.threads.configure_blas_threads chooses, as in a run
    extra: tuple      # further worker arguments ("--model SPEC", "--hosts", ...)


def plan_rows(opts, gemm_name, use_torch, budget, ranks, per_rank):
    """The rows, in the order they run and are shown. ``gemm_name``: the library of ddptrain's
    products. Brings the fake hosts up for the rows across hosts (down again at exit)."""
    # ddptrain's rows pass 0 threads unless --threads is given: ddptrain chooses, as in a run.
    each = per_rank if opts.threads else 0
    one, threads = opts.threads, f"{per_rank} thread"
    rows = [Row("ddp1", f"ddptrain, 1 process x {budget} threads", "ddptrain", 1, one, ()),
            Row("ddpP", f"ddptrain, {ranks} MPI ranks x {threads}", "ddptrain", ranks, each,
                ("--end-to-end",)),
            Row("ddpP0", "  same ranks, no allreduce (diagnostic)", "ddptrain", ranks, each,
                ("--no-allreduce",)),
            Row("ddpPa", "  same ranks, --exchange allreduce", "ddptrain", ranks, each,
                ("--exchange", "allreduce")),
            Row("ddpPz", "  same ranks, --shard-optimizer", "ddptrain", ranks, each,
                ("--shard-optimizer",))]
    if gemm_name == "mkl":   # what numpy's own BLAS gives on this CPU
        rows[1:1] = [Row("ddp1n", "  same process, --gemm numpy", "ddptrain", 1, one,
                         ("--gemm", "numpy"))]
        rows.insert(3, Row("ddpPn", "  same ranks, --gemm numpy", "ddptrain", ranks, each,
                           ("--gemm", "numpy")))
    if not opts.no_reproducible:   # its cost: ratios to the default's rows (targets.py)
        _insert_after(rows, "ddp1", Row("ddp1r", "  same process, --reproducible", "ddptrain", 1,
                                        one, ("--reproducible",)))
        _insert_after(rows, "ddpP", Row("ddpPr", "  same ranks, --reproducible", "ddptrain", ranks,
                                        each, ("--reproducible",)))
    if use_torch:
        rows += [Row("torch1", f"PyTorch, 1 process x {budget} threads", "torch", 1, budget, ()),
                 Row("torchP", f"PyTorch DDP gloo, {ranks} x {threads}", "torch", ranks, per_rank,
                     ())]
    if not opts.no_bn and ranks > 1:
        bn = ("--model", opts.bn_model)
        rows += [Row("ddpPbn", f"ddptrain, {ranks} ranks, BN global statistics", "ddptrain", ranks,
                     each, bn),
                 Row("ddpPbnl", f"ddptrain, {ranks} ranks, BN local statistics", "ddptrain", ranks,
                     each, (*bn, "--batchnorm", "local"))]
        if use_torch:
            rows.append(Row("torchPbn", f"PyTorch DDP gloo, {ranks} x {per_rank}, BatchNorm1d",
                            "torch", ranks, per_rank, bn))
    if not opts.no_cnn:
        cnn = ("--model", opts.cnn_model)
        rows += [Row("cnn1", f"ddptrain CNN, 1 process x {budget} threads", "ddptrain", 1, one,
                     cnn),
                 Row("cnnP", f"ddptrain CNN, {ranks} MPI ranks x {threads}", "ddptrain", ranks,
                     each, cnn)]
        if not opts.no_reproducible:
            rows += [Row("cnn1r", "  same CNN process, --reproducible", "ddptrain", 1, one,
                         (*cnn, "--reproducible")),
                     Row("cnnPr", "  same CNN ranks, --reproducible", "ddptrain", ranks, each,
                         (*cnn, "--reproducible"))]
        if use_torch:
            rows += [Row("tcnn1", f"PyTorch CNN, 1 process x {budget} threads", "torch", 1, budget,
                         cnn),
                     Row("tcnnP", f"PyTorch CNN, DDP gloo, {ranks} x {threads}", "torch", ranks,
                         per_rank, cnn)]
    if ranks > 1:
        rows.append(Row("ddpPo", "  same ranks, --overlap-allreduce", "ddptrain", ranks, each,
                        ("--overlap-allreduce",)))
    if ranks > 1 and not opts.no_stream and opts.data != "random":
        # its twin in memory runs in the same launch, a repetition after each (ddptrain_rows)
        rows.append(Row("ddpPs", f"  same ranks, streamed: --data-memory {opts.stream_memory}",
                        "ddptrain", ranks, each, ("--stream", opts.stream_memory)))
    hosts_up = not opts.no_hosts and os.geteuid() == 0 and fake_hosts("up")
    if hosts_up:
        # One rank on each of 2 hosts that share this machine's cores: each gets half of them, as
        # 2 ranks of one host would, so that the rows differ only in where the gradient goes (TCP
        # between hosts).
        rows += [Row("hosts", f"ddptrain, 2 hosts x 1 rank x {threads}", "ddptrain", 2, per_rank,
                     ("--hosts",)),
                 Row("hostso", "  same hosts, --overlap-allreduce", "ddptrain", 2, per_rank,
                     ("--hosts", "--overlap-allreduce"))]
        atexit.register(fake_hosts, "down")   # also when a row fails
    elif not opts.no_hosts:
        print("rows across 2 hosts: skipped (fake hosts need root and `ip`: scripts/fake-hosts.sh)",
              flush=True)
    return rows


def _insert_after(rows, key, row):
    rows.insert(next(i for i, r in enumerate(rows) if r.key == key) + 1, row)


def row_models(rows, default_model):
    """Each row's model: its ``--model`` argument, else ``default_model``."""
    return {row.key: dict(zip(row.extra[::2], row.extra[1::2])).get("--model", default_model)
            for row in rows}
