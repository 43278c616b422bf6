"""A model of your own, with a layer of your own, trained on Fashion-MNIST through ddptrain's Python
API.

    mpiexec -n 2 .venv/bin/python scripts/custom_model.py    # 2 ranks
    .venv/bin/python scripts/custom_model.py                 # one process: the same training

The layer is a PReLU (He et al. 2015): a ReLU whose slope for negative inputs
is learnt, one per feature. It shows everything a layer needs (see "Writing
a layer" in the README): its parameters declared by shape (ddptrain keeps
them in the model's flat arrays, so the one Allreduce of a step and the
optimiser cover them with no further code), a forward that keeps what its
backward needs, and a backward that fills its gradients and returns the
input's. ``ddptrain.gradcheck`` checks it against finite differences before
anything trains.

Fashion-MNIST is prepared into the cache on first use (from the Debian
package ``dataset-fashion-mnist`` when installed, else downloaded);
``--data FILE`` trains on another data file of 28x28 images in 10 classes.
"""

from __future__ import annotations

import argparse

import numpy as np

import ddptrain
from ddptrain import nn


class PReLU(nn.Layer):
    """``y = x`` where ``x > 0``, ``y = a * x`` elsewhere, with one learnt slope ``a`` per
    feature."""

    def __init__(self, n_features, slope=0.25):
        super().__init__()
        self.n_features, self.slope = int(n_features), float(slope)

    def config(self):
        """The constructor's arguments: what rebuilds this layer from a checkpoint."""
        return {"n_features": self.n_features, "slope": self.slope}

    def label(self):
        return f"PReLU {self.n_features}"

    def param_shapes(self):
        return {"slope": (self.n_features,)}

    def init_params(self, rng):
        self.params["slope"][...] = self.slope

    def output_shape(self, input_shape):
        if tuple(input_shape) != (self.n_features,):
            raise nn.ShapeError(f"{self.name} ({self.label()}) takes {self.n_features} features, "
                                f"not {input_shape}")
        return (self.n_features,)

    def forward(self, x):
        self._x = x                                  # what backward needs
        return np.where(x > 0, x, self.params["slope"] * x)

    def backward(self, dout, need_input_grad=True):
        negative = self._x <= 0
        # Overwrite (never add to) the gradients: one backward, one gradient. It is a sum over the
        # batch, so the loss's normalisation by the global batch carries through unchanged.
        self.grads["slope"][...] = np.sum(np.where(negative, self._x * dout, 0), axis=0)
        return np.where(negative, self.params["slope"] * dout, dout) if need_input_grad else None


def build_model(dtype=np.float32, seed=0, hidden=(512, 256), n_inputs=784, n_classes=10):
    """Linear layers with PReLUs between them: 784 -> 512 -> 256 -> 10."""
    sizes, layers = (n_inputs, *hidden), []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), PReLU(n_out)]
    layers.append(nn.Linear(sizes[-1], n_classes, init="glorot"))
    return nn.Sequential(layers, dtype=dtype, seed=seed)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="fashion-mnist",
                        help="a data file, or a set's name (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--run-dir", default=None, help="default: runs/<date-time>")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    ddptrain.gradcheck(PReLU(8), input_shape=(8,))   # raises if the backward above were wrong
    model = build_model(seed=args.seed)
    result = ddptrain.train(model, data=args.data, epochs=args.epochs, batch_size=128, lr=0.05,
                            momentum=0.9, nesterov=True, weight_decay=5e-4, seed=args.seed,
                            run_dir=args.run_dir, quiet=True)
    # Every rank holds the same result (and the same trained model): print it once.
    if result.rank == 0:
        print(f"{model.summary()}: test accuracy {100 * result.test_accuracy:.2f}% after "
              f"{result.epochs} epochs on {result.world_size} rank(s), in {result.seconds:.1f} s; "
              f"run folder {result.run_dir}")


if __name__ == "__main__":
    main()
