"""The run configuration: one frozen dataclass, validated once, stored in every checkpoint."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .nn import parse_spec
from .sampler import DEFAULT_VIRTUAL_SHARDS

DTYPES = ("float32", "float64")
SCHEDULES = ("constant", "cosine", "step")
LR_SCALINGS = ("none", "linear")


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
    lr_scaling: str = "none"           # "linear": peak lr = lr * batch_size / reference_batch (Goyal et al.)
    reference_batch: int = 128         # the batch size --lr was chosen for
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
    metrics_every: int = 0             # steps between step records in metrics.jsonl; 0: epochs only
    debug: bool = False                # float64, finite-difference check, per-layer NaN checks
    simulate_ranks: int = 0            # >0: that many ranks as threads of one process

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
        if self.lr_scaling not in LR_SCALINGS:
            raise UserError(f"--lr-scaling must be one of {', '.join(LR_SCALINGS)}, got {self.lr_scaling!r}")
        if self.debug and self.dtype != "float64":
            raise UserError("--debug runs in float64: drop --dtype float32 (finite differences need the precision)")
        if self.lr_schedule not in SCHEDULES:
            raise UserError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}")
        positive = {"epochs": self.epochs, "batch-size": self.batch_size, "virtual-shards": self.virtual_shards,
                    "check-every": self.check_every, "log-every": self.log_every, "eval-batch": self.eval_batch,
                    "step-size": self.step_size, "keep": self.keep, "reference-batch": self.reference_batch}
        for name, value in positive.items():
            if not value > 0:
                raise UserError(f"--{name} must be positive, got {value}")
        non_negative = {"lr": self.lr, "momentum": self.momentum, "weight-decay": self.weight_decay,
                        "warmup-epochs": self.warmup_epochs, "checkpoint-every": self.checkpoint_every,
                        "threads": self.threads, "seed": self.seed, "step-gamma": self.step_gamma,
                        "metrics-every": self.metrics_every, "simulate-ranks": self.simulate_ranks}
        for name, value in non_negative.items():
            if not value >= 0:
                raise UserError(f"--{name} must not be negative, got {value}")
        if self.nesterov and self.momentum == 0:
            raise UserError("--nesterov needs --momentum > 0")
        return self


def _field_types():
    # With postponed annotations the types are strings such as "int" or "str | None".
    return {f.name: str(f.type) for f in dataclasses.fields(Config)}


def coerce(name, value, source):
    """``value`` as the type of option ``name``, or a UserError naming ``source`` and the option."""
    kind = _field_types()[name]
    option = "--" + name.replace("_", "-")
    if value is None and "None" in kind:
        return None
    if kind.startswith("bool"):
        if isinstance(value, bool):
            return value
    elif kind.startswith("int"):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind.startswith("float"):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind.startswith("str"):
        if isinstance(value, str):
            return value
    raise UserError(f"{source}: {option} must be {kind.split(' ')[0]}, got {value!r}")


def load_toml(path):
    """The options set in a TOML file, as Config field names (``batch-size`` or ``batch_size``).

    Keys may sit at the top level or in a ``[train]`` table. Unknown keys and
    values of the wrong type are refused with one line naming the file.
    """
    try:
        import tomllib
    except ModuleNotFoundError:   # Python < 3.11
        import tomli as tomllib
    path = Path(path)
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: no such configuration file") from None
    except OSError as error:
        raise UserError(f"{path}: cannot read the configuration file ({error.strerror})") from None
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"{path}: not valid TOML ({error})") from None
    table = {**{k: v for k, v in table.items() if k != "train"}, **table.get("train", {})}
    fields = _field_types()
    values = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise UserError(f"{path}: unknown option {key!r}")
        values[name] = coerce(name, value, path)
    return values
