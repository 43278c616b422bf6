"""Whether P ranks train what one process trains: the comparison behind ``ddptrain verify``, and
``ddptrain.verify`` for a model built in Python.

Each run trains the same ``--max-steps`` steps with ``--record-hashes``: its
folder then holds a sha256 of the parameters and buffers after every step
(``hashes.jsonl``) and its final checkpoint. A run on P ranks is compared with
the one-process run by both: the first step whose hash differs (none: bitwise
equal at every step), and the largest absolute difference of the final
parameters and buffers, which is what ``--tolerance`` bounds when the run is
not ``--reproducible``.

``ddptrain verify`` (``verify_command``) launches the runs as processes, through
mpiexec; ``verify`` here runs them in this process, P ranks as threads
(``simulate_ranks``), since a model object cannot be sent to mpiexec's ranks.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ddptrain.api import checked_arguments, train
from ddptrain.data.sampler import check_world
from ddptrain.distributed.launcher import launched_by_mpi
from ddptrain.errors import UserError
from ddptrain.files import open_regular
from ddptrain.nn.model import Sequential
from ddptrain.run import checkpoint as ckpt_io

# The largest difference of the final parameters that passes without --reproducible, by dtype: a
# few hundred roundings of a float32 (eps 1.2e-7) and of a float64 (eps 2.2e-16) away.
DEFAULT_TOLERANCE = {"float32": 1e-4, "float64": 1e-10}
# The options a verification sets itself in every run, which its caller may not give.
OWN_OPTIONS = ("run_dir", "max_steps", "record_hashes", "simulate_ranks", "resume")


@dataclass(frozen=True)
class Comparison:
    """A run on ``ranks`` ranks against the one-process run."""

    ranks: int
    steps: int                         # the steps this run recorded
    first_difference: Optional[int]    # the first step whose hash differs; None: none does
    max_difference: float              # of the final parameters and buffers, absolute
    within_tolerance: bool

    @property
    def bitwise_equal(self):
        return self.first_difference is None

    def line(self, tolerance):
        who = f"{self.ranks} rank{'s' if self.ranks > 1 else ''}"
        if self.bitwise_equal:
            return f"{who}: bitwise equal to one process at every step ({self.steps} steps)"
        within = "within" if self.within_tolerance else "NOT within"
        return (f"{who}: first differs from one process at step {self.first_difference}; largest "
                f"difference of the final parameters {self.max_difference:.3g} ({within} "
                f"--tolerance {tolerance:g})")


@dataclass(frozen=True)
class Verification:
    """What ``verify`` found: a ``Comparison`` per rank count other than 1."""

    comparisons: tuple
    steps: int                 # the steps of the one-process run
    tolerance: float
    reproducible: bool         # the runs were --reproducible: only bitwise equality passes

    @property
    def ok(self):
        """Every rank count bitwise equal (``reproducible``), or within the tolerance."""
        return all(c.bitwise_equal if self.reproducible else c.within_tolerance
                   for c in self.comparisons)

    def __getitem__(self, ranks):
        """The comparison of ``ranks`` ranks."""
        for comparison in self.comparisons:
            if comparison.ranks == ranks:
                return comparison
        raise KeyError(ranks)

    def lines(self):
        lines = [c.line(self.tolerance) for c in self.comparisons]
        if self.reproducible:
            verdict = ("every rank count gives the bits of one process" if self.ok else
                       "--reproducible, and some rank count does not give the bits of one process")
        else:
            verdict = (f"every rank count within --tolerance {self.tolerance:g} of one process"
                       if self.ok else f"some rank count beyond --tolerance {self.tolerance:g}")
        return lines + [f"verify: {'OK' if self.ok else 'FAILED'}: {verdict}"]


# ---------------------------------------------------------------- checking what is asked


def check_rank_counts(ranks, batch_size, virtual_shards):
    """``ranks`` (integers) as a sorted tuple without repeats; a UserError naming the first that
    cannot be run (below 1, or not sharing the data's virtual shards and the batch)."""
    counts = []
    for count in ranks:
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)):
            raise UserError(f"--ranks: {count!r} is not a number of ranks")
        if count < 1:
            raise UserError(f"--ranks: {count} is not a number of ranks (at least 1)")
        try:
            check_world(batch_size, int(count), virtual_shards)
        except UserError as problem:
            raise UserError(f"--ranks {count}: {problem}") from None
        counts.append(int(count))
    if not counts:
        raise UserError("--ranks: no rank count given")
    return tuple(sorted(set(counts)))


def parse_ranks(text):
    """``"1,2,4"`` as ``(1, 2, 4)``; a UserError for anything else."""
    counts = []
    for word in text.split(","):
        if not word.strip().isdigit():
            raise UserError(f"--ranks must be numbers of ranks separated by commas (1,2,4), got "
                            f"{text!r}")
        counts.append(int(word))
    return counts


def check_steps(steps):
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise UserError(f"--steps must be a positive integer, got {steps!r}")
    return int(steps)


