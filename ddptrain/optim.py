"""SGD with momentum, Nesterov momentum and weight decay, apart from the layers.

The optimiser sees the model as two flat arrays, ``params`` and ``grads``,
and updates every parameter with a few in-place vector operations. It follows
PyTorch's ``torch.optim.SGD`` exactly (dampening 0), so results are comparable:

    g = grad + weight_decay * param
    buf = g                       on the first step
    buf = momentum * buf + g      afterwards
    g = g + momentum * buf        with Nesterov, else  g = buf
    param -= lr * g

Weight decay applies to every parameter, biases included, as in PyTorch.

The settings (momentum, ...) are given to the constructor; ``state_dict``
holds only what training changes: the step count and the arrays (here the
momentum buffer), each under its own name, which is how a checkpoint stores
them. Resuming with other settings therefore applies the settings given.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import SettingError


class SGD:
    def __init__(self, momentum=0.0, weight_decay=0.0, nesterov=False):
        for setting, value in (("momentum", momentum), ("weight_decay", weight_decay)):
            if not (math.isfinite(value) and value >= 0):
                raise SettingError(setting, f"must be finite and not negative, got {value}")
        if nesterov and momentum == 0:
            raise SettingError("nesterov", "needs --momentum > 0")
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.nesterov = bool(nesterov)
        self.steps = 0
        self._velocity = None   # the momentum buffer, created on the first step
        self._scratch = None

    def step(self, params, grads, lr):
        """Update ``params`` in place. ``grads`` is left unchanged.

        Every operation writes into an existing array (the velocity or one
        scratch array): the common case (momentum, no weight decay, no
        Nesterov) is four passes over the parameters and allocates nothing,
        which matters when the whole step takes a few milliseconds.
        """
        if self._scratch is None or self._scratch.shape != grads.shape or self._scratch.dtype != grads.dtype:
            self._scratch = np.empty_like(grads)
        scratch, cast = self._scratch, grads.dtype.type
        g = grads
        if self.weight_decay:   # g = grads + weight_decay * params
            g = np.multiply(params, cast(self.weight_decay), out=scratch)
            g += grads
        if not self.momentum:
            params -= np.multiply(g, cast(lr), out=scratch)
        else:
            if self._velocity is None:
                self._velocity = g.copy()
            else:
                self._velocity *= cast(self.momentum)
                self._velocity += g
            if self.nesterov:   # params -= lr * (g + momentum * velocity), in two passes without a temporary
                params -= np.multiply(g, cast(lr), out=scratch)
                params -= np.multiply(self._velocity, cast(lr * self.momentum), out=scratch)
            else:
                params -= np.multiply(self._velocity, cast(lr), out=scratch)
        self.steps += 1

    def state_dict(self):
        """What training changed: ``steps`` and, after the first step with momentum, ``velocity``."""
        state = {"steps": self.steps}
        if self._velocity is not None:
            state["velocity"] = self._velocity.copy()
        return state

    def load_state_dict(self, state):
        self.steps = int(state["steps"])
        velocity = state.get("velocity")
        self._velocity = None if velocity is None else np.array(velocity, copy=True)
