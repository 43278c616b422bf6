"""The notes under the table: the code each side ran, the exchanges compared, the step profiles,
and loading, evaluating and checkpointing against an epoch."""

from __future__ import annotations

import statistics

from .workload import flops_per_sample


def notes(results, batches, row_models, ranks, bn_model):
    """The lines under the table. ``row_models``: each row's model."""
    def runs(key):
        return [run for batch in batches for run in results.get((key, batch), {}).get("runs", [])]

    lines = []
    codes = {run["vector_code"] for key in ("ddp1", "ddpP") for run in runs(key)
             if "vector_code" in run}
    torch_codes = {run["vector_code"] for key in ("torch1", "torchP") for run in runs(key)
                   if "vector_code" in run}
    if codes:
        lines.append(f"vector code the rows ran: ddptrain: {'; '.join(sorted(codes))}"
                     + (f"; PyTorch: {'; '.join(sorted(torch_codes))}" if torch_codes else ""))
    if runs("ddp1"):
        first = runs("ddp1")[0]
        lines.append(f"ddptrain, 1 process: {first['thread_line']}; {first['blas']}")
    cnn_threads = [run["thread_line"] for run in runs("cnn1")[:1]]
    if cnn_threads and cnn_threads != [run["thread_line"] for run in runs("ddp1")[:1]]:
        lines.append(f"ddptrain CNN, 1 process: {cnn_threads[0]}")   # its threads on the rows
    if runs("ddpP"):
        first = runs("ddpP")[0]
        lines.append(f"ddptrain, {ranks} ranks: {' '.join(first['library'].split())}; "
                     f"{first['thread_line']}")
        alone = [run["allreduce_alone_ms"] for run in runs("ddpP") if "allreduce_alone_ms" in run]
        if alone:
            lines.append(f"  the Allreduce of the whole gradient ({first['n_params']:,} float32, "
                         f"{4 * first['n_params'] / 1e6:.1f} MB) on its own: "
                         f"{statistics.median(alone):.2f} ms")
    alone = [run["allreduce_alone_ms"] for run in runs("torchP") if "allreduce_alone_ms" in run]
    if alone:
        lines.append(f"  gloo's all_reduce of the same gradient on its own: "
                     f"{statistics.median(alone):.2f} ms (DDP overlaps it with the backward, so no "
                     f"share of the step is shown)")
    lines += batchnorm_notes(results, batches, ranks, bn_model)
    lines += exchange_notes(results, batches, ranks)
    if runs("hosts"):
        first = runs("hosts")[0]
        alone = [run["allreduce_alone_ms"] for run in runs("hosts") if "allreduce_alone_ms" in run]
        lines.append(f"2 hosts x 1 rank: {first['hosts']}, network namespaces of this machine "
                     f"joined by veth pairs and a bridge (scripts/fake-hosts.sh); the gradient "
                     f"goes over TCP between them"
                     + (f"; its Allreduce on its own: {statistics.median(alone):.2f} ms" if alone
                        else ""))
    lines += overlap_notes(results, batches, ranks)
    cnn_key = next((key for key in ("cnn1", "cnnP") if results.get((key, batches[0]))), None)
    if cnn_key:
        first = results[(cnn_key, batches[0])]["runs"][0]
        mflop = flops_per_sample(row_models[cnn_key]) / 1e6
        lines.append(f"the CNN rows train {row_models[cnn_key]}: {first['n_params']:,} "
                     f"parameters, {mflop:.2f} MFLOP per sample per training step; its "
                     f"convolutions' work arrays (im2col blocks) are in the peak RSS")
    lines += [("'allreduce': time inside comm.allreduce_, or the shared-memory exchange (waiting "
               "for the slower rank included) / step time."),
              "'of GEMM limit': samples/s x FLOPs per sample / the machine limit above.",
              ("'peak RSS/rank': ru_maxrss, the largest over ranks and launches (the rank's shard "
               "included: uint8 pixels from a file).")]
    lines += profile_notes(results, batches, ranks, bn_model)
    lines += end_to_end_notes(results, batches, ranks)
    return lines


