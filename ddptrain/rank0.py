"""Everything only rank 0 does: printing, metrics, checkpoint files.

Every method here is called by *all* ranks, at the same point of the run.
Rank 0 does the work; the outcome (success, or the error message) is then
broadcast, so that a failed write stops every rank with the same clear error
instead of leaving the others waiting in their next collective. The
broadcast sits outside the rank-0 branch: a collective inside one deadlocks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from . import checkpoint as ckpt_io
from .errors import CheckpointError, UserError


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


class RankZero:
    def __init__(self, comm, run_dir, quiet=False):
        self.comm = comm
        self.is_rank0 = comm.rank == 0
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.quiet = quiet

    def print(self, message, always=False):
        """Print on rank 0 only (``always``: even with --quiet)."""
        if self.is_rank0 and (always or not self.quiet):
            print(message, flush=True)

    def warn(self, message):
        if self.is_rank0:
            print(message, file=sys.stderr, flush=True)

    def _on_rank0(self, work, error_type, describe):
        return run_on_rank0(self.comm, work, error_type, describe)

    def prepare_run_dir(self, config_dict):
        def work():
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        self._on_rank0(work, UserError, f"cannot write to the run folder {self.run_dir}")

    def append_metrics(self, record):
        def work():
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
        self._on_rank0(work, UserError, f"cannot append to {self.run_dir / 'metrics.jsonl'}")

    def save_checkpoint(self, make_checkpoint, step, keep, is_best=False, fail_after_write=None):
        """Write ``step-<step>.h5`` (and ``best.h5`` when ``is_best``), keeping the ``keep`` newest."""
        path = ckpt_io.step_path(self.checkpoint_dir, step)

        def work():
            checkpoint = make_checkpoint()
            ckpt_io.save(path, checkpoint, fail_after_write=fail_after_write)
            if is_best:
                ckpt_io.save(self.checkpoint_dir / "best.h5", checkpoint)
            ckpt_io.prune(self.checkpoint_dir, keep)
        self._on_rank0(work, CheckpointError, f"could not write checkpoint {path} (the previous ones are intact)")
        return path
