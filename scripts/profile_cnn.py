"""Time each layer's forward and backward, and a whole training step, of a CNN on random data.

    python scripts/profile_cnn.py                      # cnn, batch 128 and 512, 1 and 2 threads
    python scripts/profile_cnn.py --old /tmp/old_nn    # A/B against copies of older layer modules
    python scripts/profile_cnn.py --gemm auto          # the products by the library training takes

``--old DIR`` loads ``conv.py``, ``normalization.py``, ``pooling.py`` and
``layers.py`` from DIR (those present) and builds a second model of the same
layers from their classes. The two models are timed alternately, repetition
by repetition, so that a machine busy with other jobs slows both alike; the
figures are medians (ms). The products run on numpy's BLAS unless ``--gemm`` says otherwise
(``auto``: MKL on an Intel CPU where it is installed, as ``python -m ddptrain`` does).
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import statistics
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ddptrain.backends import gemm  # noqa: E402
from ddptrain.nn.layer import LAYER_TYPES  # noqa: E402
from ddptrain.nn.losses import SoftmaxCrossEntropy  # noqa: E402
from ddptrain.nn.model import Sequential  # noqa: E402
from ddptrain.nn.spec import parse_spec  # noqa: E402
from ddptrain.optim.optimizers import SGD  # noqa: E402


def old_classes(folder):
    """The layer classes of the modules in ``folder``, by class name (the registry left as it
    was)."""
    registry, classes = dict(LAYER_TYPES), {}
    for stem in ("conv", "normalization", "pooling", "layers"):
        path = pathlib.Path(folder) / f"{stem}.py"
        if not path.exists():
            continue
        spec = importlib.util.spec_from_file_location(f"old_{stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        classes.update({name: cls for name, cls in vars(module).items()
                        if isinstance(cls, type) and name in registry})
    LAYER_TYPES.clear()
    LAYER_TYPES.update(registry)
    return classes


def build(spec, backend, classes=None):
    layers = parse_spec(spec).layers((1, 28, 28))
    model = Sequential(layers, seed=0)
    if classes:
        older = Sequential([classes.get(type(layer).__name__, type(layer))(**layer.config())
                            for layer in layers], seed=0)
        # Older copies may predate planning their own in-place work (Layer.plan_in_place: before
        # it, Sequential planned ReLUs by their class, which the copies are not): each older layer
        # takes the plan of its twin where it has that switch (a ReLU's in_place).
        for twin, layer in zip(model.layers, older.layers):
            for switch in ("in_place", "grad_over_input"):
                if hasattr(layer, switch):
                    setattr(layer, switch, getattr(twin, switch))
        model = older
    model.use_backend(backend)
    return model


class Timed:
    """A model, its data, and the times of its passes, per layer and per step."""

    def __init__(self, model, batch):
        rng = np.random.default_rng(0)
        self.model, self.loss, self.optimizer = model, SoftmaxCrossEntropy(), SGD(momentum=0.9)
        self.x = rng.random((batch, 1, 28, 28), dtype=np.float32)
        self.y = rng.integers(0, 10, batch)
        self.layer_times = {(i, p): [] for i in range(len(model.layers)) for p in "fb"}
        self.step_times = []

    def layers_once(self):
        layers, clock = self.model.layers, time.perf_counter
        x = self.x
        for i, layer in enumerate(layers):
            start = clock()
            x = layer.forward(x)
            self.layer_times[i, "f"].append(clock() - start)
        self.loss.forward(x, self.y, len(self.x))
        dout = self.loss.backward()
        for i in range(len(layers) - 1, -1, -1):
            start = clock()
            dout = layers[i].backward(dout, need_input_grad=i > 0)
            self.layer_times[i, "b"].append(clock() - start)

    def step_once(self):
        start = time.perf_counter()
        self.loss.forward(self.model.forward(self.x), self.y, len(self.x))
        self.model.backward(self.loss.backward())
        self.optimizer.step(self.model.params, self.model.grads, 0.01)
        self.step_times.append(time.perf_counter() - start)


def ms(times):
    return 1e3 * statistics.median(times)


def report(runs, batch, threads):
    names = list(runs)
    print(f"\nbatch {batch}, {threads} thread(s): median ms" + (
        f" ({' / '.join(names)})" if len(names) > 1 else ""))
    first = runs[names[0]]
    for i, layer in enumerate(first.model.layers):
        cells = []
        for p in "fb":
            values = [ms(runs[name].layer_times[i, p]) for name in names]
            cells.append(" / ".join(f"{v:6.2f}" for v in values))
        print(f"  {layer.label():32s} fwd {cells[0]}   bwd {cells[1]}")
    for p in "fb":
        totals = [sum(ms(runs[name].layer_times[i, p]) for i in range(len(first.model.layers)))
                  for name in names]
        print(f"  {'sum ' + ('forward' if p == 'f' else 'backward'):32s} "
              + " / ".join(f"{v:6.2f}" for v in totals))
    steps = [ms(runs[name].step_times) for name in names]
    ratio = f"   (new/old {steps[0] / steps[1]:.3f})" if len(steps) > 1 else ""
    print(f"  {'whole step (fwd+bwd+SGD)':32s} " + " / ".join(f"{v:6.2f}" for v in steps) + ratio)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--batch", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--old", help="a folder of older layer modules to compare with")
    parser.add_argument("--gemm", choices=gemm.GEMMS, default="numpy",
                        help="the library of the products (default: numpy's BLAS)")
    args = parser.parse_args(argv)
    classes = old_classes(args.old) if args.old else None
    choice = gemm.choose(args.gemm)
    backend = gemm.backend(choice)
    print(f"matrix products: {choice.description}")
    for threads in args.threads:
        for batch in args.batch:
            runs = {"new": Timed(build(args.model, backend), batch)}
            if classes:
                runs["old"] = Timed(build(args.model, backend, classes), batch)
            with threadpool_limits(threads):
                for run in runs.values():   # warm: work arrays allocated
                    run.layers_once()
                    run.step_once()
                for _ in range(args.repeats):
                    for run in runs.values():
                        run.layers_once()
                        run.step_once()
            report(runs, batch, threads)


if __name__ == "__main__":
    main()
