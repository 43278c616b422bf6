"""The optimisers, apart from the layers: SGD (momentum, Nesterov, weight decay), Adam and AdamW.

The optimiser sees the model as two flat arrays, ``params`` and ``grads``,
and updates every parameter with a few in-place vector operations. It follows
PyTorch's ``torch.optim.SGD`` exactly (dampening 0), so results are comparable:

    g = grad + weight_decay * param
    buf = g                       on the first step
    buf = momentum * buf + g      afterwards
    g = g + momentum * buf        with Nesterov, else  g = buf
    param -= lr * g

Weight decay applies to every parameter, biases included, as in PyTorch.
SGD's passes over the parameters are the BLAS's fused ``axpby``
(``backends/blas.py``, through the ``backend`` the optimiser is given): the
same formulas, with at most the rounding of a fused multiply-add apart.

Adam and AdamW follow ``torch.optim.Adam`` and ``torch.optim.AdamW``
(amsgrad off) exactly, with ``t`` the step number from 1:

    g = grad + weight_decay * param              (Adam's L2 term;
                                                  AdamW: param *= 1 - lr * weight_decay)
    m = m + (1 - beta1) * (g - m)                (PyTorch's lerp: beta1 * m + (1 - beta1) * g)
    v = beta2 * v + (1 - beta2) * g * g
    param -= lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

with ``m`` and ``v`` starting at zero; eps is outside the square root.

The settings (momentum, ...) are given to the constructor; ``state_dict``
holds only what training changes: the step count and the arrays (here the
momentum buffer), each under its own name, which is how a checkpoint stores
them. Resuming with other settings therefore applies the settings given.
"""

from __future__ import annotations

import math

import numpy as np

from ddptrain.backends.gemm import NUMPY
from ddptrain.errors import SettingError


class SGD:
    def __init__(self, momentum=0.0, weight_decay=0.0, nesterov=False, backend=NUMPY):
        for setting, value in (("momentum", momentum), ("weight_decay", weight_decay)):
            if not (math.isfinite(value) and value >= 0):
                raise SettingError(setting, f"must be finite and not negative, got {value}")
        if nesterov and momentum == 0:
            raise SettingError("nesterov", "needs --momentum > 0")
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.nesterov = bool(nesterov)
        self.backend = backend   # whose axpby updates the parameters (backends.gemm.Backend)
        self.steps = 0
        self._velocity = None   # the momentum buffer, created on the first step
        self._scratch = None

    def step(self, params, grads, lr):
        """Update ``params`` in place. ``grads`` is left unchanged.

        Every operation writes into an existing array (the velocity or one
        scratch array) and allocates nothing. The common case (momentum, no
        weight decay, no Nesterov) is two fused passes over the parameters,
        ``axpby``: ``velocity = grads + momentum * velocity``, then
        ``params = params - lr * velocity``, each split over the BLAS's
        threads, with numpy's roundings (``blas`` says where they may differ).
        """
        if (self._scratch is None or self._scratch.shape != grads.shape
                or self._scratch.dtype != grads.dtype):
            self._scratch = np.empty_like(grads)
        scratch, cast, axpby = self._scratch, grads.dtype.type, self.backend.axpby
        g = grads
        if self.weight_decay:   # g = grads + weight_decay * params
            g = np.multiply(params, cast(self.weight_decay), out=scratch)
            g += grads
        if not self.momentum:
            axpby(-lr, g, 1.0, params)
        else:
            if self._velocity is None:
                self._velocity = g.copy()
            else:
                axpby(1.0, g, self.momentum, self._velocity)
            # params -= lr * (g + momentum * velocity), in two passes without a temporary
            if self.nesterov:
                axpby(-lr, g, 1.0, params)
                axpby(-(lr * self.momentum), self._velocity, 1.0, params)
            else:
                axpby(-lr, self._velocity, 1.0, params)
        self.steps += 1

    def state_dict(self):
        """What training changed: ``steps`` and, after the first step with momentum,
        ``velocity``."""
        state = {"steps": self.steps}
        if self._velocity is not None:
            state["velocity"] = self._velocity.copy()
        return state

    def load_state_dict(self, state):
        self.steps = int(state["steps"])
        velocity = state.get("velocity")
        self._velocity = None if velocity is None else np.array(velocity, copy=True)


