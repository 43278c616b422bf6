"""The run configuration: one frozen dataclass, validated once, stored in every checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ddptrain.backends.denormals import MODES as DENORMAL_MODES
from ddptrain.backends.gemm import GEMMS, NUMPY
from ddptrain.data.sampler import DEFAULT_VIRTUAL_SHARDS, check_world
from ddptrain.errors import UserError
from ddptrain.files import open_regular
from ddptrain.nn.spec import named_model, parse_spec
from ddptrain.optim.optimizers import OPTIMIZERS, SGD
from ddptrain.run.data_memory import parse_size
from ddptrain.training.early_stopping import METRICS as EARLY_STOP_METRICS
from ddptrain.training.row_threads import THREAD_WORK

DTYPES = ("float32", "float64")
SCHEDULES = ("constant", "cosine", "step")
LR_SCALINGS = ("none", "linear")
BATCHNORM_MODES = ("global", "local")
EXCHANGES = ("auto", "shared-memory", "allreduce")   # exchange.choose_node_memory
MAX_CONFIG_BYTES = 1024 * 1024   # a configuration file is a few lines: more is another file
# The largest value of a count (--epochs, --batch-size, ...) and of --warmup-epochs: beyond it the
# arithmetic of sampler and schedule leaves C integers (an OverflowError, long after --dry-run).
MAX_COUNT = 2 ** 31 - 1
# --tensorboard's step records, unless --metrics-every says otherwise: TensorBoard's curves are
# metrics.jsonl's records, and a curve with a point per epoch is no curve.
TENSORBOARD_METRICS_EVERY = 10
# --profile's most steps: each holds a few dozen spans per rank (about 3 KB of timeline per rank)
MAX_PROFILE_STEPS = 10_000
SIZES = ("data_memory",)   # options of bytes, which may be given as sizes ("512M", data_memory.py)


@dataclass(frozen=True)
class Config:
    # data and model
    data: Optional[str] = None         # HDF5 file; None: the prepared MNIST in the cache
    model: str = "784-512-256-10"     # see spec.py: an MLP, a CNN, or a named model (cnn, lenet5)
    dtype: str = "float32"
    # statistics of the global batch; "local": each rank's rows (plain DDP)
    batchnorm: str = "global"
    # optimisation; batch_size is the GLOBAL batch, shared by all ranks
    epochs: int = 5
    # stop after this many optimiser steps in all (across epochs); None: when the epochs end
    max_steps: Optional[int] = None
    batch_size: int = 128
    lr: float = 0.1
    optimizer: str = "sgd"             # sgd, adam or adamw
    momentum: float = 0.9              # SGD's
    nesterov: bool = False             # SGD's
    beta1: float = 0.9                 # Adam's and AdamW's
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_grad_norm: float = 0.0        # clip the global gradient to this 2-norm; 0: no clipping
    accumulate: int = 1                # micro-batches per step on each rank (gradient accumulation)
    # each rank keeps the optimiser state of 1/P of the parameters (ZeRO-1)
    shard_optimizer: bool = False
    # reduce the gradient in buckets during backward (as PyTorch DDP)
    overlap_allreduce: bool = False
    bucket_mb: float = 0.25            # --overlap-allreduce's bucket size, in MiB
    # the bits of one process on any number of ranks (training/reproducible.py, nn/columns.py)
    reproducible: bool = False
    exchange: str = "auto"             # how ranks sum gradients: see node_memory.py
    lr_schedule: str = "cosine"
    warmup_epochs: float = 0.0
    # "linear": peak lr = lr * batch_size / reference_batch (Goyal et al.)
    lr_scaling: str = "none"
    reference_batch: int = 128         # the batch size --lr was chosen for
    step_size: int = 1                 # epochs between decays for the step schedule
    step_gamma: float = 0.1
    seed: int = 0
    drop_last: bool = False
    # stop after this many epochs in which early_stop_metric has not improved; 0: never
    early_stop: int = 0
    early_stop_min_delta: float = 0.0    # what an improvement must beat the best by
    early_stop_metric: str = "test_loss"   # or test_accuracy
    virtual_shards: int = DEFAULT_VIRTUAL_SHARDS
    # bytes of training rows a rank may hold: beyond, its shard is streamed through windows of it
    # (data/stream_order.py); 0: its shard in memory where the host has room, streamed otherwise
    data_memory: int = 0
    # outputs
    run_dir: Optional[str] = None      # None: runs/<SLURM job id or date-time>
    checkpoint_every: int = 0          # steps; 0: only at the end of each epoch
    keep: int = 3                      # newest step/epoch checkpoints kept
    resume: Optional[str] = None       # None, "auto" or a checkpoint path
    # resume on a data file whose content_sha256 is not the checkpoint's (a re-encoded copy)
    allow_other_data: bool = False
    # machinery
    # BLAS threads per rank; 0: cores on this node / ranks on this node
    threads: int = 0
    # where a rank's threads work: "rows" (a slice of the step's rows each, 1 BLAS thread each:
    # training/row_threads.py), "blas" (inside the matrix products) or "auto" (rows for CNNs)
    thread_work: str = "auto"
    gemm: str = "auto"                 # the library of the matrix products: see gemm.py
    # "keep": compute with denormal floats (slowly): see denormals.py
    denormals: str = "flush"
    check_every: int = 100             # steps between cross-rank parameter consistency checks
    log_every: int = 100               # steps between progress lines
    eval_batch: int = 500
    metrics_every: int = 0             # steps between step records in metrics.jsonl; 0: epochs only
    # metrics.jsonl's records, and histograms of the parameters, as TensorBoard events (rank 0)
    tensorboard: bool = False
    # RUN_DIR/hashes.jsonl: a hash of the parameters and buffers after every step (ddptrain verify)
    record_hashes: bool = False
    profile: int = 0                   # steps recorded in RUN_DIR/timeline.json; 0: none
    debug: bool = False                # float64, finite-difference check, per-layer NaN checks
    simulate_ranks: int = 0            # >0: that many ranks as threads of one process
    # seconds a rank may wait inside one collective before it ends the job; 0: forever
    stall_timeout: float = 0.0

    def to_dict(self):
        return dataclasses.asdict(self)

    def to_json(self):
        return json.dumps(self.to_dict(), sort_keys=True)

    def validated(self, check_spec=True):
        """Return self, or raise a UserError naming the first invalid option. ``check_spec``:
        ``model`` is a --model spec (not the summary of a model built in Python)."""
        if check_spec:
            parse_spec(self.model)
        for name, allowed in (("dtype", DTYPES), ("lr_scaling", LR_SCALINGS),
                              ("lr_schedule", SCHEDULES), ("batchnorm", BATCHNORM_MODES),
                              ("optimizer", tuple(OPTIMIZERS)), ("exchange", EXCHANGES),
                              ("gemm", GEMMS), ("denormals", DENORMAL_MODES),
                              ("early_stop_metric", tuple(EARLY_STOP_METRICS)),
                              ("thread_work", THREAD_WORK)):
            if getattr(self, name) not in allowed:
                raise UserError(f"{option_name(name)} must be one of {', '.join(allowed)}, "
                                f"got {getattr(self, name)!r}")
        if self.debug and self.dtype != "float64":
            raise UserError("--debug runs in float64: drop --dtype float32 (finite differences "
                            "need the precision)")
        positive = ("epochs", "batch_size", "virtual_shards", "check_every", "log_every",
                    "eval_batch", "step_size", "keep", "reference_batch", "accumulate")
        for name in positive:
            if not getattr(self, name) > 0:
                raise UserError(f"{option_name(name)} must be positive, got {getattr(self, name)}")
        non_negative = ("lr", "warmup_epochs", "checkpoint_every", "threads", "seed", "step_gamma",
                        "metrics_every", "simulate_ranks", "clip_grad_norm", "stall_timeout",
                        "early_stop", "early_stop_min_delta", "profile", "data_memory")
        for name in non_negative:
            if getattr(self, name) != getattr(self, name):   # NaN: neither negative nor not
                raise UserError(f"{option_name(name)} must be a number, got nan")
            if not getattr(self, name) >= 0:
                raise UserError(f"{option_name(name)} must not be negative, got "
                                f"{getattr(self, name)}")
        for name in ("lr", "warmup_epochs", "step_gamma", "clip_grad_norm", "bucket_mb",
                     "stall_timeout", "early_stop_min_delta"):
            if not math.isfinite(getattr(self, name)):
                raise UserError(f"{option_name(name)} must be finite, got {getattr(self, name)}")
        for name in (*positive, "checkpoint_every", "threads", "metrics_every", "simulate_ranks",
                     "warmup_epochs", "early_stop"):
            if getattr(self, name) > MAX_COUNT:
                raise UserError(f"{option_name(name)} must be at most {MAX_COUNT:,}, got "
                                f"{getattr(self, name)}")
        if self.max_steps is not None and not self.max_steps > 0:
            raise UserError(f"--max-steps must be a positive integer, got {self.max_steps}")
        if self.max_steps is not None and self.max_steps > MAX_COUNT:
            raise UserError(f"--max-steps must be at most {MAX_COUNT:,}, got {self.max_steps}")
        if self.early_stop_metric == "test_accuracy" and self.early_stop_min_delta >= 1:
            raise UserError(f"--early-stop-min-delta {self.early_stop_min_delta:g} with "
                            "--early-stop-metric test_accuracy: an accuracy (from 0 to 1) never "
                            "improves by that much")
        if self.profile > MAX_PROFILE_STEPS:
            raise UserError(f"--profile must be at most {MAX_PROFILE_STEPS:,} steps, got "
                            f"{self.profile}")
        if self.accumulate > self.batch_size:
            raise UserError(f"--accumulate {self.accumulate} with --batch-size {self.batch_size}: "
                            "each micro-batch needs a row of the global batch")
        if not self.bucket_mb > 0:
            raise UserError(f"--bucket-mb must be positive, got {self.bucket_mb}")
        if self.overlap_allreduce and (self.accumulate > 1 or self.shard_optimizer):
            other = (f"--accumulate {self.accumulate}" if self.accumulate > 1
                     else "--shard-optimizer")
            raise UserError(f"--overlap-allreduce with {other}: overlapping reduces one "
                            "micro-batch's whole gradient with Allreduce; drop one of them")
        if self.reproducible and self.batchnorm == "local":
            raise UserError("--reproducible with --batchnorm local: each rank's own statistics "
                            "depend on the number of ranks; drop one of them")
        if self.reproducible and self.gemm == "mkl":
            raise UserError("--reproducible with --gemm mkl: the reproducible mode multiplies with "
                            "numpy's BLAS, one thread per product (docs/reproducible.md); drop "
                            "--gemm mkl")
        if self.reproducible and self.thread_work == "rows":
            raise UserError("--reproducible with --thread-work rows: the reproducible mode runs "
                            "every product in fixed blocks on its own threads "
                            "(docs/reproducible.md); drop --thread-work rows")
        if self.debug and self.thread_work == "rows":
            raise UserError("--debug with --thread-work rows: --debug watches every layer of one "
                            "model on one thread; drop --thread-work rows")
        conflict = self.option_exchanging_through_mpi
        if self.exchange == "shared-memory" and conflict:
            raise UserError(f"--exchange shared-memory with {conflict}: {conflict} exchanges the "
                            "gradient through MPI; drop one of them")
        if self.simulate_ranks:   # before a thread starts for each of them
            check_world(self.batch_size, self.simulate_ranks, self.virtual_shards)
        self.make_optimizer()   # the optimiser checks its own settings (SettingError)
        return self

    @property
    def option_exchanging_through_mpi(self):
        """The first option set that needs the gradient exchanged through MPI, not a node's shared
        memory (``exchange.choose_node_memory``), or None. --debug's finite differences perturb each
        rank's parameters, which the ranks of a node would otherwise share."""
        return ("--overlap-allreduce" if self.overlap_allreduce else "--shard-optimizer"
                if self.shard_optimizer else "--debug" if self.debug else None)

    def make_optimizer(self, backend=NUMPY):
        """The optimiser of the options; ``backend`` (``backends.gemm.Backend``): whose axpby SGD
        updates with."""
        if self.shard_optimizer and self.optimizer == "sgd" and not self.momentum:
            raise UserError("--shard-optimizer: SGD without --momentum keeps no state to shard")
        if self.optimizer == "sgd":
            return SGD(momentum=self.momentum, weight_decay=self.weight_decay,
                       nesterov=self.nesterov, backend=backend)
        if self.nesterov:
            raise UserError("--nesterov is SGD's: drop it, or use --optimizer sgd "
                            f"(not {self.optimizer})")
        return OPTIMIZERS[self.optimizer](beta1=self.beta1, beta2=self.beta2, eps=self.eps,
                                          weight_decay=self.weight_decay)


