#!/usr/bin/env python3
"""Training throughput of ddptrain against PyTorch on the same CPU, and against the machine's GEMM limit.

One run measures, on the same model (default MLP 784-512-256-10, float32),
the same global batch sizes and the same thread budget (default: every core
this process may run on):

  ddptrain, 1 process        ddptrain's TrainStep with SerialComm, the budget as BLAS threads
  ddptrain, P ranks (MPI)    mpiexec -n P: TrainStep with the real MPIComm; BLAS threads per
                             rank chosen by ddptrain.threads.configure_blas_threads
  ddptrain, P ranks, no allreduce   the same ranks with the Allreduce skipped (a diagnostic:
                             what communication costs; its parameters drift apart)
  PyTorch, 1 process         an idiomatic loop: nn.Sequential, CrossEntropyLoss, SGD momentum 0.9,
                             torch.set_num_threads(budget)
  PyTorch DDP (gloo), P processes   the same loop wrapped in DistributedDataParallel, launched by
                             mpiexec, env:// rendezvous on 127.0.0.1, budget/P threads each

Every row runs in fresh processes, on real MNIST batches (``--data``; default:
ddptrain's own data file, prepared on first use) or random data of MNIST's
shape (``--data random``). Each rank holds its shard in memory as float32,
as ``python -m ddptrain`` does, and a ddptrain step is what the inner loop of
``Trainer._run_epoch`` does: gather this rank's rows of the global batch
chosen by ddptrain's sampler (``step.Batches``), then the very ``step.TrainStep``
that training runs (forward, loss, backward, gradient Allreduce, the Allreduce
of the step's loss and accuracy sums, the finite check, the SGD update); not
the callbacks (progress line, periodic replica check) or the evaluation: the
time-to-accuracy runs include those. PyTorch gathers
the same rows by tensor indexing. Warmup steps are excluded. The rows are run in ``--rounds`` rounds,
interleaved, with ``--repeats`` timed repetitions per launch: the table shows
the median and the range over all of them.

The GEMM limit is measured here too: the matrix products of one training step
(forward, weight gradients, input gradients but the first layer's) at a large
batch, in one process with every thread, and in P single-thread processes
running at the same time; the larger is the machine's limit.

Also reported: the fraction of step time spent in the gradient Allreduce
(timed around ``comm.allreduce_`` inside the step), where a ddptrain step's
time goes (matrix products, Allreduce, SGD update, ...), peak memory per rank
(ru_maxrss), the time to load a rank's shard from HDF5, to evaluate the test
set and to write a checkpoint, each against the time of one epoch, and the
wall time of ``mpiexec -n P python -m ddptrain`` until it reports 98% test
accuracy (scripts/time_to_accuracy.py).

PyTorch is an optional benchmark dependency, never needed by ddptrain:

    .venv/bin/pip install torch==2.13.0      # on the project's machines: a local CPU build, no download

Without it the PyTorch rows are skipped (the output says so) and the ddptrain
rows still run. OpenBLAS reads OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE from the
environment; the header shows their values and the kernel that runs.

``--isa avx2`` limits the vector code of every library in every row to
AVX2 (OpenBLAS's and MKL's kernels, numpy's loops, PyTorch's ATen and
oneDNN kernels, through their environment variables): on an AVX-512 CPU it
measures what a CPU without AVX-512 would give, the same caches and memory
aside. The notes under the table say which code each side ran.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))   # time_to_accuracy.py, beside this file

import time_to_accuracy  # noqa: E402
from ddptrain.denormals import MODES as DENORMAL_MODES  # noqa: E402
from ddptrain.gemm import GEMMS  # noqa: E402

TORCH_INSTALL = "pip install torch==2.13.0"
RANDOM = "random"


# ------------------------------------------------------------------------------------------ shared


IMAGE = (28, 28)   # the data's image shape: MNIST's for random data; use_images_of(data) sets it from a file


def use_images_of(data):
    """Set IMAGE to the images of ``data`` (a data file, or 'random': MNIST's shape)."""
    global IMAGE
    if data != RANDOM:
        from ddptrain import data as ddata
        IMAGE = tuple(ddata.inspect(data).image_shape)


def model_layers(spec):
    """The layers of a --model spec for MNIST's images (no arrays: nothing allocated)."""
    from ddptrain.spec import parse_spec
    return parse_spec(spec).layers(IMAGE)


def layer_sizes(spec):
    """An MLP's layer sizes, input first (the GEMM limit is measured on its products)."""
    from ddptrain.nn import Linear
    linears = [layer for layer in model_layers(spec) if isinstance(layer, Linear)]
    return [linears[0].n_in] + [layer.n_out for layer in linears]


def flops_per_sample(spec):
    """FLOPs of one training step per sample: forward, weight gradients, input gradients but the first."""
    from ddptrain.nn import layer_flops, training_flops
    return training_flops(layer_flops(model_layers(spec), IMAGE))


def max_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def numpy_simd():
    """numpy's optional SIMD targets (its loops pick the best the CPU has) and the CPU's features."""
    try:
        from numpy._core import _multiarray_umath as umath   # numpy 2
    except ImportError:
        from numpy.core import _multiarray_umath as umath    # numpy 1
    return umath.__cpu_dispatch__, umath.__cpu_features__


def cpu_flags():
    """The CPU's feature flags (/proc/cpuinfo's): {"avx2", "avx512f", ...}; empty where unknown."""
    try:
        return set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


def isa_environment(isa):
    """The environment variables that hold every library's vector code to ``isa`` ("native": none)."""
    if isa == "native":
        return {}
    dispatch, _ = numpy_simd()
    beyond_avx2 = [target for target in dispatch if "AVX512" in target or target == "X86_V4"]
    return {"OPENBLAS_CORETYPE": "Haswell",        # numpy's OpenBLAS: its AVX2 kernels
            "MKL_ENABLE_INSTRUCTIONS": "AVX2",     # MKL: ddptrain's (--gemm mkl) and PyTorch's
            "NPY_DISABLE_CPU_FEATURES": " ".join(beyond_avx2),
            "ATEN_CPU_CAPABILITY": "avx2",         # PyTorch's element-wise kernels
            "ONEDNN_MAX_CPU_ISA": "AVX2"}          # PyTorch's oneDNN kernels


def numpy_vector_code():
    """numpy's own loops: the best SIMD target its dispatch may use on this CPU."""
    dispatch, features = numpy_simd()
    usable = [target for target in dispatch if features.get(target)]
    return usable[-1] if usable else "baseline"


def ddptrain_vector_code():
    """The vector code a ddptrain row runs: numpy's loops, and the kernels of the library that multiplies."""
    from threadpoolctl import threadpool_info

    from ddptrain import gemm
    openblas = next((lib for lib in threadpool_info() if lib.get("internal_api") == "openblas"), {})
    parts = [f"numpy's loops {numpy_vector_code()}", f"openblas kernel {openblas.get('architecture', '?')}"]
    if gemm.in_use() == "mkl":
        parts.append(f"MKL kernels {gemm.mkl_code_path()}")
    return ", ".join(parts)


def blas_description():
    """The library of the matrix products (ddptrain.gemm) with its version, kernel and threads."""
    from threadpoolctl import threadpool_info

    from ddptrain import gemm
    name = "mkl" if gemm.in_use() == "mkl" else None
    blas = next((lib for lib in threadpool_info() if lib.get("user_api") == "blas"
                 and (name is None or lib.get("internal_api") == name)), {})
    kernel = (f"kernel {blas.get('architecture', '?')}" if "architecture" in blas else
              f"{blas.get('threading_layer', '?')} threading")   # MKL chooses its kernel for each call
    return (f"{blas.get('internal_api', 'unknown BLAS')} {blas.get('version', '')} {kernel}, "
            f"{blas.get('num_threads', '?')} threads").strip()


def load_shard(data, rank, size, split, blocks_fn, as_stored=True):
    """This rank's rows of ``split`` as ``python -m ddptrain`` keeps them: uint8 pixels from a file (random data:
    float32), and int64 labels; ``step.Split`` makes float32 of the pixels as batches are taken. Not
    ``as_stored``: float32 images, as PyTorch's loop keeps them (a float tensor in memory)."""
    from ddptrain import data as ddata
    if data == RANDOM:
        n = 60000 if split == "train" else 10000
        lo, hi = n * rank // size, n * (rank + 1) // size
        rng = np.random.default_rng([rank, split == "train"])
        return rng.random((hi - lo, *IMAGE), dtype=np.float32), rng.integers(0, 10, hi - lo), n
    info = ddata.inspect(data)
    n = info.n_train if split == "train" else info.n_test
    x, y = ddata.read_rows(data, split, blocks_fn(n), dtype=info.stored_dtype(np.float32) if as_stored else
                           np.float32)
    return x, y, n


def train_blocks(rank, size):
    from ddptrain import sampler
    return lambda n: sampler.owned_blocks(n, rank, size)


def test_blocks(rank, size):
    return lambda n: [(n * rank // size, n * (rank + 1) // size)]


class Plan:
    """The rows of every step of one epoch for this rank (ddptrain's sampler), cycled; full batches only."""

    def __init__(self, n_train, batch, rank, size, epoch=0):
        from ddptrain.sampler import epoch_plan
        self.plan = epoch_plan(n_train, batch, rank, size, seed=0, epoch=epoch, drop_last=True)
        self.global_count = batch

    def rows(self, step):
        return self.plan.local_batch(step % self.plan.n_steps)


def summarise(rates):
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "all": rates}


# ------------------------------------------------------------------------------------------ workers


class TimedComm:
    """A communicator whose Allreduces of ``only`` (every array if None) are timed, and with ``skip`` skipped
    (the diagnostic row). The others, such as the step's totals, run untimed: the step needs them."""

    def __init__(self, comm, only=None, skip=False):
        self._comm, self.only, self.skip, self.seconds = comm, only, skip, 0.0

    def __getattr__(self, name):
        return getattr(self._comm, name)

    def allreduce_(self, array):
        if self.only is not None and array is not self.only:
            return self._comm.allreduce_(array)
        started = time.perf_counter()
        if not self.skip:
            self._comm.allreduce_(array)
        self.seconds += time.perf_counter() - started
        return array

    def reduce_scatter_(self, array, bounds):   # the gradient, through node_memory.NodeMemory
        started = time.perf_counter()
        mine = array[bounds[self._comm.rank]:bounds[self._comm.rank + 1]] if self.skip else \
            self._comm.reduce_scatter_(array, bounds)
        self.seconds += time.perf_counter() - started
        return mine


class ProfiledComm:
    """Laps of a StepProfile around the step's two Allreduces (for the profile, not the timed rows)."""

    def __init__(self, comm, profile):
        self._comm, self._profile = comm, profile

    def __getattr__(self, name):
        return getattr(self._comm, name)

    def allreduce_(self, array):
        self._profile.lap("other")   # next to nothing runs between the backward and here
        self._comm.allreduce_(array)
        self._profile.lap("gradient Allreduce" if array is self._comm.only else "step totals Allreduce")
        return array

    def reduce_scatter_(self, array, bounds):
        self._profile.lap("other")
        mine = self._comm.reduce_scatter_(array, bounds)
        self._profile.lap("gradient exchange (shared memory)")
        return mine


class ProfiledOptimizer:
    """Laps of a StepProfile around the update: the finite check runs just before it."""

    def __init__(self, optimizer, profile):
        self._optimizer, self._profile = optimizer, profile

    def __getattr__(self, name):   # a sharded optimiser's bounds and slice, for TrainStep
        return getattr(self._optimizer, name)

    def step(self, params, grads, lr):
        self._profile.lap("finite check")
        self._optimizer.step(params, grads, lr)
        self._profile.lap("SGD update (and allgather, sharded)" if hasattr(self._optimizer, "bounds") else
                          "SGD update")


class StepProfile:
    """Where a step's time goes, from laps at layer boundaries (``Sequential.observer``) and around the loss.

    Matrix products are the Linear layers (their bias add and bias gradient included);
    everything else is memory-bound numpy work or communication.
    """

    def __init__(self):
        self.seconds, self.steps, self._mark = {}, 0, 0.0

    def start(self):
        self._mark = time.perf_counter()

    def lap(self, name):
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._mark
        self._mark = now

    def observer(self, direction, layer, array):
        from ddptrain.conv import Conv2d
        from ddptrain.nn import Linear
        self.lap("matrix products (Linear, bias included)" if isinstance(layer, Linear) else
                 "Conv2d (im2col, matrix products, col2im)" if isinstance(layer, Conv2d) else type(layer).__name__)

    def per_step_ms(self):
        return {name: 1e3 * seconds / self.steps for name, seconds in self.seconds.items()}


class TimedLoss:
    """The loss, with a lap after its forward (and the accuracy count) and after its backward."""

    def __init__(self, loss, profile):
        self._loss, self._profile = loss, profile

    def forward(self, *args, **kwargs):
        value = self._loss.forward(*args, **kwargs)
        self._profile.lap("loss and accuracy")
        return value

    def backward(self):
        value = self._loss.backward()
        self._profile.lap("loss and accuracy")   # count_correct ran just before
        return value


def worker_ddptrain(args):
    """ddptrain: its TrainStep on this rank's share of each global batch. Rank 0 writes the results."""
    from ddptrain import gemm
    from ddptrain.comm import world
    from ddptrain.losses import SoftmaxCrossEntropy
    from ddptrain.nn import Sequential, no_reduction
    from ddptrain.optim import SGD
    from ddptrain.config import Config
    from ddptrain.node_memory import NodeMemory, choose_exchange
    from ddptrain.sharding import ShardedOptimizer
    from ddptrain.step import Batches, Split, TrainStep
    from ddptrain.threads import configure_blas_threads

    comm = world()
    gemm.configure(args.gemm)   # before the threads: they are set for the library that multiplies
    blas_threads = configure_blas_threads(comm, args.threads_per_rank)
    threads, thread_line = blas_threads.threads, blas_threads.description
    started = time.perf_counter()
    train_x, train_y, n_train = load_shard(args.data, comm.rank, comm.size, "train",
                                           train_blocks(comm.rank, comm.size))
    test_x, test_y, _ = load_shard(args.data, comm.rank, comm.size, "test", test_blocks(comm.rank, comm.size))
    load_seconds = comm.allreduce(time.perf_counter() - started) / comm.size   # DDP: mean over ranks

    model = Sequential.from_spec(args.model, dtype=np.float32, seed=0, input_shape=IMAGE)
    train_x, test_x = model.as_input(train_x), model.as_input(test_x)   # (N, 1, 28, 28) for a CNN: a view
    loss_fn, optimizer = SoftmaxCrossEntropy(), SGD(momentum=0.9)
    # The gradient exchange a run would choose (ddptrain.node_memory): the nodes' shared memory, or MPI.
    settings = Config(exchange=args.exchange, overlap_allreduce=args.overlap_allreduce,
                      shard_optimizer=args.shard_optimizer, dtype="float32")
    use_node_memory, _ = choose_exchange(comm, settings, model.params.size)
    exchange = None   # with node memory: what the sharded optimiser reduces through, timed
    if use_node_memory:
        node_memory = NodeMemory(comm, model.params.size, model.dtype)
        node_memory.place(model)
        exchange = TimedComm(node_memory, only=model.grads, skip=args.no_allreduce)
        optimizer = ShardedOptimizer(optimizer, exchange, model.params.size)
    elif args.shard_optimizer:
        optimizer = ShardedOptimizer(optimizer, comm, model.params.size)
    timed = TimedComm(comm, only=model.grads, skip=args.no_allreduce)
    # Batch normalisation: statistics of the global batch (its Allreduces timed apart), or each rank's
    # own with rank 0's buffers broadcast after every step, as ddptrain --batchnorm local does.
    batchnorm_timer = TimedComm(comm)
    model.set_sum_over_ranks(batchnorm_timer.allreduce_ if args.batchnorm == "global" else no_reduction)
    broadcast_buffers = args.batchnorm == "local" and comm.size > 1 and model.buffers.size
    plan = Plan(n_train, args.batch, comm.rank, comm.size)
    batches = Batches(Split(train_x, train_y, np.float32), -(-args.batch // comm.size))

    def run(first, steps, profile=None):
        # What Trainer._run_epoch does for each step: gather this rank's rows, then the TrainStep
        # (forward, loss, backward, gradient Allreduce, step totals Allreduce, finite check, update).
        bucket_bytes = int(args.bucket_mb * 2 ** 20) if args.overlap_allreduce else None
        if profile is None:
            train_step = TrainStep(model, loss_fn, optimizer, timed, bucket_bytes=bucket_bytes)
        else:
            profiled = optimizer if exchange is None else \
                ShardedOptimizer(optimizer.optimizer, ProfiledComm(exchange, profile), model.params.size)
            train_step = TrainStep(model, TimedLoss(loss_fn, profile), ProfiledOptimizer(profiled, profile),
                                   ProfiledComm(timed, profile), bucket_bytes=bucket_bytes)
        for step in range(first, first + steps):
            if profile:
                profile.start()
            x, y = batches.gather(plan.rows(step))
            if profile:
                profile.lap("gathering the batch")
            train_step(x, y, plan.global_count, args.lr)
            if broadcast_buffers:
                comm.bcast_(model.buffers)
            if profile:
                profile.steps += 1
        return first + steps

    step = run(0, args.warmup)
    rates, allreduce_fractions, batchnorm_fractions = [], [], []
    for _ in range(args.repeats):
        comm.barrier()
        timed.seconds = batchnorm_timer.seconds = 0.0
        if exchange is not None:
            exchange.seconds = 0.0
        began = time.perf_counter()
        step = run(step, args.steps)
        comm.barrier()
        elapsed = time.perf_counter() - began
        rates.append(args.steps * args.batch / elapsed)
        exchanged = timed.seconds + (exchange.seconds if exchange is not None else 0.0)
        allreduce_fractions.append(comm.allreduce(exchanged / elapsed) / comm.size)
        batchnorm_fractions.append(comm.allreduce(batchnorm_timer.seconds / elapsed) / comm.size)

    # Then a few steps with laps between the phases (not timed above: the laps cost a little).
    profile = StepProfile()
    model.observer = profile.observer
    comm.barrier()
    step = run(step, max(5, args.steps // 2), profile)
    model.observer = None

    state = (optimizer.optimizer if isinstance(optimizer, ShardedOptimizer) else optimizer).state_dict()
    optimizer_bytes = sum(v.nbytes for v in state.values() if isinstance(v, np.ndarray))
    result = {"rates": rates, "allreduce_fraction": allreduce_fractions, "threads": threads,
              "optimizer_bytes": comm.allgather(optimizer_bytes),
              "batchnorm_allreduce_fraction": batchnorm_fractions,
              "profile_ms": profile.per_step_ms() if profile.steps else None,
              "thread_line": thread_line, "blas": blas_description(), "library": comm.library,
              "vector_code": ddptrain_vector_code(),
              "hosts": blas_threads.host_line,
              "load_seconds": load_seconds, "n_train": n_train, "n_params": int(model.params.size),
              "load_what": "making random shards" if args.data == RANDOM else "loading the shards from HDF5"}
    if comm.size > 1 and not args.no_allreduce:
        result["allreduce_alone_ms"] = time_allreduce(lambda: comm.allreduce_(model.grads), comm.barrier)
    if args.end_to_end:
        result.update(end_to_end(args, comm, TrainStep(model, loss_fn, optimizer, comm), test_x, test_y, n_train))
    rss = comm.allgather(max_rss_mib())   # DDP
    result["max_rss_mib"] = rss
    if comm.rank == 0:
        Path(args.out).write_text(json.dumps(result))


def time_allreduce(allreduce, barrier, calls=30):
    """Median milliseconds of one allreduce of the whole gradient, on its own."""
    for _ in range(5):
        allreduce()
    times = []
    for _ in range(calls):
        barrier()
        began = time.perf_counter()
        allreduce()
        times.append(time.perf_counter() - began)
    return 1e3 * statistics.median(times)


def end_to_end(args, comm, train_step, test_x, test_y, n_train):
    """Seconds to evaluate the test set and to write one checkpoint, with ddptrain's own code."""
    from ddptrain.callbacks import Checkpointing
    from ddptrain.config import Config
    from ddptrain.evaluation import evaluate
    from ddptrain.plan import TrainingPlan
    from ddptrain.rank0 import RunFolder
    from ddptrain.signals import StopRequest
    from ddptrain.step import Split
    from ddptrain.trainer import Trainer

    test, n_classes = Split(test_x, test_y, np.float32), 10
    evaluate(train_step.model, comm, test, n_classes)   # warm
    comm.barrier()
    began = time.perf_counter()
    evaluate(train_step.model, comm, test, n_classes)
    eval_seconds = time.perf_counter() - began

    run_dir = comm.bcast(tempfile.mkdtemp(prefix="ddptrain-bench-") if comm.rank == 0 else None)
    config = Config(model=args.model, batch_size=args.batch, run_dir=run_dir)
    folder = RunFolder(comm, run_dir)
    folder.take()
    folder.write_config(config.to_dict())
    trainer = Trainer(train_step, TrainingPlan(config, n_train, comm.rank, comm.size),
                      Split(test_x[:1], test_y[:1], np.float32),
                      test, n_classes, StopRequest())
    checkpointing = Checkpointing(folder)
    times = []
    for _ in range(3):
        comm.barrier()
        began = time.perf_counter()
        checkpointing.save(trainer, is_best=True)   # step-<n>.h5 and best.h5, as at the end of an epoch
        times.append(time.perf_counter() - began)
        trainer.position.step += 1
    if comm.rank == 0:
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"eval_seconds": eval_seconds, "checkpoint_seconds": statistics.median(times)}


def worker_torch(args):
    """PyTorch: the idiomatic loop, in one process or as one DDP (gloo) process of several."""
    import torch
    import torch.distributed as dist
    from torch import nn

    from ddptrain.launcher import rank_and_size

    rank, size = rank_and_size()
    torch.set_num_threads(args.threads_per_rank)
    if size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
        dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=size)
    train_x, train_y, n_train = load_shard(args.data, rank, size, "train", train_blocks(rank, size), as_stored=False)
    layers = torch_layers(args.model)
    # Shaped once, outside the timed steps, as the model takes them (ddptrain's Flatten is a view, as reshape is).
    x_all, y_all = torch.from_numpy(train_x.reshape(len(train_x), *torch_input_shape(args.model))), \
        torch.from_numpy(train_y)
    torch.manual_seed(0)
    model = nn.Sequential(*layers)
    if size > 1:
        model = nn.parallel.DistributedDataParallel(model)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    plan = Plan(n_train, args.batch, rank, size)
    index = [torch.from_numpy(plan.rows(s)) for s in range(plan.plan.n_steps)]

    def run(first, steps):
        for step in range(first, first + steps):
            rows = index[step % len(index)]
            x, y = x_all[rows], y_all[rows]
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
        return first + steps

    barrier = dist.barrier if size > 1 else (lambda: None)
    step = run(0, args.warmup)
    rates = []
    for _ in range(args.repeats):
        barrier()
        began = time.perf_counter()
        step = run(step, args.steps)
        barrier()
        rates.append(args.steps * args.batch / (time.perf_counter() - began))
    result = {"rates": rates, "threads": torch.get_num_threads(),
              "library": f"torch {torch.__version__}" + (" DDP gloo" if size > 1 else ""),
              "vector_code": f"ATen kernels {torch.backends.cpu.get_cpu_capability()}"}
    rss = [max_rss_mib()]
    if size > 1:
        flat = torch.zeros(sum(p.numel() for p in model.parameters()))
        result["allreduce_alone_ms"] = time_allreduce(lambda: dist.all_reduce(flat), dist.barrier)
        gathered = [None] * size
        dist.all_gather_object(gathered, rss[0])
        rss = gathered
    result["max_rss_mib"] = rss
    if rank == 0:
        Path(args.out).write_text(json.dumps(result))
    if size > 1:
        # Skip gloo's teardown: it sometimes aborts at exit ("terminate called without an
        # active exception") after everything is measured and written.
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def torch_layers(spec):
    """The PyTorch modules of ddptrain's layers for a --model spec, layer for layer."""
    from torch import nn

    from ddptrain.conv import Conv2d
    from ddptrain.dropout import Dropout
    from ddptrain.nn import Flatten, Linear, ReLU
    from ddptrain.normalization import BatchNorm
    from ddptrain.pooling import AvgPool2d, MaxPool2d
    layers = model_layers(spec)
    modules, shape = [], torch_input_shape(spec)
    for layer in layers:
        if isinstance(layer, Conv2d):
            modules.append(nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                                     padding=layer.padding, bias=layer.bias))
        elif isinstance(layer, BatchNorm):   # SyncBatchNorm refuses CPU modules under DDP
            modules.append(nn.BatchNorm2d(layer.num_features) if len(shape) == 3 else nn.BatchNorm1d(layer.num_features))
        elif isinstance(layer, Linear):
            modules.append(nn.Linear(layer.n_in, layer.n_out, bias=layer.bias))
        elif isinstance(layer, (MaxPool2d, AvgPool2d)):
            kind = nn.MaxPool2d if isinstance(layer, MaxPool2d) else nn.AvgPool2d
            modules.append(kind(layer.kernel_size, stride=layer.stride))
        elif isinstance(layer, Flatten):
            modules.append(nn.Flatten())
        elif isinstance(layer, ReLU):
            modules.append(nn.ReLU())
        elif isinstance(layer, Dropout):
            modules.append(nn.Dropout(layer.p))
        else:
            raise ValueError(f"no PyTorch module for {layer.label()}")
        shape = layer.output_shape(shape)
    return modules


def torch_input_shape(spec):
    """One sample as the model takes it: (1, 28, 28) for a CNN, the 28x28 image for an MLP (which flattens it)."""
    return (1, *IMAGE) if model_layers(spec)[0].takes_channels else IMAGE


def worker_gemm(args):
    """GFLOP/s of one step's matrix products at a large batch, with ``threads_per_rank`` BLAS threads."""
    from threadpoolctl import threadpool_limits

    from ddptrain import gemm
    from ddptrain.launcher import rank_and_size
    gemm.configure(args.gemm)   # the library ddptrain's rows multiply with
    threadpool_limits(limits=args.threads_per_rank, user_api="blas")
    rank, size = rank_and_size()
    comm = None
    if size > 1:
        from ddptrain.comm import MPIComm
        comm = MPIComm()
    rng = np.random.default_rng(rank)
    batch, sizes = args.batch, layer_sizes(args.model)
    products = []   # (a, b, out): every product of a training step, as train_step computes them
    for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        x = rng.random((batch, n_in), dtype=np.float32)
        w = rng.random((n_in, n_out), dtype=np.float32)
        dout = rng.random((batch, n_out), dtype=np.float32)
        products.append((x, w, np.empty((batch, n_out), np.float32)))          # forward
        products.append((x.T, dout, np.empty((n_in, n_out), np.float32)))     # weight gradient
        if k > 0:
            products.append((dout, w.T, np.empty((batch, n_in), np.float32)))  # input gradient

    def one_step():
        for a, b, out in products:
            gemm.matmul(a, b, out=out)

    for _ in range(3):
        one_step()
    flops = flops_per_sample(args.model) * batch
    rates = []
    for _ in range(args.repeats):
        if comm is not None:
            comm.barrier()
        began = time.perf_counter()
        for _ in range(args.steps):
            one_step()
        rates.append(flops * args.steps / (time.perf_counter() - began))
    rate = statistics.median(rates)
    total = comm.allreduce(rate) if comm is not None else rate   # P processes at once: their sum
    if rank == 0:
        Path(args.out).write_text(json.dumps({"flops": total, "per_process": rate, "blas": blas_description()}))


# ------------------------------------------------------------------------------------------ launching


def mpiexec():
    return time_to_accuracy.mpiexec()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FAKE_HOSTS = ROOT / "scripts" / "fake-hosts.sh"
HOSTS_PREFIX = "dbench"   # the benchmark's own fake hosts, apart from the tests' ("ddpt", "ddptt")


def fake_hosts(command, n=2):
    """``scripts/fake-hosts.sh up N`` / ``down`` for the rows across hosts; True if it worked."""
    argv = [str(FAKE_HOSTS), command, *([str(n)] if command == "up" else []), HOSTS_PREFIX]
    return subprocess.run(argv, capture_output=True, text=True).returncode == 0


def across_hosts(argv, ranks):
    """``argv`` as ``ranks`` ranks, one on each fake host: mpiexec on host 1, the others through the launcher."""
    hosts = [f"{HOSTS_PREFIX}-h{k}" for k in range(1, ranks + 1)]
    return [str(FAKE_HOSTS), "run", hosts[0], mpiexec(), "-hosts", ",".join(f"{h}:1" for h in hosts),
            "-launcher", "ssh", "-launcher-exec", str(ROOT / "scripts" / "fake-hosts-launcher"), "-n", str(ranks),
            *argv]


def launch(kind, ranks, threads_per_rank, batch, steps, warmup, repeats, opts, extra=()):
    """Run one worker (under mpiexec when ranks > 1; one rank per fake host with ``--hosts`` in ``extra``) in
    fresh processes; returns its JSON result."""
    hosts = "--hosts" in extra
    extra = tuple(e for e in extra if e != "--hosts")
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        argv = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--out", out,
                "--batch", str(batch), "--threads-per-rank", str(threads_per_rank), "--model", opts.model,
                "--data", str(opts.data), "--steps", str(steps), "--warmup", str(warmup),
                "--repeats", str(repeats), "--lr", str(opts.lr), "--gemm", opts.gemm,
                "--denormals", opts.denormals, *extra]
        if hosts:
            argv = across_hosts(argv, ranks)
        elif ranks > 1:
            argv = [mpiexec(), "-n", str(ranks), *argv]
        proc = subprocess.run(argv, capture_output=True, text=True, env=time_to_accuracy.clean_env(),
                              cwd=ROOT, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(argv)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}"
                               f"{proc.stderr[-3000:]}")
        return json.loads(Path(out).read_text())
    finally:
        Path(out).unlink(missing_ok=True)


def torch_available():
    try:
        import importlib.util
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def torch_version():
    proc = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                          capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


# ------------------------------------------------------------------------------------------ report


def fmt_rate(summary):
    return f"{summary['median']:>9,.0f} ({summary['min']:,.0f}-{summary['max']:,.0f})"


def machine_lines(opts, torch_ver):
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    have = [flag for flag in ("avx2", "fma", "avx512f") if flag in cpu_flags()]
    flags = f" ({', '.join(have)})" if have else ""
    env = ", ".join(f"{name}={os.environ[name]!r}" if name in os.environ else f"{name} unset"
                    for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"))
    return [
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; host {socket.gethostname()}",
        f"machine: {cpu}{flags}, {opts.cores} cores available to this process, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
        f"python {platform.python_version()}, numpy {np.__version__}; environment: {env}",
        f"PyTorch: {torch_ver}" if torch_ver else
        "PyTorch: rows skipped (--no-torch)" if opts.no_torch and torch_available() else
        f"PyTorch: not installed, PyTorch rows skipped (optional: {TORCH_INSTALL})",
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="HDF5 data file, or 'random' for random data of MNIST's shape "
                                       "(default: ddptrain's MNIST in the cache, prepared if missing)")
    parser.add_argument("--model", default="784-512-256-10")
    parser.add_argument("--bn-model", help="the model of the batch-normalisation rows (default: --model with "
                                           "'bn' after every hidden size, 784-512-bn-256-bn-10 for the default)")
    parser.add_argument("--no-bn", action="store_true", help="skip the batch-normalisation rows")
    parser.add_argument("--cnn-model", default="cnn", help="the model of the CNN rows (default: %(default)s)")
    parser.add_argument("--no-cnn", action="store_true", help="skip the CNN rows")
    parser.add_argument("--cnn-samples", type=int, default=7680,
                        help="samples per timed repetition of the CNN rows (default: %(default)s)")
    parser.add_argument("--batch-sizes", default="128,512", help="global batch sizes (default: %(default)s)")
    parser.add_argument("--ranks", type=int, default=2, help="MPI ranks / DDP processes (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0,
                        help="thread budget, shared by the ranks (default: every core this process may use)")
    parser.add_argument("--rounds", type=int, default=3, help="launches per row, interleaved (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per launch (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=61440,
                        help="samples per timed repetition (default: %(default)s, about one epoch)")
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate of the timed steps")
    parser.add_argument("--tta-repeats", type=int, default=3, help="runs of the time-to-accuracy command")
    parser.add_argument("--tta-args", default=time_to_accuracy.DEFAULT_OPTIONS,
                        help="options of the time-to-accuracy run (default: %(default)r)")
    parser.add_argument("--no-tta", action="store_true", help="skip the time-to-accuracy runs")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
    parser.add_argument("--no-hosts", action="store_true",
                        help="skip the rows across 2 fake hosts (network namespaces: they need root and `ip`)")
    parser.add_argument("--gemm", choices=GEMMS, default="auto",
                        help="the library of ddptrain's matrix products, as ddptrain's --gemm (default: %(default)s); "
                             "where it is MKL, rows with --gemm numpy are added")
    parser.add_argument("--denormals", choices=DENORMAL_MODES, default="flush",
                        help="ddptrain's --denormals in its rows (default: %(default)s, as in a run)")
    parser.add_argument("--isa", choices=("native", "avx2"), default="native",
                        help="the vector instructions every library may use in every row: the CPU's own "
                             "(default), or AVX2 only, to measure a CPU without AVX-512 on one with it")
    parser.add_argument("--json", metavar="PATH", help="also write every measurement to PATH")
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings, to check that the benchmark runs (numbers meaningless)")
    # Internal: one measurement in this process (started by the benchmark itself).
    parser.add_argument("--worker", choices=("ddptrain", "torch", "gemm"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--threads-per-rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--no-allreduce", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--end-to-end", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shard-optimizer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--overlap-allreduce", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bucket-mb", type=float, default=0.25, help=argparse.SUPPRESS)
    parser.add_argument("--exchange", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--batchnorm", default="global", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)

    if opts.worker:
        from ddptrain import denormals
        use_images_of(opts.data)
        # ddptrain's rows flush denormals as its runs do (--denormals); PyTorch's keep its default.
        with denormals.flushed(opts.worker == "ddptrain" and opts.denormals == "flush"):
            {"ddptrain": worker_ddptrain, "torch": worker_torch, "gemm": worker_gemm}[opts.worker](opts)
        return 0
    return run_benchmark(opts)


def with_batchnorm(spec):
    """An MLP ``spec`` with a BatchNorm after every hidden layer: 784-512-256-10 -> 784-512-bn-256-bn-10."""
    from dataclasses import replace
    from ddptrain.spec import parse_spec
    tokens = parse_spec(spec).tokens
    return "-".join(map(str, [tokens[0], *(replace(t, batchnorm=True) for t in tokens[1:-1]), tokens[-1]]))


def run_benchmark(opts):
    opts.bn_model = opts.bn_model or with_batchnorm(opts.model)
    if opts.quick:
        opts.rounds, opts.repeats, opts.samples, opts.no_tta, opts.batch_sizes = 1, 2, 256, True, "32"
    batches = [int(b) for b in opts.batch_sizes.split(",")]
    opts.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    budget, ranks = opts.threads or opts.cores, opts.ranks
    per_rank = max(1, budget // ranks)
    if opts.data is None:
        from ddptrain.mnist import ensure_default_dataset
        opts.data = str(ensure_default_dataset())
    elif opts.data != RANDOM:
        opts.data = str(Path(opts.data).resolve())   # the workers run in the repository root
    use_images_of(opts.data)
    torch_ver = None if opts.no_torch or not torch_available() else torch_version()
    use_torch = torch_ver is not None
    limits = isa_environment(opts.isa)
    if limits and "avx2" not in cpu_flags():
        print("--isa avx2 needs an x86-64 CPU with AVX2", file=sys.stderr)
        return 2
    os.environ.update(limits)   # every row, the GEMM limit and the time-to-accuracy runs inherit it

    for line in machine_lines(opts, torch_ver):
        print(line, flush=True)
    if limits:
        print(f"vector code limited to AVX2 in every row (--isa avx2): "
              f"{', '.join(f'{name}={value!r}' for name, value in limits.items())}", flush=True)
    from ddptrain import gemm
    products = gemm.choose(opts.gemm)
    print(f"ddptrain's matrix products (--gemm {opts.gemm}): {products.description}", flush=True)
    data_note = "random data of MNIST's shape" if opts.data == RANDOM else f"real batches of {opts.data}"
    print(f"model {opts.model}, float32, {flops_per_sample(opts.model) / 1e6:.2f} MFLOP per sample per step; "
          f"{data_note}; thread budget {budget}; {opts.rounds} rounds x {opts.repeats} repetitions of "
          f"{opts.samples:,} samples per row, after warmup", flush=True)

    # The machine's GEMM limit: one process with every thread, and `ranks` single-thread processes at
    # once (the larger is the limit), measured in every round like the rows, so that both see the
    # machine in the same state; the table uses the median over the rounds.
    gemm_batch, gemm_steps, gemm_repeats = (256, 2, 3) if opts.quick else (4096, 6, 5)
    per_sample = flops_per_sample(opts.model)
    gemm_rounds = []

    def measure_gemm():
        def gemm(processes, threads):
            return launch("gemm", processes, threads, gemm_batch, gemm_steps, 0, gemm_repeats, opts)
        all_threads, one_core = gemm(1, budget), gemm(1, 1)
        at_once = gemm(ranks, per_rank) if ranks > 1 else all_threads
        gemm_rounds.append({"all_threads": all_threads, "one_core": one_core, "ranks": at_once,
                            "limit": max(all_threads["flops"], at_once["flops"])})
        print(f"  GEMM limit: {all_threads['flops'] / 1e9:.0f} GFLOP/s in 1 process x {budget} threads, "
              f"{at_once['flops'] / 1e9:.0f} in {ranks} processes x {per_rank} thread at once, "
              f"{one_core['flops'] / 1e9:.0f} on one core alone", flush=True)

    # (key, label, worker, processes, threads per process, extra worker arguments). ddptrain's rows
    # pass 0 threads unless --threads is given: ddptrain.threads.configure_blas_threads chooses, as in a run.
    rows = [("ddp1", f"ddptrain, 1 process x {budget} threads", "ddptrain", 1, opts.threads, ()),
            ("ddpP", f"ddptrain, {ranks} MPI ranks x {per_rank} thread", "ddptrain", ranks,
             per_rank if opts.threads else 0, ("--end-to-end",)),
            ("ddpP0", "  same ranks, no allreduce (diagnostic)", "ddptrain", ranks,
             per_rank if opts.threads else 0, ("--no-allreduce",)),
            ("ddpPa", "  same ranks, --exchange allreduce", "ddptrain", ranks,
             per_rank if opts.threads else 0, ("--exchange", "allreduce")),
            ("ddpPz", "  same ranks, --shard-optimizer", "ddptrain", ranks,
             per_rank if opts.threads else 0, ("--shard-optimizer",))]
    if products.name == "mkl":   # what numpy's own BLAS gives on this CPU
        rows[1:1] = [("ddp1n", "  same process, --gemm numpy", "ddptrain", 1, opts.threads, ("--gemm", "numpy"))]
        rows.insert(3, ("ddpPn", "  same ranks, --gemm numpy", "ddptrain", ranks, per_rank if opts.threads else 0,
                        ("--gemm", "numpy")))
    if use_torch:
        rows += [("torch1", f"PyTorch, 1 process x {budget} threads", "torch", 1, budget, ()),
                 ("torchP", f"PyTorch DDP gloo, {ranks} x {per_rank} thread", "torch", ranks, per_rank, ())]
    if not opts.no_bn and ranks > 1:
        bn = ("--model", opts.bn_model)
        rows += [("ddpPbn", f"ddptrain, {ranks} ranks, BN global statistics", "ddptrain", ranks,
                  per_rank if opts.threads else 0, bn),
                 ("ddpPbnl", f"ddptrain, {ranks} ranks, BN local statistics", "ddptrain", ranks,
                  per_rank if opts.threads else 0, (*bn, "--batchnorm", "local"))]
        if use_torch:
            rows.append(("torchPbn", f"PyTorch DDP gloo, {ranks} x {per_rank}, BatchNorm1d", "torch", ranks, per_rank,
                         bn))
    if not opts.no_cnn:
        cnn = ("--model", opts.cnn_model)
        rows += [("cnn1", f"ddptrain CNN, 1 process x {budget} threads", "ddptrain", 1, opts.threads, cnn),
                 ("cnnP", f"ddptrain CNN, {ranks} MPI ranks x {per_rank} thread", "ddptrain", ranks,
                  per_rank if opts.threads else 0, cnn)]
        if use_torch:
            rows += [("tcnn1", f"PyTorch CNN, 1 process x {budget} threads", "torch", 1, budget, cnn),
                     ("tcnnP", f"PyTorch CNN, DDP gloo, {ranks} x {per_rank} thread", "torch", ranks, per_rank, cnn)]
    if ranks > 1:
        rows.append(("ddpPo", "  same ranks, --overlap-allreduce", "ddptrain", ranks,
                     per_rank if opts.threads else 0, ("--overlap-allreduce",)))
    hosts_up = not opts.no_hosts and os.geteuid() == 0 and fake_hosts("up")
    if hosts_up:
        # One rank on each of 2 hosts that share this machine's cores: each gets half of them, as 2 ranks of
        # one host would, so that the rows differ only in where the gradient goes (TCP between hosts).
        rows += [("hosts", f"ddptrain, 2 hosts x 1 rank x {per_rank} thread", "ddptrain", 2, per_rank, ("--hosts",)),
                 ("hostso", "  same hosts, --overlap-allreduce", "ddptrain", 2, per_rank,
                  ("--hosts", "--overlap-allreduce"))]
    elif not opts.no_hosts:
        print("rows across 2 hosts: skipped (fake hosts need root and `ip`: scripts/fake-hosts.sh)", flush=True)
    if hosts_up:
        atexit.register(fake_hosts, "down")   # also when a row fails
    row_models = {key: dict(zip(extra[::2], extra[1::2])).get("--model", opts.model)
                  for key, _, _, _, _, extra in rows}

    results = {}
    for round_ in range(opts.rounds):
        measure_gemm()
        for batch in batches:
            for key, label, kind, n, threads, extra in rows:
                if kind == "torch" and n > 1:
                    extra += ("--port", str(free_port()))
                if round_ > 0:   # the end-to-end timings once per batch size are enough
                    extra = tuple(e for e in extra if e != "--end-to-end")
                print(f"  round {round_ + 1}/{opts.rounds}, batch {batch}: {label.strip()} ...", end="",
                      flush=True)
                cnn_row = row_models[key] == opts.cnn_model
                steps = max(4, (opts.cnn_samples if cnn_row else opts.samples) // batch)
                warmup = 3 if opts.quick else max(20 if not cnn_row else 5, 4096 // batch // (1 + 3 * cnn_row))
                result = launch(kind, n, threads, batch, steps, warmup, opts.repeats, opts, extra)
                print(f" {statistics.median(result['rates']):,.0f} samples/s", flush=True)
                entry = results.setdefault((key, batch), {"label": label, "rates": [], "runs": []})
                entry["rates"] += result["rates"]
                entry["runs"].append(result)

    def median_of(key):
        return statistics.median([g[key]["flops"] if key != "limit" else g["limit"] for g in gemm_rounds])

    limit = median_of("limit")
    print(f"\nGEMM limit ({gemm_rounds[0]['all_threads']['blas'].rsplit(',', 1)[0]}; the step's products at "
          f"batch {gemm_batch}; median of {len(gemm_rounds)} rounds): {median_of('all_threads') / 1e9:.0f} GFLOP/s "
          f"in 1 process x {budget} threads, {median_of('ranks') / 1e9:.0f} in {ranks} processes x {per_rank} "
          f"thread at once, {median_of('one_core') / 1e9:.0f} on one core alone; machine limit "
          f"{limit / 1e9:.0f} GFLOP/s = {limit / per_sample:,.0f} samples/s "
          f"({median_of('one_core') / per_sample:,.0f} on one core)")
    table, notes = report(results, rows, batches, limit, row_models, ranks, use_torch, opts.bn_model)
    print()
    print("\n".join(table))
    print()
    print("\n".join(notes), flush=True)

    tta = None
    if not opts.no_tta and opts.data != RANDOM:
        print(f"\ntime to 98% test accuracy, {ranks} ranks, {opts.tta_repeats} runs of the command line ...",
              flush=True)
        tta = time_to_accuracy.measure(opts.data, ranks, 98.0, opts.tta_args, opts.tta_repeats)
        for i, run in enumerate(tta["runs"], 1):
            epochs = ", ".join(f"{e['accuracy']:.2f}% at {e['at_seconds']:.2f} s" for e in run["epochs"])
            rates = ", ".join(f"{m['samples_per_second']:,.0f}" for m in run["metrics"])
            reached = "not reached" if run["seconds_to_target"] is None else f"{run['seconds_to_target']:.2f} s"
            print(f"  run {i}: 98% {reached} (whole run {run['total_seconds']:.2f} s); test accuracy per epoch: "
                  f"{epochs}; epoch rates incl. evaluation: {rates} samples/s")
        print(f"  `{tta['command']}`")
        print("time to 98% test accuracy: "
              + ("not reached in every run" if tta["median_seconds"] is None
                 else f"{tta['median_seconds']:.2f} s (median of {opts.tta_repeats})"))
    elif not opts.no_tta:
        print("\ntime to 98% test accuracy: skipped (random data)")

    print()
    print("\n".join(check_targets(results, batches, limit, per_sample, tta, use_torch, opts.isa)))
    if not opts.no_cnn:
        print("\n".join(check_cnn_targets(results, batches, ranks, use_torch)))
    if opts.json:
        Path(opts.json).write_text(json.dumps({
            "gemm": {"rounds": gemm_rounds, "limit_flops": limit},
            "rows": {f"{k}@{b}": v for (k, b), v in results.items()}, "time_to_accuracy": tta,
        }, indent=1, default=str))
    return 0


def report(results, rows, batches, limit, row_models, ranks, use_torch, bn_model):
    """The table (one line per row and batch size) and the notes under it. ``row_models``: each row's model."""
    flops = {key: flops_per_sample(spec) for key, spec in row_models.items()}   # per sample per training step
    header = (f"{'global batch':>12}  {'':<38} {'samples/s: median (min-max)':>29}  {'vs PyTorch':>10}  "
              f"{'allreduce':>9}  {'of GEMM limit':>13}  {'peak RSS/rank':>13}")
    table = [header, "-" * len(header)]
    partner = {"ddp1": "torch1", "ddp1n": "torch1", "ddpP": "torchP", "ddpPn": "torchP", "ddpPbn": "torchPbn",
               "ddpPbnl": "torchPbn", "cnn1": "tcnn1",
               "cnnP": "tcnnP"}
    for batch in batches:
        for key, label, *_ in rows:
            entry = results.get((key, batch))
            if entry is None:
                continue
            s = entry["summary"] = summarise(entry["rates"])
            other = results.get((partner.get(key), batch))
            ratio = f"{s['median'] / statistics.median(other['rates']):.2f}x" if other else ""
            fractions = [f for run in entry["runs"] for f in run.get("allreduce_fraction", [])]
            allreduce = f"{100 * statistics.median(fractions):.0f}%" if fractions and key in (
                "ddpP", "ddpPa", "ddpPbn", "ddpPbnl", "cnnP", "hosts") else ""
            rss = max(max(run["max_rss_mib"]) for run in entry["runs"])
            table.append(f"{batch:>12}  {label:<38} {fmt_rate(s):>29}  {ratio:>10}  {allreduce:>9}  "
                         f"{100 * s['median'] * flops[key] / limit:>12.0f}%  {rss:>9,.0f} MiB")
        table.append("")

    def runs(key):
        return [run for batch in batches for run in results.get((key, batch), {}).get("runs", [])]

    notes = []
    codes = {run["vector_code"] for key in ("ddp1", "ddpP") for run in runs(key) if "vector_code" in run}
    torch_codes = {run["vector_code"] for key in ("torch1", "torchP") for run in runs(key) if "vector_code" in run}
    if codes:
        notes.append(f"vector code the rows ran: ddptrain: {'; '.join(sorted(codes))}"
                     + (f"; PyTorch: {'; '.join(sorted(torch_codes))}" if torch_codes else ""))
    if runs("ddp1"):
        notes.append(f"ddptrain, 1 process: {runs('ddp1')[0]['thread_line']}; {runs('ddp1')[0]['blas']}")
    if runs("ddpP"):
        first = runs("ddpP")[0]
        notes.append(f"ddptrain, {ranks} ranks: {' '.join(first['library'].split())}; {first['thread_line']}")
        alone = [run["allreduce_alone_ms"] for run in runs("ddpP") if "allreduce_alone_ms" in run]
        if alone:
            notes.append(f"  the Allreduce of the whole gradient ({first['n_params']:,} float32, "
                         f"{4 * first['n_params'] / 1e6:.1f} MB) on its own: {statistics.median(alone):.2f} ms")
    alone = [run["allreduce_alone_ms"] for run in runs("torchP") if "allreduce_alone_ms" in run]
    if alone:
        notes.append(f"  gloo's all_reduce of the same gradient on its own: {statistics.median(alone):.2f} ms "
                     f"(DDP overlaps it with the backward, so no share of the step is shown)")
    for batch in batches:
        entry = results.get(("ddpPbn", batch))
        if entry:
            shares = [f for run in entry["runs"] for f in run.get("batchnorm_allreduce_fraction", [])]
            notes.append(f"batch normalisation, {ranks} ranks, batch {batch}: the BatchNorm layers' own Allreduces "
                         f"(statistics in the forward, two sums in the backward, each layer) take "
                         f"{100 * statistics.median(shares):.1f}% of a step; 'allreduce' is the gradient's")
    if results.get(("ddpPbn", batches[0])):
        notes.append(f"the BN rows train {bn_model} (its 'of GEMM limit' counts its matrix products only); PyTorch's "
                     f"SyncBatchNorm refuses CPU modules under DDP ('SyncBatchNorm layers only work with GPU "
                     f"modules'), so its row uses BatchNorm1d: each rank's own statistics, as ddptrain's local rows")
    # Each way of exchanging the gradient against --exchange allreduce (unsharded, through MPI).
    variants = (("ddpP", "gradient exchange through shared memory (the default)",
                 f"each rank updates 1/{ranks} of the shared parameters"),
                ("ddpPz", "--shard-optimizer (ZeRO-1 through MPI)",
                 "reduce-scatter and allgather in place of one Allreduce"))
    for key, what, how in variants:
        for batch in batches:
            variant, plain = results.get((key, batch)), results.get(("ddpPa", batch))
            if variant and plain:
                mib = [max(run["optimizer_bytes"]) / 2 ** 20 for run in (variant["runs"][0], plain["runs"][0])]
                notes.append(f"{what}, {ranks} ranks, batch {batch}: "
                             f"{statistics.median(variant['rates']) / statistics.median(plain['rates']):.2f}x the "
                             f"step rate of --exchange allreduce; momentum buffer {mib[0]:.2f} MiB per rank "
                             f"against {mib[1]:.2f} MiB ({how})")
    if runs("hosts"):
        first = runs("hosts")[0]
        alone = [run["allreduce_alone_ms"] for run in runs("hosts") if "allreduce_alone_ms" in run]
        notes.append(f"2 hosts x 1 rank: {first['hosts']}, network namespaces of this machine joined by veth pairs "
                     f"and a bridge (scripts/fake-hosts.sh); the gradient goes over TCP between them"
                     + (f"; its Allreduce on its own: {statistics.median(alone):.2f} ms" if alone else ""))
    for batch in batches:
        for plain, overlapped, where in (("ddpP", "ddpPo", f"{ranks} ranks on one host"),
                                         ("hosts", "hostso", "2 hosts x 1 rank")):
            a, b = results.get((plain, batch)), results.get((overlapped, batch))
            if a and b:
                notes.append(f"--overlap-allreduce, {where}, batch {batch}: "
                             f"{statistics.median(b['rates']) / statistics.median(a['rates']):.2f}x the step rate "
                             f"of one Allreduce after backward")
    cnn_key = next((key for key in ("cnn1", "cnnP") if results.get((key, batches[0]))), None)
    if cnn_key:
        first = results[(cnn_key, batches[0])]["runs"][0]
        notes.append(f"the CNN rows train {row_models[cnn_key]}: "
                     f"{first['n_params']:,} parameters, {flops[cnn_key] / 1e6:.2f} MFLOP per sample per training "
                     f"step; its convolutions' work arrays (im2col blocks) are in the peak RSS")
    notes += ["'allreduce': time inside comm.allreduce_, or the shared-memory exchange (waiting for the slower "
              "rank included) / step time.",
              "'of GEMM limit': samples/s x FLOPs per sample / the machine limit above.",
              "'peak RSS/rank': ru_maxrss, the largest over ranks and launches (the rank's shard included: uint8 "
              "pixels from a file)."]
    for batch in batches:
        for key, label in (("ddp1", "1 process"), ("ddpP", f"{ranks} ranks"),
                           ("ddpPbn", f"{ranks} ranks, {bn_model}, BN global statistics"),
                           ("cnn1", "CNN, 1 process"), ("cnnP", f"CNN, {ranks} ranks")):
            entry = results.get((key, batch))
            profile = entry and entry["runs"][0].get("profile_ms")
            if profile:
                total = sum(profile.values())
                parts = ", ".join(f"{name} {ms:.2f} ({100 * ms / total:.0f}%)"
                                  for name, ms in sorted(profile.items(), key=lambda item: -item[1]) if ms >= 0.005)
                notes.append(f"step of ddptrain, {label}, batch {batch} (rank 0, ms): {parts}")
    for batch in batches:
        entry = results.get(("ddpP", batch))
        run = entry["runs"][0] if entry else {}
        if run.get("eval_seconds") is not None:
            epoch = run["n_train"] / entry["summary"]["median"]
            notes.append(
                f"end to end, {ranks} ranks, batch {batch}: one epoch of training takes {epoch:.2f} s; "
                f"{run['load_what']} {run['load_seconds']:.3f} s ({100 * run['load_seconds'] / epoch:.1f}% of an "
                f"epoch, once per run); each epoch, evaluating the test set {run['eval_seconds']:.3f} s "
                f"({100 * run['eval_seconds'] / epoch:.1f}%) and writing a checkpoint (step and best) "
                f"{run['checkpoint_seconds']:.3f} s ({100 * run['checkpoint_seconds'] / epoch:.1f}%)")
    return table, notes


def check_cnn_targets(results, batches, ranks, use_torch):
    """Issue 12's aims for the CNN rows."""
    lines = ["targets for the CNN (issue 12):"]
    for batch in batches:
        for mine, theirs, need, what in (("cnn1", "tcnn1", 0.8, "1 process >= 0.8x PyTorch 1 process"),
                                         ("cnnP", "tcnnP", 1.5, f"{ranks} ranks >= 1.5x PyTorch DDP")):
            a, b = results.get((mine, batch)), results.get((theirs, batch))
            if a and b:
                ratio = statistics.median(a["rates"]) / statistics.median(b["rates"])
                lines.append(f"  [{'MET ' if ratio >= need else 'MISSED'}] ddptrain {what} at batch {batch}: "
                             f"{ratio:.2f}x")
    if not use_torch:
        lines.append(f"  (the PyTorch comparisons need PyTorch: {TORCH_INSTALL})")
    return lines


def check_targets(results, batches, limit, per_sample, tta, use_torch, isa="native"):
    """Issue 15's targets (ahead of PyTorch on every CPU), on this run's CPU."""
    lines = ["targets (issue 15, on this CPU" + (", its vector code limited to AVX2):" if isa == "avx2" else "):")]

    def median(key, batch):
        entry = results.get((key, batch))
        return statistics.median(entry["rates"]) if entry else None

    def line(ok, text):
        lines.append(f"  [{'MET ' if ok else 'MISSED'}] {text}")

    for batch in (128, 512):
        a, b = median("ddp1", batch), median("torch1", batch)
        if a and b:
            need = 1.15 if batch == 512 else 1.0
            line(a / b >= need, f"1 process >= {need}x PyTorch 1 process at batch {batch}: {a / b:.2f}x")
        mine = [r for r in (median("ddp1", batch), median("ddpP", batch)) if r]
        theirs = [r for r in (median("torch1", batch), median("torchP", batch)) if r]
        if mine and theirs:
            line(max(mine) / max(theirs) >= 1.1, f"best launch >= 1.1x PyTorch's best at batch {batch}: "
                                                 f"{max(mine) / max(theirs):.2f}x")
        a, b = median("ddpP", batch), median("torchP", batch)
        if a and b:
            line(a / b >= 2, f"2 ranks >= 2x PyTorch DDP at batch {batch}: {a / b:.2f}x")
    a = median("ddpP", 512)
    if a:
        fraction = a * per_sample / limit
        line(fraction >= 0.82, f"2 ranks at batch 512 >= 82% of the GEMM limit: {100 * fraction:.0f}%")
    entry = results.get(("ddp1", 128))
    profile = entry and entry["runs"][0].get("profile_ms")
    if profile:
        products = sum(ms for name, ms in profile.items() if name.startswith("matrix products") or "Allreduce" in name)
        share = 1 - products / sum(profile.values())
        line(share <= 0.15, f"element-wise share of a step (all but the matrix products and Allreduces), 1 process, "
                            f"batch 128 <= 15%: {100 * share:.0f}%")
    if tta is not None:
        seconds = tta["median_seconds"]
        line(seconds is not None and seconds < 4, "time to 98% test accuracy, 2 ranks, default options < 4 s: "
             + ("not reached" if seconds is None else f"{seconds:.2f} s"))
    if not use_torch:
        lines.append(f"  (the PyTorch comparisons need PyTorch: {TORCH_INSTALL})")
    return lines


if __name__ == "__main__":
    sys.exit(main())
