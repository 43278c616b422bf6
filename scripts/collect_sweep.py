#!/usr/bin/env python3
"""Collect the results of a sweep (or any set of ddptrain run folders) into one table.

    python3 scripts/collect_sweep.py --job 1234            the runs of array job 1234:
                                                           runs/slurm-1234_*
    python3 scripts/collect_sweep.py runs/slurm-1234_*     the same, by folder
    python3 scripts/collect_sweep.py --job 1234 --csv sweep.csv

Each run folder holds config.json and metrics.jsonl (one JSON object per
finished epoch); the table has one row per run, sorted by learning rate, with
the last epoch's losses and accuracies and the best test accuracy; the
finished run with the best final test accuracy is marked with '*'. Runs that
have not finished all their epochs say so. Exit status: 0 if every run
finished, 1 if some did not, 2 if there was no run folder. Needs only the
standard library.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

COLUMNS = ("run", "lr", "epochs", "train_loss", "test_loss", "test_accuracy", "best_test_accuracy",
           "seconds", "status")


def read_run(folder):
    """One table row (a dict) for a run folder."""
    folder = Path(folder)
    row = {"run": folder.name}
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        return {**row, "status": f"no config.json ({type(error).__name__})"}
    records = []
    try:
        lines = (folder / "metrics.jsonl").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pass        # a line cut short by a kill: the epochs before it still count
    # after a resume, the last record of an epoch wins
    by_epoch = {r["epoch"]: r for r in records if "epoch" in r}
    row.update(lr=config.get("lr"), epochs=f"{len(by_epoch)}/{config.get('epochs')}")
    if not by_epoch:
        return {**row, "status": "no finished epoch"}
    last = by_epoch[max(by_epoch)]
    row.update(train_loss=last.get("train_loss"), test_loss=last.get("test_loss"),
               test_accuracy=last.get("test_accuracy"),
               best_test_accuracy=max(r.get("test_accuracy", 0.0) for r in by_epoch.values()),
               seconds=sum(r.get("seconds", 0.0) for r in by_epoch.values()))
    row["status"] = "finished" if max(by_epoch) >= config.get("epochs", 0) else "incomplete"
    return row


def collect(folders):
    """The rows of ``folders``, sorted by learning rate (then name)."""
    rows = [read_run(f) for f in folders]
    return sorted(rows, key=lambda r: (r.get("lr") is None, r.get("lr") or 0.0, _natural(r["run"])))


def _natural(name):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _cell(value, column):
    if value is None:
        return ""
    if column in ("test_accuracy", "best_test_accuracy"):
        return f"{100 * value:.2f}%"
    if column in ("train_loss", "test_loss"):
        return f"{value:.4f}"
    if column == "seconds":
        return f"{value:.1f}"
    if column == "lr":
        return f"{value:g}"
    return str(value)


def format_table(rows):
    """A Markdown table; the finished run with the best final test accuracy is marked '*'."""
    scored = ([r for r in rows if r.get("status") == "finished"]
              or [r for r in rows if r.get("test_accuracy") is not None])
    best = max(scored, key=lambda r: r["test_accuracy"]) if scored else None
    cells = [[_cell(r.get(c), c) + (" *" if c == "run" and r is best else "") for c in COLUMNS]
             for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", metavar="RUN_DIR", help="run folders")
    parser.add_argument("--job", metavar="ID", help="the array job's id: collects RUNS/slurm-ID_*")
    parser.add_argument("--runs", default="runs", metavar="DIR",
                        help="where the run folders are (default: runs)")
    parser.add_argument("--csv", metavar="PATH", help="also write the table as CSV")
    args = parser.parse_args(argv)

    folders = [Path(f) for f in args.folders]
    if args.job:
        folders += sorted(Path(args.runs).glob(f"slurm-{args.job}_*"),
                          key=lambda p: _natural(p.name))
    folders = [f for f in folders if f.is_dir()]
    if not folders:
        where = (f" for job {args.job} in {args.runs}/" if args.job
                 else " (give RUN_DIRs or --job ID)")
        print(f"collect_sweep: no run folders found{where}", file=sys.stderr)
        return 2
    rows = collect(folders)
    print(format_table(rows))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    return 0 if all(r.get("status") == "finished" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