def make_config(values, model_given=False):
    """The validated Config of the options set in ``values`` (Config fields), as the command line
    and ``ddptrain.train`` make it: a named --model's defaults apply to the options left unset,
    --debug means float64 and a replica check every step, and --tensorboard a step record every
    ``TENSORBOARD_METRICS_EVERY`` steps. ``model_given``: the model is an object
    built in Python (``values["model"]`` its summary), with no spec to check and no defaults to
    bring."""
    check_optimizer_options(values)   # what was set, before a named model's defaults
    check_early_stop_options(values)
    values = dict(values) if model_given else with_model_defaults(values)
    if values.get("debug") and "dtype" not in values:
        # --debug means float64 unless float32 is asked for (and refused)
        values["dtype"] = "float64"
    if values.get("debug"):
        values.setdefault("check_every", 1)
    if values.get("tensorboard"):
        values.setdefault("metrics_every", TENSORBOARD_METRICS_EVERY)
    return Config(**values).validated(check_spec=not model_given)


def option_name(name):
    """The command-line option of Config field ``name``: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def _option_types():
    return typing.get_type_hints(Config)


def coerce(name, value, source):
    """``value`` as the type of option ``name``, or a UserError naming ``source`` and the option."""
    kind = _option_types()[name]
    optional = typing.get_origin(kind) is typing.Union and type(None) in typing.get_args(kind)
    if optional:
        if value is None:
            return None
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    # bool is a subclass of int: a TOML true is not a number, nor 1 a boolean.
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if name in SIZES:   # "512M": bytes
        try:
            return parse_size(value) if isinstance(value, str) else parse_size(repr(value))
        except ValueError as problem:
            raise UserError(f"{source}: {option_name(name)} must be {problem}") from None
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, str):
        return value
    raise UserError(f"{source}: {option_name(name)} must be {kind.__name__}, got {value!r}")


# The options that belong to one kind of optimiser: set with another, they are refused
# (check_optimizer_options).
SGD_OPTIONS, ADAM_OPTIONS = ("momentum", "nesterov"), ("beta1", "beta2", "eps")


def with_model_defaults(values):
    """``values`` (Config fields) with the training defaults of a named --model
    (``spec.NAMED_MODELS``) added for the options that are not set: ``--model cnn`` trains the way
    that model is meant to. A default for another optimiser than the one chosen (SGD's momentum with
    --optimizer adam) is left out."""
    named = named_model(values.get("model", Config.model))
    if not named:
        return dict(values)
    foreign = SGD_OPTIONS if values.get("optimizer",
                                        named.defaults.get("optimizer", "sgd")) != "sgd" else ()
    return {**{k: v for k, v in named.defaults.items() if k not in foreign}, **values}


def check_optimizer_options(values):
    """A UserError for an option of another optimiser than the one chosen: --momentum with adam,
    --beta1 with sgd (they would be silently ignored). ``values``: the options set, as Config
    fields."""
    optimizer = values.get("optimizer", Config.optimizer)
    foreign = ADAM_OPTIONS if optimizer == "sgd" else SGD_OPTIONS
    for name in foreign:
        if name in values:
            owner = "Adam's and AdamW's" if name in ADAM_OPTIONS else "SGD's"
            raise UserError(f"{option_name(name)} is {owner}, and the optimiser is {optimizer} "
                            f"(--optimizer {'adam' if name in ADAM_OPTIONS else 'sgd'} uses it)")


def check_early_stop_options(values):
    """A UserError for early stopping's settings without ``--early-stop`` (they would be silently
    ignored). ``values``: the options set, as Config fields."""
    if values.get("early_stop", Config.early_stop):
        return
    for name in ("early_stop_min_delta", "early_stop_metric"):
        if name in values:
            raise UserError(f"{option_name(name)} is early stopping's, which is off: give "
                            "--early-stop PATIENCE too")


# Keys a configuration file may hold besides the Config fields: the train command's own switches.
SWITCHES = ("quiet", "dry_run")


def load_toml(path):
    """The options set in a TOML file, as Config field names (``batch-size`` or ``batch_size``).

    Keys may sit at the top level or in a ``[train]`` table, and are the long
    options of ``train`` (``quiet`` and ``dry-run`` included). Unknown keys,
    values of the wrong type, a key given twice (``batch-size`` and
    ``batch_size``) and a file that is not UTF-8 TOML are refused with one
    line naming the file.
    """
    try:
        import tomllib
    except ModuleNotFoundError:   # Python < 3.11
        import tomli as tomllib
    path = Path(path)
    with open_regular(path, "configuration file", missing="no such configuration file") as f:
        content = f.read(MAX_CONFIG_BYTES + 1)
    if len(content) > MAX_CONFIG_BYTES:
        raise UserError(f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB: not a configuration "
                        "file")
    try:
        table = tomllib.loads(content.decode("utf-8"))
    except RecursionError:   # tomllib parses nested arrays and tables by recursion
        raise UserError(f"{path}: not valid TOML (nested too deeply)") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid TOML (it is not UTF-8 text)") from None
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"{path}: not valid TOML ({error})") from None
    train = table.get("train", {})
    if not isinstance(train, dict):
        raise UserError(f"{path}: 'train' must be a table of options ([train]), not {train!r}")
    fields = _option_types()
    values = {}
    for key, value in [*((k, v) for k, v in table.items() if k != "train"), *train.items()]:
        name = key.replace("-", "_")
        if name not in fields and name not in SWITCHES:
            raise UserError(f"{path}: unknown option {key!r}")
        if name in values:
            spellings = " or ".join(sorted({option_name(name)[2:], name}))
            raise UserError(f"{path}: option {key!r} is set twice (as {spellings}, at the top "
                            "or in [train])")
        values[name] = coerce(name, value, path) if name in fields else _switch(name, value, path)
    return values


def _switch(name, value, source):
    if not isinstance(value, bool):
        raise UserError(f"{source}: {option_name(name)} must be true or false, got {value!r}")
    return value
