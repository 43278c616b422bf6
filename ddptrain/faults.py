"""Test-only fault injection, driven by the environment variable ``DDPTRAIN_TEST_FAULT``.

This exists so that the tests can prove that ddptrain survives faults it
cannot otherwise provoke on demand: an exception on one rank, a NaN, a
signal at a known step, a checkpoint write that fails half-way. It is not a
user feature; nothing reads the variable unless it is set.

The value is a comma-separated list of faults, each ``kind:key=value:...``;
``step`` is the 0-based global step, the fault fires just before that step
runs, and ``rank`` limits it to one rank::

    raise:rank=1:step=3            rank 1 raises RuntimeError
    nan:step=5[:rank=R]            a parameter becomes NaN (on every rank, or on rank R)
    signal:rank=1:step=4:SIGUSR1   rank 1 sends itself SIGUSR1 (SIGTERM, SIGINT, ...)
    checkpoint-write:step=6        rank 0's checkpoint of step 6 fails after its temporary
                                   file is written, before the rename (as a full disk would)
    delay:seconds=0.05             every rank sleeps before each step (room for outside signals)
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass

from .errors import UserError

VARIABLE = "DDPTRAIN_TEST_FAULT"
KINDS = ("raise", "nan", "signal", "checkpoint-write", "delay")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int | None = None
    rank: int | None = None
    signal_name: str = "SIGUSR1"
    seconds: float = 0.0

    def fires(self, step, rank):
        return (self.step is None or self.step == step) and (self.rank is None or self.rank == rank)


class InjectedFault(RuntimeError):
    """The exception a ``raise`` fault raises."""


def parse(text):
    """``"raise:rank=1:step=3,delay:seconds=0.1"`` -> a list of Faults, or a UserError."""
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, *fields = item.split(":")
        if kind not in KINDS:
            raise UserError(f"{VARIABLE}: unknown fault {kind!r} in {text!r} (one of {', '.join(KINDS)})")
        values = {}
        for field in fields:
            if field.startswith("SIG"):
                values["signal_name"] = field
                continue
            key, _, value = field.partition("=")
            try:
                if key in ("step", "rank"):
                    values[key] = int(value)
                elif key == "seconds":
                    values[key] = float(value)
                elif key == "sig":
                    values["signal_name"] = value
                else:
                    raise ValueError
            except ValueError:
                raise UserError(f"{VARIABLE}: cannot read {field!r} in {text!r}") from None
        if kind in ("raise", "signal", "checkpoint-write", "nan") and "step" not in values:
            raise UserError(f"{VARIABLE}: fault {item!r} needs step=N")
        if "signal_name" in values and not hasattr(signal, values["signal_name"]):
            raise UserError(f"{VARIABLE}: unknown signal {values['signal_name']!r}")
        faults.append(Fault(kind, **values))
    return faults


class Faults:
    """The faults of this rank, hooked into a Trainer and its RankZero."""

    def __init__(self, faults, rank):
        self.faults, self.rank = list(faults), rank
        self.trainer = None

    @classmethod
    def from_environment(cls, rank, environ=os.environ):
        text = environ.get(VARIABLE, "")
        return cls(parse(text), rank) if text.strip() else None

    def attach(self, trainer, rank0):
        previous = trainer.fault_hook

        def before_step(step):
            if previous is not None:
                previous(step)
            self.before_step(step)

        self.trainer = trainer
        trainer.fault_hook = before_step
        rank0.checkpoint_fault = self.checkpoint_write_failure

    def before_step(self, step):
        for fault in self.faults:
            if not fault.fires(step, self.rank):
                continue
            if fault.kind == "delay":
                time.sleep(fault.seconds)
            elif fault.kind == "raise":
                raise InjectedFault(f"injected by {VARIABLE} on rank {self.rank} before step {step}")
            elif fault.kind == "nan":
                self.trainer.model.params[0] = float("nan")
            elif fault.kind == "signal":
                os.kill(os.getpid(), getattr(signal, fault.signal_name))

    def checkpoint_write_failure(self, step):
        """For rank 0's checkpoint of ``step``: a callable that fails like a full disk, or None."""
        if not any(f.kind == "checkpoint-write" and f.fires(step, self.rank) for f in self.faults):
            return None

        def fail():
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected by {VARIABLE})")
        return fail
