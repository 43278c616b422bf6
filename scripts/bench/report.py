"""The table of rows (one line per row and batch size), from the measurements of every launch.

``add_figures`` first puts each row's derived figures (its summary, its ratio
to the PyTorch row it compares with, its share of the GEMM limit) beside its
rates, where the table, the notes (notes.py), the verdicts (targets.py) and
the JSON output all read them.
"""

from __future__ import annotations

import statistics

from .workload import flops_per_sample

# The PyTorch row each ddptrain row is compared with in the table's 'vs PyTorch' column.
PYTORCH_PARTNER = {"ddp1": "torch1", "ddp1n": "torch1", "ddpP": "torchP", "ddpPn": "torchP",
                   "ddpPbn": "torchPbn", "ddpPbnl": "torchPbn", "cnn1": "tcnn1", "cnnP": "tcnnP"}
# The rows whose 'allreduce' column shows the gradient exchange's share of a step.
ALLREDUCE_SHOWN = ("ddpP", "ddpPa", "ddpPbn", "ddpPbnl", "cnnP", "hosts")


def summarise(rates):
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "all": rates}


def median_rate(results, key, batch):
    """The median samples/s of a row at a batch size, or None where the row did not run."""
    entry = results.get((key, batch))
    return statistics.median(entry["rates"]) if entry else None


def add_figures(results, limit, row_models):
    """Add to each row's entry its "summary" of the rates, its "model" and the "flops_per_sample"
    of one training step, "vs_pytorch" (the ratio of its median to its PyTorch partner's, or None)
    and "of_gemm_limit" (samples/s x FLOPs per sample / the limit)."""
    flops = {key: flops_per_sample(spec) for key, spec in row_models.items()}
    for (key, batch), entry in results.items():
        entry["summary"] = summarise(entry["rates"])
        entry["model"], entry["flops_per_sample"] = row_models[key], flops[key]
        partner = PYTORCH_PARTNER.get(key)
        theirs = median_rate(results, partner, batch)
        ratio = entry["summary"]["median"] / theirs if theirs else None
        entry["vs_pytorch"] = {"row": f"{partner}@{batch}", "ratio": ratio} if theirs else None
        entry["of_gemm_limit"] = entry["summary"]["median"] * flops[key] / limit


def fmt_rate(summary):
    return f"{summary['median']:>9,.0f} ({summary['min']:,.0f}-{summary['max']:,.0f})"


def table(results, rows, batches):
    """One line per row and batch size, from the entries ``add_figures`` completed."""
    header = (f"{'global batch':>12}  {'':<38} {'samples/s: median (min-max)':>29}  "
              f"{'vs PyTorch':>10}  {'allreduce':>9}  {'of GEMM limit':>13}  {'peak RSS/rank':>13}")
    lines = [header, "-" * len(header)]
    for batch in batches:
        for key, label, *_ in rows:
            entry = results.get((key, batch))
            if entry is None:
                continue
            ratio = f"{entry['vs_pytorch']['ratio']:.2f}x" if entry["vs_pytorch"] else ""
            fractions = [f for run in entry["runs"] for f in run.get("allreduce_fraction", [])]
            shown = fractions and key in ALLREDUCE_SHOWN
            allreduce = f"{100 * statistics.median(fractions):.0f}%" if shown else ""
            rss = max(max(run["max_rss_mib"]) for run in entry["runs"])
            of_limit = 100 * entry["of_gemm_limit"]
            lines.append(f"{batch:>12}  {label:<38} {fmt_rate(entry['summary']):>29}  {ratio:>10}  "
                         f"{allreduce:>9}  {of_limit:>12.0f}%  {rss:>9,.0f} MiB")
        lines.append("")
    return lines
