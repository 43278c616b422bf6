"""Run ddptrain's command line with faults injected: how the tests provoke what they cannot from
outside.

    python tests/inject.py FAULTS [ddptrain arguments ...]
    mpiexec -n 3 python tests/inject.py raise:rank=1:step=3 --data ...
    mpiexec -n 3 python -m mpi4py tests/inject.py raise:rank=1:step=3 --data ...

The faults go in through ddptrain's public callbacks (``ddptrain.cli.main(argv,
callbacks=...)``), the same hooks that drive progress, metrics and
checkpoints: nothing in ddptrain exists for them. FAULTS is a comma-separated
list, each ``kind:key=value:...``; ``step`` is the 0-based global step (the
fault fires just before that step runs), and ``rank`` limits it to one rank::

    raise:rank=1:step=3            rank 1 raises InjectedFault
    nan:step=5[:rank=R]            a parameter becomes NaN (on every rank, or on rank R)
    signal:rank=1:step=4:SIGUSR1   rank 1 sends itself SIGUSR1 (SIGTERM, SIGINT, ...)
    checkpoint-write:step=6        rank 0's checkpoint of step 6 fails after its temporary
                                   file is written, before the rename (as a full disk would)
    best-write                     every write of best.h5 fails so (a disk with room for the
                                   step checkpoints only)
    delay:seconds=0.05             every rank sleeps before each step (room for outside signals)
    wait:until=PATH[:step=N]       every rank waits before step N (without step: before each step)
                                   until the file PATH exists: the run goes on when the test says so
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from dataclasses import dataclass

from ddptrain import cli, durable
from ddptrain.run import checkpoint as ckpt_io
from ddptrain.training.trainer import Callback

KINDS = ("raise", "nan", "signal", "checkpoint-write", "best-write", "delay", "wait")
WRITE_FAULTS = ("checkpoint-write", "best-write")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int | None = None
    rank: int | None = None
    signal_name: str = "SIGUSR1"
    seconds: float = 0.0
    until: str | None = None   # a path, for "wait"

    def fires(self, step, rank):
        return (self.step is None or self.step == step) and (self.rank is None or self.rank == rank)


class InjectedFault(RuntimeError):
    """The exception a ``raise`` fault raises."""


def parse(text):
    """``"raise:rank=1:step=3,delay:seconds=0.1"`` -> a list of Faults (ValueError if malformed)."""
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, *fields = item.split(":")
        if kind not in KINDS:
            raise ValueError(f"unknown fault {kind!r} in {text!r} (one of {', '.join(KINDS)})")
        values = {}
        for field in fields:
            key, _, value = field.partition("=")
            if field.startswith("SIG"):
                values["signal_name"] = field
            elif key in ("step", "rank"):
                values[key] = int(value)
            elif key == "seconds":
                values[key] = float(value)
            elif key == "until":
                values[key] = value
            else:
                raise ValueError(f"cannot read {field!r} in {text!r}")
        if kind not in ("delay", "wait", "best-write") and "step" not in values:
            raise ValueError(f"fault {item!r} needs step=N")
        if (kind == "wait") != ("until" in values):
            raise ValueError(f"only a wait, and every wait, takes until=PATH: {item!r}")
        faults.append(Fault(kind, **values))
    return faults


class FaultInjection(Callback):
    """Fires the faults of this rank just before the steps they name."""

    def __init__(self, faults):
        self.faults = faults

    def on_step_start(self, trainer):
        step, rank = trainer.position.step, trainer.comm.rank
        for fault in self.faults:
            if not fault.fires(step, rank):
                continue
            if fault.kind == "delay":
                time.sleep(fault.seconds)
            elif fault.kind == "wait":
                while not os.path.exists(fault.until):
                    time.sleep(0.01)
            elif fault.kind == "raise":
                raise InjectedFault(f"injected on rank {rank} before step {step}")
            elif fault.kind == "nan":
                trainer.model.params[0] = float("nan")
            elif fault.kind == "signal":
                os.kill(os.getpid(), getattr(signal, fault.signal_name))


def fail_checkpoint_writes(steps, best=False):
    """Make rank 0's write of the checkpoints of ``steps`` (and of every ``best.h5``, if ``best``)
    fail like a full disk, before their rename."""
    real_fsync = durable.fsync_file
    doomed = {durable.temporary_prefix(ckpt_io.step_path("", step)) for step in steps}
    if best:
        doomed.add(durable.temporary_prefix("best.h5"))

    def fsync_file(path):
        if any(os.path.basename(path).startswith(prefix) for prefix in doomed):
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected by the test)")
        real_fsync(path)
    durable.fsync_file = fsync_file


def main(argv):
    faults = parse(argv[0])
    fail_checkpoint_writes([f.step for f in faults if f.kind == "checkpoint-write"],
                           best=any(f.kind == "best-write" for f in faults))
    return cli.main(argv[1:],
                    callbacks=[FaultInjection([f for f in faults if f.kind not in WRITE_FAULTS])])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
