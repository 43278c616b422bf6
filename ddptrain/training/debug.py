"""``--debug``: checks that say *where* a gradient is wrong.

* At the first step, the full model's allreduced gradient is compared with
  central finite differences of the **global-batch** loss, on a few
  coordinates of every parameter. That loss is computed independently of the
  distributed code path, as one process would: the global batch is gathered
  on every rank and goes through the model in one piece (batch statistics of
  the whole batch, dropout masks by position, the per-sample losses summed and
  divided by the global batch size). A gradient normalised by the local
  instead of the global batch, a missing Allreduce, batch statistics of one
  rank's rows instead of the global batch's, or a wrong backward shows up
  here, with the parameter, the two values and their ratio. (With
  ``--batchnorm local`` the loss checked is the one that mode trains: each
  rank's rows normalised by their own statistics.)
* After every layer, forward and backward, a NaN or Inf stops training with
  the layer named.
* The parameters are compared across ranks every step (``check_every = 1``).

All of it runs in float64, where central differences are accurate to about
1e-8 relative; everything here is collective and deterministic, so every rank
reaches the same verdict.
"""

from __future__ import annotations

import numpy as np

from ddptrain.errors import NumericalError
from ddptrain.nn.dropout import BatchContext
from ddptrain.nn.layer import no_reduction
from ddptrain.training.trainer import Callback


class GradientCheckError(RuntimeError):
    """Backpropagation disagrees with finite differences of the global-batch loss."""

    all_ranks = True
    show_traceback = False


def describe_layer(layer):
    return f"layer {layer.name} ({layer.label()})"


class FiniteChecker:
    """Called after each layer's forward and backward (``Sequential.observer``); raises on NaN or
    Inf."""

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


class GlobalBatch:
    """The whole global batch of a step, gathered on every rank, and its loss as one process
    computes it."""

    def __init__(self, comm, x, y, context, global_count):
        # DDP (--debug only): every rank's rows, labels and positions in the global batch, in rank
        # order.
        self.parts = comm.allgather((np.array(x), np.array(y), np.asarray(context.positions)))
        self.seed, self.step, self.count = context.seed, context.step, global_count

    def loss(self, model, loss_fn, per_rank_statistics=False):
        """The mean loss over the global batch, from this process alone (no collective).

        The rows go through the model in one piece, in their order in the
        batch, so that batch statistics are the whole batch's; with
        ``per_rank_statistics`` each rank's rows go through on their own, as
        ``--batchnorm local`` trains.
        """
        previous = model.sum_over_ranks
        model.set_sum_over_ranks(no_reduction)
        try:
            pieces = self.parts if per_rank_statistics else [self._whole()]
            return sum(self._piece_loss(model, loss_fn, *piece) for piece in pieces)
        finally:
            model.set_sum_over_ranks(previous)

    def _whole(self):
        x, y, positions = (np.concatenate(column) for column in zip(*self.parts))
        order = np.argsort(positions, kind="stable")
        return x[order], y[order], positions[order]

    def _piece_loss(self, model, loss_fn, x, y, positions):
        model.set_batch_context(BatchContext(self.seed, self.step, positions))
        return loss_fn.forward(model.forward(x), y, normaliser=self.count)


def check_gradient(model, loss_fn, batch, step, per_rank_statistics=False, eps=1e-6, rtol=1e-5,
                   atol=1e-9, seed=0):
    """Compare ``model.grads`` (already allreduced) with central differences of the loss of
    ``batch`` (a ``GlobalBatch``).

    Returns the list of ``(name, index, backprop, numeric)`` checked; raises
    GradientCheckError naming the worst coordinate if any disagrees. The
    model's buffers (which a forward pass in training mode may update, such
    as running statistics) are as they were afterwards.
    """
    if model.params.dtype != np.float64:
        raise ValueError("the finite-difference check needs float64 parameters")
    buffers = model.buffers.copy()
    try:
        checked, worst = _compare(model, lambda: batch.loss(model, loss_fn, per_rank_statistics),
                                  eps, rtol, atol, seed)
    finally:
        model.buffers[...] = buffers
    if worst is not None:
        error, name, index, backprop, numeric = worst
        array = dict(model.named_params())[name]
        position = np.unravel_index(index, array.shape)
        ratio = backprop / numeric if numeric else float("inf")
        raise GradientCheckError(
            f"gradient check failed at step {step}: {name}{list(map(int, position))}: backprop + "
            f"allreduce gives {backprop:.6g}, finite differences of the global-batch loss give "
            f"{numeric:.6g} (ratio {ratio:.4g}, relative error {error:.2g}). A ratio equal to the "
            "number of ranks, or to global/local batch size, points at a loss normalised by the "
            "local instead of the global batch")
    return checked


def _compare(model, loss, eps, rtol, atol, seed):
    """The coordinates checked, and the worst disagreement among them (or None)."""
    checked, worst = [], None
    for name, index, flat in sample_coordinates(model, seed):
        original = model.params[flat]
        model.params[flat] = original + eps
        plus = loss()
        model.params[flat] = original - eps
        minus = loss()
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
    """``--debug``: NaN/Inf checks after every layer, and the finite-difference check at the first
    step.

    The gradient check runs inside the first step (``TrainStep.after_reduce``):
    after the Allreduce, before the update, on the very gradient the step applies.
    """

    def __init__(self, console, seed=0, per_rank_statistics=False):
        self.console, self.seed, self.per_rank_statistics = console, seed, per_rank_statistics
        self.finite_checker = FiniteChecker()
        self._trainer = None

    def on_fit_start(self, trainer):
        self._trainer = trainer
        trainer.model.observer = self.finite_checker
        trainer.train_step.after_reduce.append(self._check_gradient_once)

    def on_step_start(self, trainer):
        self.finite_checker.step = trainer.position.step

    def _check_gradient_once(self, x, y, global_count, context):
        step = self._trainer.train_step
        step.after_reduce.remove(self._check_gradient_once)
        batch = GlobalBatch(step.comm, x, y, context, global_count)
        checked = check_gradient(step.model, step.loss_fn, batch, self._trainer.position.step,
                                 self.per_rank_statistics, seed=self.seed)
        worst = max(abs(b - n) / max(abs(b), abs(n), 1e-9) for _, _, b, n in checked)
        self.console.print(f"debug: at step {self._trainer.position.step} the allreduced gradient "
                           "agrees with finite differences of the global-batch loss on "
                           f"{len(checked)} coordinates (worst relative error {worst:.1e})",
                           always=True)
