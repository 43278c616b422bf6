"""The PyTorch rows' worker, and ddptrain's layers as PyTorch modules.

PyTorch is imported inside the functions: the benchmark runs without it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from ddptrain.nn import AvgPool2d, BatchNorm, Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU

from . import workload
from .ddptrain_internals import rank_and_size
from .environment import max_rss_mib
from .step_timing import time_allreduce
from .workload import Plan, load_shard, model_layers, train_blocks


def worker_torch(args):
    """PyTorch: the idiomatic loop, in one process or as one DDP (gloo) process of several."""
    import torch
    import torch.distributed as dist
    from torch import nn

    rank, size = torch_world(args)
    train_x, train_y, n_train = load_shard(args.data, rank, size, "train", train_blocks(rank, size),
                                           as_stored=False)
    layers = torch_layers(args.model)
    # Shaped once, outside the timed steps, as the model takes them (ddptrain's Flatten is a view,
    # as reshape is).
    x_all = torch.from_numpy(train_x.reshape(len(train_x), *torch_input_shape(args.model)))
    y_all = torch.from_numpy(train_y)
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
    leave_torch_world(size)


def torch_world(args):
    """``(rank, size)`` of this PyTorch worker, its threads set, and with several ranks its gloo
    process group begun."""
    import torch
    import torch.distributed as dist

    rank, size = rank_and_size()
    torch.set_num_threads(args.threads_per_rank)
    if size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
        dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=size)
    return rank, size


def leave_torch_world(size):
    """With several ranks, end this process once every rank is here, skipping gloo's teardown: it
    sometimes aborts at exit ("terminate called without an active exception") after everything
    is measured and written."""
    if size > 1:
        import torch.distributed as dist

        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def torch_layers(spec):
    """The PyTorch modules of ddptrain's layers for a --model spec, layer for layer."""
    from torch import nn

    modules, shape = [], torch_input_shape(spec)
    for layer in model_layers(spec):
        if isinstance(layer, Conv2d):
            modules.append(nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                                     stride=layer.stride, padding=layer.padding, bias=layer.bias))
        elif isinstance(layer, BatchNorm):   # SyncBatchNorm refuses CPU modules under DDP
            norm = nn.BatchNorm2d if len(shape) == 3 else nn.BatchNorm1d
            modules.append(norm(layer.num_features))
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
            raise TypeError(f"no PyTorch module for {layer.label()}")
        shape = layer.output_shape(shape)
    return modules


def torch_input_shape(spec):
    """One sample as the model takes it: (1, 28, 28) for a CNN, the 28x28 image for an MLP (which
    flattens it)."""
    return (1, *workload.IMAGE) if model_layers(spec)[0].takes_channels else workload.IMAGE
