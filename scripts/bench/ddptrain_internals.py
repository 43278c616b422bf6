"""Every part of ddptrain the benchmark reaches beyond its public API: imported here, nowhere else.

The public API (``ddptrain.train``, ``ddptrain.nn``, ``ddptrain.losses``,
``ddptrain.optim``) is imported where it is used. Everything below lives in
modules whose paths may change as the package is restructured: when they do,
this file is the one to update, and the rest of the benchmark keeps its names.

Importing this module starts no MPI (``ddptrain.comm`` loads mpi4py only when
an ``MPIComm`` is made), so the benchmark's own process may import it too.
"""

# gemm as a module, not its names: gemm.configure rebinds gemm.matmul to the library it chose.
from ddptrain import gemm
from ddptrain.callbacks import Checkpointing
from ddptrain.comm import MPIComm, world
from ddptrain.config import Config
from ddptrain.conv import Conv2d
from ddptrain.data import inspect as inspect_data
from ddptrain.data import read_rows
from ddptrain.denormals import MODES as DENORMAL_MODES
from ddptrain.denormals import flushed as denormals_flushed
from ddptrain.dropout import Dropout
from ddptrain.evaluation import evaluate
from ddptrain.launcher import rank_and_size
from ddptrain.mnist import ensure_default_dataset
from ddptrain.node_memory import NodeMemory, choose_exchange
from ddptrain.normalization import BatchNorm
from ddptrain.plan import TrainingPlan
from ddptrain.pooling import AvgPool2d, MaxPool2d
from ddptrain.rank0 import RunFolder
from ddptrain.sampler import epoch_plan, owned_blocks
from ddptrain.sharding import ShardedOptimizer
from ddptrain.signals import StopRequest
from ddptrain.spec import parse_spec
from ddptrain.step import Batches, Split, TrainStep
from ddptrain.threads import configure_blas_threads
from ddptrain.trainer import Trainer

GEMMS = gemm.GEMMS   # the choices of ddptrain's --gemm

# Re-exported: the rest of the benchmark imports these names from here.
__all__ = ["DENORMAL_MODES", "GEMMS", "AvgPool2d", "BatchNorm", "Batches", "Checkpointing",
           "Config", "Conv2d", "Dropout", "MPIComm", "MaxPool2d", "NodeMemory", "RunFolder",
           "ShardedOptimizer", "Split", "StopRequest", "TrainStep", "Trainer", "TrainingPlan",
           "choose_exchange", "configure_blas_threads", "denormals_flushed",
           "ensure_default_dataset", "epoch_plan", "evaluate", "gemm", "inspect_data",
           "owned_blocks", "parse_spec", "rank_and_size", "read_rows", "world"]
