"""Everything only rank 0 does: printing (``Console``) and the run folder's files (``RunFolder``).

``Console`` prints on rank 0 and does nothing elsewhere; it never
communicates. Every method of ``RunFolder`` is collective: all ranks call
it at the same point of the run, rank 0 does the work, and the outcome
(success, or the error message) is broadcast, so that a failed write stops
every rank with the same clear error instead of leaving the others waiting
in their next collective. The broadcast sits outside the rank-0 branch: a
collective inside one deadlocks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from . import checkpoint as ckpt_io
from .comm import collective
from .errors import CheckpointError, UserError
from .progress import Progress


@collective
def run_on_rank0(comm, work, error_type=UserError, describe="failed"):
    """Run ``work()`` on rank 0 and return its result on every rank.

    If it fails there with a UserError or an OSError, every rank raises the
    same error (``error_type`` with ``describe`` for an OSError), marked
    ``all_ranks`` so that only rank 0 prints it.
    """
    result, error = None, None
    if comm.rank == 0:
        try:
            result = work()
        except UserError as exc:
            error = (type(exc), str(exc))
        except OSError as exc:
            error = (error_type, f"{describe}: {exc.strerror or exc}")
    result, error = comm.bcast((result, error))   # DDP: all ranks learn rank 0's outcome
    if error is not None:
        failure = error[0](error[1])
        failure.all_ranks = True
        raise failure
    return result


class Console:
    """Printing on rank 0 only: start-up lines, progress, per-epoch lines, warnings."""

    def __init__(self, rank, quiet=False, log_every=100):
        self.is_rank0 = rank == 0
        self.quiet = quiet
        self._progress = Progress(log_every, quiet=quiet) if self.is_rank0 else None

    def print(self, message, always=False):
        """Print on rank 0 only (``always``: even with --quiet)."""
        if self.is_rank0 and (always or not self.quiet):
            self._progress.clear()
            print(message, flush=True)

    def progress(self, **step):
        """After every step: a progress bar on a terminal, a line every --log-every steps otherwise."""
        if self.is_rank0:
            self._progress.update(**step)

    def warn(self, message):
        if self.is_rank0:
            self._progress.clear()
            print(message, file=sys.stderr, flush=True)


class RunFolder:
    """The run folder (``config.json``, ``metrics.jsonl``, ``checkpoints/``), written by rank 0 alone."""

    def __init__(self, comm, run_dir):
        self.comm = comm
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"

    @collective
    def prepare(self, config_dict):
        def work():
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        run_on_rank0(self.comm, work, UserError, f"cannot write to the run folder {self.run_dir}")

    @collective
    def append_metrics(self, record):
        def work():
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
        run_on_rank0(self.comm, work, UserError, f"cannot append to {self.run_dir / 'metrics.jsonl'}")

    @collective
    def restart_metrics(self, step, records):
        """On resume from the checkpoint of ``step``: metrics.jsonl keeps the records up to that step
        (the steps after it run again and record themselves once more); a new run folder starts
        with the checkpoint's per-epoch ``records``."""
        def work():
            path = self.run_dir / "metrics.jsonl"
            if path.exists():
                kept = [line for line in path.read_text().splitlines() if _recorded_by(line, step)]
            else:
                kept = [json.dumps(record, sort_keys=True) for record in records]
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(path)
        run_on_rank0(self.comm, work, UserError, f"cannot write {self.run_dir / 'metrics.jsonl'}")

    @collective
    def has_step_checkpoints(self):
        return run_on_rank0(self.comm, lambda: bool(ckpt_io.step_checkpoints(self.checkpoint_dir)))

    @collective
    def save_checkpoint(self, make_checkpoint, step, keep, is_best=False):
        """Write ``step-<step>.h5`` (and ``best.h5`` when ``is_best``), keeping the ``keep`` newest.

        ``make_checkpoint()`` builds the Checkpoint, on rank 0 only. A failed
        write leaves every earlier checkpoint as it was and stops every rank
        with the same CheckpointError.
        """
        path = ckpt_io.step_path(self.checkpoint_dir, step)

        def work():
            checkpoint = make_checkpoint()
            ckpt_io.save(path, checkpoint)
            if is_best:
                ckpt_io.save(self.checkpoint_dir / "best.h5", checkpoint)
            ckpt_io.prune(self.checkpoint_dir, keep)
        run_on_rank0(self.comm, work, CheckpointError, f"could not write checkpoint {path} (the previous ones "
                                                       f"are intact)")
        return path


def _recorded_by(line, step):
    """Whether a metrics.jsonl line is a whole record of a step up to ``step`` (a cut-off last line is not)."""
    try:
        return json.loads(line).get("step", 0) <= step
    except (ValueError, AttributeError):
        return False
