"""Flip one bit of a file, run ddptrain on the damaged copy, report; for each case of a list
(tests/test_fuzz.py).

    python tests/flip_and_run.py CASES.json

CASES.json: {"kind": "data" | "checkpoint", "pristine": PATH, "data": PATH,
"work": FOLDER, "cases": [[position, bit], ...]}. For every case this
prints a line "START i" before the run and, after it, one JSON line
{"case": i, "status": ..., "stderr": ..., "same": ...}: the exit status of
``ddptrain.cli.main``, what it wrote to stderr, and whether what it produced
equals what the pristine file gives (the trained parameters for a data file,
the evaluation for a checkpoint). The test that starts this program watches
the lines: a case without its result within its time limit is a hang.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

from ddptrain import cli
from ddptrain.run import checkpoint as ckpt_io


def run(argv):
    """``(status, stderr, stdout)`` of the command line ``argv``, run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = cli.main(argv)
        except SystemExit as exit_:
            status = exit_.code
    return status, err.getvalue(), out.getvalue()


def train(data, run_dir):
    """One epoch of one step on ``data``; the trained parameters (or None) and the run's status and
    stderr."""
    status, err, _ = run(["--data", data, "--model", "64-16-10", "--epochs", "1", "--batch-size",
                          "240", "--threads", "1", "--quiet", "--run-dir", run_dir])
    final = ckpt_io.step_checkpoints(Path(run_dir) / "checkpoints")
    params = None if status or not final else {n: a.tolist() for n,
                                               a in ckpt_io.load(final[0]).params.items()}
    return status, err, params


def evaluate(checkpoint, data):
    status, err, out = run(["evaluate", checkpoint, "--data", data])
    return status, err, out if status == 0 else None


def main(spec_path):
    spec = json.loads(Path(spec_path).read_text())
    pristine, work = Path(spec["pristine"]), Path(spec["work"])
    original = pristine.read_bytes()
    if spec["kind"] == "data":
        reference = train(str(pristine), str(work / "reference"))[2]
    else:
        reference = evaluate(str(pristine), spec["data"])[2]
    for i, (position, bit) in enumerate(spec["cases"]):
        damaged = bytearray(original)
        damaged[position] ^= 1 << bit
        # a new file each time: nothing is cached by path
        path = work / f"case-{i}{pristine.suffix}"
        path.write_bytes(damaged)
        print(f"START {i}", flush=True)
        if spec["kind"] == "data":
            status, err, result = train(str(path), str(work / f"run-{i}"))
        else:
            status, err, result = evaluate(str(path), spec["data"])
        print(json.dumps({"case": i, "status": status, "stderr": err, "same": result == reference}),
              flush=True)
        path.unlink()


if __name__ == "__main__":
    main(sys.argv[1])