def batchnorm_notes(results, batches, ranks, bn_model):
    lines = []
    for batch in batches:
        entry = results.get(("ddpPbn", batch))
        if entry:
            shares = [f for run in entry["runs"]
                      for f in run.get("batchnorm_allreduce_fraction", [])]
            lines.append(f"batch normalisation, {ranks} ranks, batch {batch}: the BatchNorm "
                         f"layers' own Allreduces (statistics in the forward, two sums in the "
                         f"backward, each layer) take {100 * statistics.median(shares):.1f}% of a "
                         f"step; 'allreduce' is the gradient's")
    if results.get(("ddpPbn", batches[0])):
        lines.append(f"the BN rows train {bn_model} (its 'of GEMM limit' counts its matrix "
                     f"products only); PyTorch's SyncBatchNorm refuses CPU modules under DDP "
                     f"('SyncBatchNorm layers only work with GPU modules'), so its row uses "
                     f"BatchNorm1d: each rank's own statistics, as ddptrain's local rows")
    return lines


def exchange_notes(results, batches, ranks):
    """Each way of exchanging the gradient against --exchange allreduce (unsharded, through MPI)."""
    variants = (("ddpP", "gradient exchange through shared memory (the default)",
                 f"each rank updates 1/{ranks} of the shared parameters"),
                ("ddpPz", "--shard-optimizer (ZeRO-1 through MPI)",
                 "reduce-scatter and allgather in place of one Allreduce"))
    lines = []
    for key, what, how in variants:
        for batch in batches:
            variant, plain = results.get((key, batch)), results.get(("ddpPa", batch))
            if variant and plain:
                mib = [max(run["optimizer_bytes"]) / 2 ** 20
                       for run in (variant["runs"][0], plain["runs"][0])]
                ratio = statistics.median(variant["rates"]) / statistics.median(plain["rates"])
                lines.append(f"{what}, {ranks} ranks, batch {batch}: {ratio:.2f}x the step rate of "
                             f"--exchange allreduce; momentum buffer {mib[0]:.2f} MiB per rank "
                             f"against {mib[1]:.2f} MiB ({how})")
    return lines


def overlap_notes(results, batches, ranks):
    """--overlap-allreduce against one Allreduce after the backward, on one host and across two."""
    lines = []
    for batch in batches:
        for plain, overlapped, where in (("ddpP", "ddpPo", f"{ranks} ranks on one host"),
                                         ("hosts", "hostso", "2 hosts x 1 rank")):
            a, b = results.get((plain, batch)), results.get((overlapped, batch))
            if a and b:
                ratio = statistics.median(b["rates"]) / statistics.median(a["rates"])
                lines.append(f"--overlap-allreduce, {where}, batch {batch}: {ratio:.2f}x the step "
                             f"rate of one Allreduce after backward")
    return lines


def profile_notes(results, batches, ranks, bn_model):
    """Where a step's time goes (rank 0's laps), for the rows that profile their step."""
    lines = []
    for batch in batches:
        for key, label in (("ddp1", "1 process"), ("ddpP", f"{ranks} ranks"),
                           ("ddpPbn", f"{ranks} ranks, {bn_model}, BN global statistics"),
                           ("cnn1", "CNN, 1 process"), ("cnnP", f"CNN, {ranks} ranks")):
            entry = results.get((key, batch))
            profile = entry and entry["runs"][0].get("profile_ms")
            if profile:
                total = sum(profile.values())
                parts = ", ".join(f"{name} {ms:.2f} ({100 * ms / total:.0f}%)"
                                  for name, ms in sorted(profile.items(), key=lambda item: -item[1])
                                  if ms >= 0.005)
                lines.append(f"step of ddptrain, {label}, batch {batch} (rank 0, ms): {parts}")
    return lines


def end_to_end_notes(results, batches, ranks):
    """Loading, evaluating and checkpointing, each against the time of one epoch of training."""
    lines = []
    for batch in batches:
        entry = results.get(("ddpP", batch))
        run = entry["runs"][0] if entry else {}
        if run.get("eval_seconds") is not None:
            epoch = run["n_train"] / entry["summary"]["median"]
            load, evaluate, save = (run["load_seconds"], run["eval_seconds"],
                                    run["checkpoint_seconds"])
            lines.append(
                f"end to end, {ranks} ranks, batch {batch}: one epoch of training takes "
                f"{epoch:.2f} s; {run['load_what']} {load:.3f} s ({100 * load / epoch:.1f}% of an "
                f"epoch, once per run); each epoch, evaluating the test set {evaluate:.3f} s "
                f"({100 * evaluate / epoch:.1f}%) and writing a checkpoint (step and best) "
                f"{save:.3f} s ({100 * save / epoch:.1f}%)")
    return lines
