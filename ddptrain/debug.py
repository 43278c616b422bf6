"""``--debug``: checks that say *where* a gradient is wrong.

* At the first step, the full model's allreduced gradient is compared with
  central finite differences of the **global-batch** loss, on a few random
  coordinates of every parameter. The loss is evaluated exactly as training
  defines it: every rank's share of the per-sample loss sum divided by the
  global batch size, added up with an Allreduce. A gradient normalised by the
  local instead of the global batch, a missing Allreduce or a wrong backward
  shows up here, with the parameter, the two values and their ratio.
* After every layer, forward and backward, a NaN or Inf stops training with
  the layer named.
* The parameters are compared across ranks every step (``check_every = 1``).

All of it runs in float64, where central differences are accurate to about
1e-8 relative; everything here is collective and deterministic, so every rank
reaches the same verdict.
"""

from __future__ import annotations

import numpy as np

from .errors import NumericalError
from .train import Callback


class GradientCheckError(RuntimeError):
    """Backpropagation disagrees with finite differences of the global-batch loss."""

    all_ranks = True
    show_traceback = False


def describe_layer(layer):
    return f"layer {layer.name} ({layer.label()})"


class FiniteChecker:
    """Called after each layer's forward and backward (``Sequential.observer``); raises on NaN or Inf."""

    def __init__(self):
        self.step = None

    def __call__(self, direction, layer, array):
        if array is not None and not np.isfinite(array).all():
            where = "output" if direction == "forward" else "input gradient"
            raise NumericalError(f"NaN or Inf in the {where} of {describe_layer(layer)} "
                                 f"during the {direction} pass of step {self.step}")
        if direction == "backward":
            for name, grad in layer.grads.items():
                if not np.isfinite(grad).all():
                    raise NumericalError(f"NaN or Inf in the gradient of {layer.name}.{name} "
                                         f"({describe_layer(layer)}) at step {self.step}")


def sample_coordinates(model, seed=0):
    """Two ``(name, index within the array, index in model.params)`` per parameter array.

    The coordinate with the largest gradient (so that a wrong scale cannot
    hide behind gradients that are zero, like those of MNIST's blank border
    pixels) and one drawn at random among the non-zero ones.
    """
    rng = np.random.default_rng(seed)
    chosen, offset = [], 0
    for (name, array), (_, grad) in zip(model.named_params(), model.named_grads()):
        magnitude = np.abs(grad).ravel()
        picks = {int(magnitude.argmax())}
        nonzero = np.flatnonzero(magnitude)
        if len(nonzero):
            picks.add(int(rng.choice(nonzero)))
        chosen += [(name, index, offset + index) for index in sorted(picks)]
        offset += array.size
    return chosen


def global_loss(model, loss_fn, comm, x, y, global_count):
    """The mean loss over the global batch: the ranks' shares, summed."""
    share = loss_fn.forward(model.forward(x), y, normaliser=global_count)
    return comm.allreduce(float(share))   # DDP


def check_gradient(model, loss_fn, comm, x, y, global_count, step, eps=1e-6, rtol=1e-5, atol=1e-9, seed=0):
    """Compare ``model.grads`` (already allreduced) with central differences of the global-batch loss.

    Returns the list of ``(name, index, backprop, numeric)`` checked; raises
    GradientCheckError naming the worst coordinate if any disagrees. The
    model's buffers (which a forward pass in training mode may update, such
    as running statistics) are as they were afterwards.
    """
    if model.params.dtype != np.float64:
        raise ValueError("the finite-difference check needs float64 parameters")
    buffers = model.buffers.copy()
    try:
        checked, worst = _compare(model, loss_fn, comm, x, y, global_count, eps, rtol, atol, seed)
    finally:
        model.buffers[...] = buffers
    if worst is not None:
        error, name, index, backprop, numeric = worst
        array = dict(model.named_params())[name]
        position = np.unravel_index(index, array.shape)
        ratio = backprop / numeric if numeric else float("inf")
        raise GradientCheckError(
            f"gradient check failed at step {step}: {name}{list(map(int, position))}: backprop + allreduce "
            f"gives {backprop:.6g}, finite differences of the global-batch loss give {numeric:.6g} "
            f"(ratio {ratio:.4g}, relative error {error:.2g}). A ratio equal to the number of ranks, or to "
            f"global/local batch size, points at a loss normalised by the local instead of the global batch")
    return checked


def _compare(model, loss_fn, comm, x, y, global_count, eps, rtol, atol, seed):
    """The coordinates checked, and the worst disagreement among them (or None)."""
    checked, worst = [], None
    for name, index, flat in sample_coordinates(model, seed):
        original = model.params[flat]
        model.params[flat] = original + eps
        plus = global_loss(model, loss_fn, comm, x, y, global_count)
        model.params[flat] = original - eps
        minus = global_loss(model, loss_fn, comm, x, y, global_count)
        model.params[flat] = original
        numeric, backprop = (plus - minus) / (2 * eps), float(model.grads[flat])
        error = abs(backprop - numeric) / max(abs(backprop), abs(numeric), atol)
        checked.append((name, index, backprop, numeric))
        # atol: central differences of a float64 loss of order 1 are good to ~1e-10 absolute.
        if abs(backprop - numeric) > atol + rtol * max(abs(backprop), abs(numeric)) \
                and (worst is None or error > worst[0]):
            worst = (error, name, index, backprop, numeric)
    return checked, worst


class DebugChecks(Callback):
    """``--debug``: NaN/Inf checks after every layer, and the finite-difference check at the first step.

    The gradient check runs inside the first step (``TrainStep.after_reduce``):
    after the Allreduce, before the update, on the very gradient the step applies.
    """

    def __init__(self, console, seed=0):
        self.console, self.seed = console, seed
        self.finite_checker = FiniteChecker()
        self._trainer = None

    def on_fit_start(self, trainer):
        self._trainer = trainer
        trainer.model.observer = self.finite_checker
        trainer.train_step.after_reduce.append(self._check_gradient_once)

    def on_step_start(self, trainer):
        self.finite_checker.step = trainer.position.step

    def _check_gradient_once(self, x, y, global_count):
        step = self._trainer.train_step
        step.after_reduce.remove(self._check_gradient_once)
        checked = check_gradient(step.model, step.loss_fn, step.comm, x, y, global_count,
                                 self._trainer.position.step, seed=self.seed)
        worst = max(abs(b - n) / max(abs(b), abs(n), 1e-9) for _, _, b, n in checked)
        self.console.print(f"debug: at step {self._trainer.position.step} the allreduced gradient agrees with "
                           f"finite differences of the global-batch loss on {len(checked)} coordinates "
                           f"(worst relative error {worst:.1e})", always=True)