def check_tolerance(tolerance, dtype):
    """``tolerance``, or the dtype's default when it is None; a UserError unless a finite number
    not below 0."""
    if tolerance is None:
        return DEFAULT_TOLERANCE[dtype]
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) \
            or not math.isfinite(tolerance) or tolerance < 0:
        raise UserError(f"--tolerance must be a finite number not below 0, got {tolerance!r}")
    return float(tolerance)


# ---------------------------------------------------------------- comparing two run folders


def read_hashes(run_dir):
    """The sha256 after each step of a run made with --record-hashes, in step order."""
    path = Path(run_dir) / "hashes.jsonl"
    if not path.exists():
        raise UserError(f"{path}: missing: the run recorded no hashes (--record-hashes)")
    with open_regular(path, "hashes file") as f:
        records = [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
    return [record["sha256"] for record in sorted(records, key=lambda r: r["step"])]


def final_arrays(run_dir):
    """The parameters and buffers of a run's newest checkpoint, by name."""
    found = ckpt_io.newest_valid(Path(run_dir) / "checkpoints", warn=lambda message: None)
    if found is None:
        raise UserError(f"{run_dir}: no checkpoint: the run did not finish")
    return {**{f"params/{k}": v for k, v in found.params.items()},
            **{f"buffers/{k}": v for k, v in found.buffers.items()}}


def compare(reference_dir, run_dir, ranks, tolerance):
    """The run in ``run_dir`` (on ``ranks`` ranks) against the one-process run in
    ``reference_dir``."""
    mine, theirs = read_hashes(run_dir), read_hashes(reference_dir)
    first = next((step for step, (a, b) in enumerate(zip(mine, theirs), start=1) if a != b), None)
    if first is None and len(mine) != len(theirs):   # one run stopped before the other
        first = min(len(mine), len(theirs)) + 1
    ours, reference = final_arrays(run_dir), final_arrays(reference_dir)
    largest = max((float(np.max(np.abs(ours[name].astype(np.float64)
                                       - reference[name].astype(np.float64)), initial=0.0))
                   for name in reference), default=0.0)
    within = first is None or largest <= tolerance   # NaN is never within
    return Comparison(ranks, len(mine), first, largest, bool(within))


def run_settings(run_dir):
    """``(dtype, reproducible)`` of the run in ``run_dir``, from its config.json."""
    with open_regular(Path(run_dir) / "config.json", "configuration") as f:
        config = json.loads(f.read())
    return config["dtype"], bool(config["reproducible"])


def compare_runs(folders, tolerance=None):
    """``Verification`` of the run folders ``{ranks: folder}``, which hold a one-process run
    (``folders[1]``); ``tolerance`` None: ``DEFAULT_TOLERANCE`` of the runs' dtype."""
    dtype, reproducible = run_settings(folders[1])
    tolerance = check_tolerance(tolerance, dtype)
    comparisons = tuple(compare(folders[1], folder, ranks, tolerance)
                        for ranks, folder in sorted(folders.items()) if ranks != 1)
    return Verification(comparisons, len(read_hashes(folders[1])), tolerance, reproducible)


# ---------------------------------------------------------------- ddptrain.verify


def verify(model=None, data=None, *, ranks=(1, 2, 4), steps=10, tolerance=None, quiet=True,
           **options):
    """Train ``steps`` steps of ``model`` on ``data`` in one process and on each rank count of
    ``ranks`` (as threads of this process: ``simulate_ranks``), and compare: returns a
    ``Verification`` (``.ok``, and per rank count ``result[P]``: ``bitwise_equal``,
    ``first_difference``, ``max_difference``, ``within_tolerance``).

    ``model``, ``data`` and ``options`` as ``ddptrain.train`` takes them
    (``reproducible=True``: only bitwise equality passes); the model is not
    trained (each run trains a copy). ``tolerance``: the largest absolute
    difference of the final parameters that passes without ``reproducible``
    (None: 1e-4 in float32, 1e-10 in float64). ``quiet``: the runs print
    nothing. A layer of your own that breaks the promise shows here, with the
    step at which it did.
    """
    if launched_by_mpi():
        raise UserError("ddptrain.verify runs the ranks as threads of one process: call it without "
                        "mpirun/srun")
    given = sorted(set(options) & set(OWN_OPTIONS))
    if given:
        raise UserError(f"ddptrain.verify sets {given[0]} itself in each run: leave it out")
    steps = check_steps(steps)
    config, _, _ = checked_arguments(model, data, {**options, "max_steps": steps})   # every option
    counts = check_rank_counts(ranks, config.batch_size, config.virtual_shards)
    if tolerance is not None:
        check_tolerance(tolerance, config.dtype)
    with tempfile.TemporaryDirectory(prefix="ddptrain-verify-") as work:
        folders = {}
        for count in sorted({1, *counts}):
            folders[count] = Path(work) / f"ranks-{count}"
            copy = model.replica() if isinstance(model, Sequential) else model
            with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
                train(copy, data, quiet=quiet, run_dir=str(folders[count]), max_steps=steps,
                      record_hashes=True, simulate_ranks=count if count > 1 else 0, **options)
        return compare_runs(folders, tolerance)
