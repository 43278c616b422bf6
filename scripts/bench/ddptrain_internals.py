"""Every part of ddptrain the benchmark reaches beyond its public API: imported here, nowhere else.

The public API (``ddptrain.train``, ``ddptrain.nn``, ``ddptrain.losses``,
``ddptrain.optim``) is imported where it is used. Everything below lives in
modules whose paths may change as the package is restructured: when they do,
this file is the one to update, and the rest of the benchmark keeps its names.

Importing this module starts no MPI (``ddptrain.comm`` loads mpi4py only when
an ``MPIComm`` is made), so the benchmark's own process may import it too.
"""

from ddptrain.backends import gemm
from ddptrain.backends.denormals import MODES as DENORMAL_MODES, flushed as denormals_flushed
from ddptrain.backends.threads import configure_blas_threads
from ddptrain.data.blocks import ArrayRows
from ddptrain.data.datasets import ensure_prepared
from ddptrain.data.format import inspect as inspect_data, read_rows
from ddptrain.data.sampler import DEFAULT_VIRTUAL_SHARDS, epoch_plan, owned_blocks
from ddptrain.data.stream import FileRows, WindowStream
from ddptrain.data.stream_order import StreamedEpochPlan
from ddptrain.data.writer import write_sources
from ddptrain.distributed.comm import MPIComm
from ddptrain.distributed.exchange import make_exchange
from ddptrain.distributed.launcher import rank_and_size
from ddptrain.distributed.sharding import ShardedOptimizer
from ddptrain.distributed.world import world
from ddptrain.nn.dropout import BatchContext
from ddptrain.nn.layer import no_reduction
from ddptrain.nn.model import layer_flops, training_flops
from ddptrain.nn.spec import NAMED_MODELS, parse_spec
from ddptrain.optim.schedule import learning_rate as schedule_learning_rate
from ddptrain.run.callbacks import Checkpointing
from ddptrain.run.config import Config
from ddptrain.run.data_memory import least_bytes, parse_size as stream_parse_size, plan_data
from ddptrain.run.rank0 import RunFolder
from ddptrain.run.runner import column_split
from ddptrain.run.signals import StopRequest
from ddptrain.training.batches import Batches, Split
from ddptrain.training.evaluation import evaluate
from ddptrain.training.groups import uses_groups
from ddptrain.training.plan import TrainingPlan
from ddptrain.training.row_threads import thread_line, wants_row_threads
from ddptrain.training.step import TrainStep
from ddptrain.training.trainer import Trainer

GEMMS = gemm.GEMMS   # the choices of ddptrain's --gemm


def products_backend(request):
    """The backend ddptrain's --gemm ``request`` multiplies with (``gemm.Backend``)."""
    return gemm.backend(gemm.choose(request))


def ensure_default_dataset():
    """The prepared MNIST of the cache, prepared first if it is not there."""
    return ensure_prepared("mnist")


# Re-exported: the rest of the benchmark imports these names from here.
__all__ = ["ArrayRows", "BatchContext", "Batches", "Checkpointing", "Config", "DENORMAL_MODES",
           "DEFAULT_VIRTUAL_SHARDS",
           "FileRows", "GEMMS", "MPIComm", "NAMED_MODELS", "RunFolder", "ShardedOptimizer", "Split",
           "StopRequest", "StreamedEpochPlan", "TrainStep", "Trainer", "TrainingPlan",
           "WindowStream", "column_split", "configure_blas_threads", "denormals_flushed",
           "ensure_default_dataset", "epoch_plan", "evaluate", "gemm", "inspect_data",
           "layer_flops", "least_bytes", "make_exchange", "no_reduction", "owned_blocks",
           "parse_spec", "plan_data", "products_backend", "rank_and_size", "read_rows",
           "schedule_learning_rate", "stream_parse_size", "thread_line", "training_flops",
           "uses_groups", "wants_row_threads", "world", "write_sources"]
