"""A named model's whole training recipe in PyTorch: the other side of the time to accuracy.

``--worker torch-recipe --model cnn-fast`` trains what ``python -m ddptrain
--model cnn-fast`` trains, the PyTorch way, in one process or as one DDP
(gloo) process of several, and prints after each epoch the line
``time_to_accuracy.py`` watches for (``epoch N/M done: ... test accuracy
XX.XX%``), so that both are timed by the same clock, from the launch of the
command to the first line at the target.

The same recipe: the named model's network (``torch_rows.torch_layers``,
layer for layer), its initialisation (He's normal for convolutions and
hidden layers, Glorot's uniform for the output layer, zero biases), its
training defaults (``NAMED_MODELS``: epochs, global batch, SGD with momentum,
Nesterov and weight decay on every parameter, and the learning rate of
ddptrain's own schedule at every step: for ``cnn-fast`` linear warmup then
cosine decay to 0) and the same data (the file's
pixels / 255, every training row once an epoch in a new random order, the
last batch smaller). What differs is PyTorch's own way: each rank
normalises its batch over its own rows (SyncBatchNorm refuses CPU modules),
and the rows are drawn by a permutation of the whole set each epoch, split
among the ranks as ``DistributedSampler`` splits it. The data are held in
memory as float32 tensors and indexed a batch at a time (faster than a
``DataLoader`` of single rows); rank 0 evaluates the test set after each
epoch, as ddptrain's rank 0 does, while the others wait.
"""

from __future__ import annotations

import math
import time

import h5py
import numpy as np

from .ddptrain_internals import NAMED_MODELS, Config, schedule_learning_rate
from .torch_rows import leave_torch_world, torch_input_shape, torch_layers, torch_world

PIXEL_MAX = 255.0
EVAL_BATCH = 2000


def recipe(name):
    """The named model's spec and its training options: a ``Config`` of its training defaults,
    with ddptrain's own defaults where it sets none (so the learning rate is ddptrain's schedule,
    ``schedule_learning_rate``, step by step)."""
    named = NAMED_MODELS[name]
    return named.spec, Config(**named.defaults)


def initialise(model):
    """ddptrain's initialisation: He's normal for convolutions and hidden linear layers, Glorot's
    uniform for the last linear layer, zero biases; BatchNorm's weight 1 and bias 0."""
    from torch import nn

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            if module is linears[-1]:
                fan_out = module.weight.shape[0]
                limit = math.sqrt(6.0 / (fan_in + fan_out))
                nn.init.uniform_(module.weight, -limit, limit)
            else:
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_in))
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def load(path, split):
    with h5py.File(path, "r") as f:
        images = f[f"{split}/images"][:]
        labels = f[f"{split}/labels"][:]
    return (np.divide(images, PIXEL_MAX, dtype=np.float32), labels.astype(np.int64))


def worker_torch_recipe(args):
    """Train ``args.model``'s recipe in PyTorch, printing an epoch line after each epoch."""
    import torch
    import torch.distributed as dist
    from torch import nn

    rank, size = torch_world(args)
    spec, options = recipe(args.model)
    shape = torch_input_shape(spec)
    train_x, train_y = (torch.from_numpy(a) for a in load(args.data, "train"))
    train_x = train_x.reshape(len(train_x), *shape)
    if rank == 0:
        test_x, test_y = (torch.from_numpy(a) for a in load(args.data, "test"))
        test_x = test_x.reshape(len(test_x), *shape)
    torch.manual_seed(args.seed)
    model = nn.Sequential(*torch_layers(spec))
    initialise(model)
    trained = nn.parallel.DistributedDataParallel(model) if size > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=options.lr, momentum=options.momentum,
                                nesterov=options.nesterov, weight_decay=options.weight_decay)
    criterion = nn.CrossEntropyLoss()
    epochs, batch = options.epochs, options.batch_size
    n = len(train_x)
    steps_per_epoch = -(-n // batch)
    generator = torch.Generator().manual_seed(args.seed)
    step = 0
    for epoch in range(epochs):
        began = time.perf_counter()
        trained.train()
        order = torch.randperm(n, generator=generator)   # the same on every rank
        for first in range(0, n, batch):
            rows = order[first:first + batch][rank::size]   # DistributedSampler's split
            for group in optimizer.param_groups:
                group["lr"] = schedule_learning_rate(options, step, steps_per_epoch)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(trained(train_x[rows]), train_y[rows])
            # DDP averages the ranks' gradients: the mean over the global batch when the shares
            # are equal (the last batch's may differ by one row)
            loss.backward()
            optimizer.step()
            step += 1
        seconds = time.perf_counter() - began
        if rank == 0:
            accuracy = evaluate(model, test_x, test_y)
            print(f"epoch {epoch + 1}/{epochs} done: loss {loss.item():.4f}, {seconds:.2f} s, "
                  f"test accuracy {100 * accuracy:.2f}%", flush=True)
        if size > 1:
            dist.barrier()
    leave_torch_world(size)


def evaluate(model, x, y):
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for first in range(0, len(x), EVAL_BATCH):
            logits = model(x[first:first + EVAL_BATCH])
            correct += int((logits.argmax(1) == y[first:first + EVAL_BATCH]).sum())
    return correct / len(x)
