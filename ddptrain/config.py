"""The run configuration: one frozen dataclass, validated once, stored in every checkpoint."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from .errors import UserError
from .nn import parse_spec
from .sampler import DEFAULT_VIRTUAL_SHARDS

DTYPES = ("float32", "float64")
SCHEDULES = ("constant", "cosine", "step")


@dataclass(frozen=True)
class Config:
    # data and model
    data: str | None = None            # HDF5 file; None: the prepared MNIST in the cache
    model: str = "784-512-256-10"
    dtype: str = "float32"
    # optimisation; batch_size is the GLOBAL batch, shared by all ranks
    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    warmup_epochs: float = 0.0
    step_size: int = 1                 # epochs between decays for the step schedule
    step_gamma: float = 0.1
    seed: int = 0
    drop_last: bool = False
    virtual_shards: int = DEFAULT_VIRTUAL_SHARDS
    # outputs
    run_dir: str | None = None         # None: runs/<SLURM job id or date-time>
    checkpoint_every: int = 0          # steps; 0: only at the end of each epoch
    keep: int = 3                      # newest step/epoch checkpoints kept
    resume: str | None = None          # None, "auto" or a checkpoint path
    # machinery
    threads: int = 0                   # BLAS threads per rank; 0: cores on this node / ranks on this node
    check_every: int = 100             # steps between cross-rank parameter consistency checks
    log_every: int = 100               # steps between progress lines
    eval_batch: int = 2000
    extra: dict = field(default_factory=dict)

    def to_dict(self):
        return dataclasses.asdict(self)

    def to_json(self):
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown configuration keys: {', '.join(unknown)}")
        return cls(**values)

    def validated(self):
        """Return self, or raise a UserError naming the first invalid option."""
        parse_spec(self.model)
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.lr_schedule not in SCHEDULES:
            raise UserError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}")
        positive = {"epochs": self.epochs, "batch-size": self.batch_size, "virtual-shards": self.virtual_shards,
                    "check-every": self.check_every, "log-every": self.log_every, "eval-batch": self.eval_batch,
                    "step-size": self.step_size, "keep": self.keep}
        for name, value in positive.items():
            if not value > 0:
                raise UserError(f"--{name} must be positive, got {value}")
        non_negative = {"lr": self.lr, "momentum": self.momentum, "weight-decay": self.weight_decay,
                        "warmup-epochs": self.warmup_epochs, "checkpoint-every": self.checkpoint_every,
                        "threads": self.threads, "seed": self.seed, "step-gamma": self.step_gamma}
        for name, value in non_negative.items():
            if not value >= 0:
                raise UserError(f"--{name} must not be negative, got {value}")
        if self.nesterov and self.momentum == 0:
            raise UserError("--nesterov needs --momentum > 0")
        return self