class Adam:
    """Adam (Kingma and Ba), with PyTorch's formulas; ``weight_decay`` adds an L2 term to the
    gradient."""

    decoupled = False   # AdamW: the weight decay shrinks the parameters instead

    def __init__(self, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
        for setting, value in (("beta1", beta1), ("beta2", beta2)):
            if not (math.isfinite(value) and 0 <= value < 1):
                raise SettingError(setting, f"must be in [0, 1), got {value}")
        if not (math.isfinite(eps) and eps > 0):
            raise SettingError("eps", f"must be finite and positive, got {eps}")
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise SettingError("weight_decay",
                               f"must be finite and not negative, got {weight_decay}")
        self.beta1, self.beta2, self.eps, self.weight_decay = (float(beta1), float(beta2),
                                                               float(eps), float(weight_decay))
        self.steps = 0
        self._m = self._v = None   # the moments, created (zero) on the first step
        self._scratch = self._work = None

    def step(self, params, grads, lr):
        """Update ``params`` in place. ``grads`` is left unchanged; nothing is allocated after the
        first step."""
        if (self._scratch is None or self._scratch.shape != grads.shape
                or self._scratch.dtype != grads.dtype):
            self._scratch, self._work = np.empty_like(grads), np.empty_like(grads)
        if self._m is None:
            self._m, self._v = np.zeros_like(grads), np.zeros_like(grads)
        cast, scratch, work, m, v = grads.dtype.type, self._scratch, self._work, self._m, self._v
        t = self.steps + 1
        g = grads
        if self.weight_decay and self.decoupled:
            params *= cast(1 - lr * self.weight_decay)
        elif self.weight_decay:
            g = np.multiply(params, cast(self.weight_decay), out=scratch)
            g += grads
        np.subtract(g, m, out=work)                      # m = m + (1 - beta1) * (g - m)
        work *= cast(1 - self.beta1)
        m += work
        v *= cast(self.beta2)                            # v = beta2 * v + (1 - beta2) * g * g
        np.multiply(g, g, out=work)
        work *= cast(1 - self.beta2)
        v += work
        denom = np.sqrt(v, out=work)                     # sqrt(v) / sqrt(1 - beta2**t) + eps
        denom /= cast(math.sqrt(1 - self.beta2 ** t))
        denom += cast(self.eps)
        update = np.divide(m, denom, out=work)           # param -= lr / (1 - beta1**t) * m / denom
        update *= cast(lr / (1 - self.beta1 ** t))
        params -= update
        self.steps = t

    def state_dict(self):
        """What training changed: ``steps`` and, after the first step, the moments ``exp_avg`` and
        ``exp_avg_sq`` (PyTorch's names)."""
        state = {"steps": self.steps}
        if self._m is not None:
            state["exp_avg"], state["exp_avg_sq"] = self._m.copy(), self._v.copy()
        return state

    def load_state_dict(self, state):
        self.steps = int(state["steps"])
        if "exp_avg" in state:
            self._m, self._v = (np.array(state["exp_avg"], copy=True),
                                np.array(state["exp_avg_sq"], copy=True))
        else:
            self._m = self._v = None


class AdamW(Adam):
    """AdamW (Loshchilov and Hutter): Adam with decoupled weight decay,
    ``param *= 1 - lr * weight_decay``."""

    decoupled = True


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def optimizer_name(optimizer):
    """The optimiser's name in checkpoints: ``SGD``, ``Adam``, ``AdamW`` (sharded or not)."""
    return getattr(optimizer, "name", type(optimizer).__name__)
