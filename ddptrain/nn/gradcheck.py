"""``gradcheck``: a layer's (or a model's) backward pass against finite differences.

The check every layer of ddptrain passes in the tests, offered for layers of
your own. The scalar checked is ``L = sum(output * R)`` for a fixed random
``R``, so the gradient with respect to the output is ``R`` and every output
value takes part. For the input and for every parameter, the analytic
gradient that ``backward(R)`` gives is compared with central differences,
``(L(v + eps) - L(v - eps)) / (2 eps)``, on up to ``coordinates`` values of
each array, in float64. The distance is ``max|analytic - numeric| /
max(|analytic|, |numeric|)``: about 1e-9 for a correct layer, 1e-2 or more
for a wrong one.

Random inputs almost never sit on a kink (ReLU at 0, a tie in max pooling),
where a finite difference straddles two slopes; a layer that draws random
numbers (dropout) must be checked with its randomness fixed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ddptrain.nn.layer import Layer
from ddptrain.nn.model import Sequential


class GradientError(AssertionError):
    """A backward pass that finite differences contradict."""


@dataclass(frozen=True)
class GradcheckResult:
    """The relative error of each array's gradient: ``errors["input"]``,
    ``errors["linear1.weight"]``..."""

    errors: dict
    tolerance: float

    @property
    def passed(self):
        return all(error <= self.tolerance for error in self.errors.values())

    @property
    def worst(self):
        return max(self.errors.items(), key=lambda item: item[1])

    def __str__(self):
        return ", ".join(f"{name} {error:.1e}" for name, error in self.errors.items())


def gradcheck(layer, input_shape=None, x=None, batch=3, seed=0, eps=1e-6, tolerance=1e-6,
              coordinates=200, raise_on_failure=True):
    """Check ``layer``'s backward pass against finite differences; returns a ``GradcheckResult``.

    ``layer``: a new ``nn.Layer`` (gradcheck builds it into a float64 model
    of its own, which gives it its parameters) or a float64 ``Sequential``.
    ``x``: the input batch, float64; or ``input_shape``, one sample's shape,
    for ``batch`` standard-normal samples. Raises ``GradientError`` naming
    the worst array when an error exceeds ``tolerance`` (unless
    ``raise_on_failure`` is False).
    """
    if not isinstance(layer, (Layer, Sequential)):
        raise TypeError("gradcheck takes an nn.Layer or an nn.Sequential, not "
                        f"{type(layer).__name__}")
    model = (layer if isinstance(layer, Sequential)
             else Sequential([layer], dtype=np.float64, seed=seed))
    if model.dtype != np.float64:
        raise TypeError(f"gradcheck needs a float64 model (finite differences in {model.dtype} "
                        "are too coarse)")
    rng = np.random.default_rng(seed)
    if x is None:
        if input_shape is None:
            raise TypeError("gradcheck needs x (an input batch) or input_shape "
                            "(one sample's shape)")
        x = rng.standard_normal((batch, *input_shape))
    x = np.array(x, dtype=np.float64)   # a copy of its own: perturbed in place
    weights = rng.standard_normal((len(x), *model.output_shape(x.shape[1:])))

    def loss():
        return float(np.sum(model.forward(x) * weights))

    loss()
    model.grads[...] = 0
    analytic = {"input": np.array(model.backward(weights.copy(), need_input_grad=True)),
                **{name: grad.copy() for name, grad in model.named_grads()}}
    arrays = {"input": x, **dict(model.named_params())}
    errors = {}
    for name, array in arrays.items():
        flat, picked = array.reshape(-1), _pick(array.size, coordinates, rng)
        numeric = np.empty(len(picked))
        for k, i in enumerate(picked):
            original = flat[i]
            flat[i] = original + eps
            plus = loss()
            flat[i] = original - eps
            minus = loss()
            flat[i] = original
            numeric[k] = (plus - minus) / (2 * eps)
        errors[name] = _relative_error(analytic[name].reshape(-1)[picked], numeric)
    result = GradcheckResult(errors, tolerance)
    if raise_on_failure and not result.passed:
        name, error = result.worst
        raise GradientError(f"the gradient of {name} differs from finite differences by "
                            f"{error:.2e} (relative; tolerance {tolerance:g}): {result}")
    return result


def _pick(size, coordinates, rng):
    """Up to ``coordinates`` flat indices of an array of ``size`` values: all of them for a small
    array."""
    return (np.arange(size) if size <= coordinates
            else np.sort(rng.choice(size, coordinates, replace=False)))


def _relative_error(a, b):
    scale = max(1e-12, float(np.max(np.abs(a), initial=0.0)), float(np.max(np.abs(b), initial=0.0)))
    return float(np.max(np.abs(a - b), initial=0.0)) / scale
