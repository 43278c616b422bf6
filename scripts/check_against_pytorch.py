#!/usr/bin/env python3
"""ddptrain's forward and backward against PyTorch's, on the same model with the same weights
(float64).

Builds a --model spec in ddptrain and, layer for layer, in PyTorch (the
mapping of scripts/benchmark.py), copies ddptrain's initial weights into the
PyTorch modules, runs one batch of random images forward through both with
the softmax cross-entropy loss and backward, and prints the largest relative
difference of the outputs and of every parameter's gradient. Dropout draws
different masks in the two libraries: leave it out of the spec.

    .venv/bin/pip install torch==2.13.0    # PyTorch is never a dependency of ddptrain
    .venv/bin/python scripts/check_against_pytorch.py \\
        --model conv16k5-bn-maxpool2-conv32k5-bn-maxpool2-flatten-128-10

Exits 1 when a difference exceeds 1e-10.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))   # benchmark.py, beside this file

import benchmark  # noqa: E402

TOLERANCE = 1e-10


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model",
                        default="conv16k5-bn-maxpool2-conv32k5-bn-maxpool2-flatten-128-10")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)
    import torch

    from ddptrain.nn.losses import SoftmaxCrossEntropy
    from ddptrain.nn.model import Sequential

    model = Sequential.from_spec(args.model, dtype=np.float64, input_shape=benchmark.IMAGE, seed=1)
    reference = torch.nn.Sequential(*benchmark.torch_layers(args.model)).double()
    ours = [layer for layer in model.layers if layer.params]
    theirs = [module for module in reference if any(True for _ in module.parameters())]
    with torch.no_grad():   # ddptrain's Linear weights are (in, out), PyTorch's (out, in)
        for layer, module in zip(ours, theirs):
            weight = layer.params["weight"]
            module.weight.copy_(torch.from_numpy(weight.T.copy() if weight.ndim == 2 else weight))
            if "bias" in layer.params:
                module.bias.copy_(torch.from_numpy(layer.params["bias"]))

    rng = np.random.default_rng(0)
    x = rng.random((args.batch, *benchmark.IMAGE))
    y = rng.integers(0, 10, args.batch)
    loss = SoftmaxCrossEntropy()
    out = model.forward(model.as_input(x))
    loss.forward(out, y, len(x))
    model.backward(loss.backward())
    expected = reference(torch.from_numpy(x.reshape(len(x),
                                                    *benchmark.torch_input_shape(args.model))))
    torch.nn.functional.cross_entropy(expected, torch.from_numpy(y)).backward()

    def relative(a, b):
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))

    rows = [("output (logits)", relative(out, expected.detach().numpy()))]
    for layer, module in zip(ours, theirs):
        grad = module.weight.grad.numpy()
        rows.append((f"{layer.name}.weight",
                     relative(layer.grads["weight"], grad.T if grad.ndim == 2 else grad)))
        if "bias" in layer.grads:
            rows.append((f"{layer.name}.bias",
                         relative(layer.grads["bias"], module.bias.grad.numpy())))
    print(f"{args.model} against PyTorch {torch.__version__}, float64, batch {args.batch}:")
    for name, difference in rows:
        print(f"  {name:<24} largest relative difference {difference:.1e}")
    worst = max(difference for _, difference in rows)
    print(f"{'agree' if worst <= TOLERANCE else 'DIFFER'}: largest {worst:.1e} "
          f"(tolerance {TOLERANCE:.0e})")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
