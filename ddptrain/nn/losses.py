"""Cross-entropy losses, normalised by a count that the caller passes in.

Every loss here is ``sum over the rows of a per-sample loss / normaliser``.
In one process the normaliser is the batch size and this is the familiar mean.
In data-parallel training each rank holds only part of a global batch of size
``N``; passing ``normaliser=N`` makes each rank's loss (and gradient) its
share of the global mean, so that summing the ranks' gradients gives exactly
the gradient of the global mean loss, however unevenly the batch was split.

Targets are either integer class labels of shape ``(B,)`` or class
probabilities of shape ``(B, C)`` (one-hot or soft labels).

Why the fused gradient is ``(p - y) / N``: for one row with logits ``z``,
``p = softmax(z)`` and a target distribution ``y`` (summing to 1),
``L = -sum_k y_k log p_k = -sum_k y_k z_k + logsumexp(z)``. Differentiating,
``dL/dz_j = -y_j + exp(z_j) / sum_k exp(z_k) = p_j - y_j``. Dividing the sum
of rows by ``N`` divides each row's gradient by ``N``.
"""

from __future__ import annotations

import numpy as np


def logsumexp(z):
    """``log(sum(exp(z), axis=1))`` without overflow: shift by the row maximum first."""
    m = z.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]


def log_softmax(z):
    """``z - logsumexp(z)``: finite for any finite logits, even ±1000."""
    return z - logsumexp(z)[:, None]


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _check_normaliser(normaliser):
    if not normaliser > 0:
        raise ValueError(f"the loss normaliser must be positive, got {normaliser}")


def _is_labels(targets):
    return targets.ndim == 1


class SoftmaxCrossEntropy:
    """Softmax and cross-entropy fused, on logits.

    ``forward(logits, targets, normaliser)`` returns
    ``sum_i CE(softmax(z_i), y_i) / normaliser``, computed as
    ``logsumexp(z_i) - z_i . y_i``: no ``exp`` can overflow and no ``log(0)``
    can occur. ``backward()`` returns ``dL/dz = (p - y) / normaliser`` and
    ``target_grad()`` returns ``dL/dy = -log_softmax(z) / normaliser`` (the
    gradient with respect to soft labels, for distillation or label learning).
    """

    def __init__(self):
        self._log_p = None
        self._targets = None
        self._normaliser = None
        self._dlogits = None

    def forward(self, logits, targets, normaliser):
        _check_normaliser(normaliser)
        log_p = log_softmax(logits)
        if _is_labels(targets):
            rows = np.arange(len(targets))
            loss_sum = -log_p[rows, targets].sum(dtype=np.float64)
        else:
            loss_sum = -np.einsum("ij,ij->", targets, log_p, dtype=np.float64)
        self._log_p, self._targets, self._normaliser = log_p, targets, normaliser
        return float(loss_sum / normaliser)

    def backward(self):
        log_p, targets = self._log_p, self._targets
        dlogits = np.exp(log_p, out=self._reuse(log_p))   # p = softmax(z)
        if _is_labels(targets):
            dlogits[np.arange(len(targets)), targets] -= 1
        else:
            dlogits -= targets
        dlogits /= dlogits.dtype.type(self._normaliser)
        return dlogits

    def target_grad(self):
        return -self._log_p / self._normaliser

    def _reuse(self, like):
        if (self._dlogits is None or self._dlogits.shape[0] < like.shape[0]
                or self._dlogits.shape[1:] != like.shape[1:] or self._dlogits.dtype != like.dtype):
            self._dlogits = np.empty_like(like)
        return self._dlogits[:like.shape[0]]


class CrossEntropy:
    """Cross-entropy on probabilities (the output of a ``Softmax`` layer).

    ``forward(p, targets, normaliser) = -sum_i y_i . log p_i / normaliser`` and
    ``backward() = -y / p / normaliser``. Chained after ``Softmax`` this gives
    the same gradient as ``SoftmaxCrossEntropy``, but once a probability
    underflows to 0 (logits far apart) ``log p`` and ``y / p`` break down; the
    probabilities are clipped at the smallest normal number to stay finite,
    which makes the result approximate. That is why training uses the fused loss.
    """

    def __init__(self):
        self._p = None
        self._targets = None
        self._normaliser = None

    def forward(self, probs, targets, normaliser):
        _check_normaliser(normaliser)
        p = np.maximum(probs, np.finfo(probs.dtype).tiny)
        if _is_labels(targets):
            loss_sum = -np.log(p[np.arange(len(targets)), targets]).sum(dtype=np.float64)
        else:
            loss_sum = -np.einsum("ij,ij->", targets, np.log(p), dtype=np.float64)
        self._p, self._targets, self._normaliser = p, targets, normaliser
        return float(loss_sum / normaliser)

    def backward(self):
        p, targets = self._p, self._targets
        if _is_labels(targets):
            dprobs = np.zeros_like(p)
            rows = np.arange(len(targets))
            dprobs[rows, targets] = -1.0 / p[rows, targets]
        else:
            dprobs = -targets / p
        return dprobs / p.dtype.type(self._normaliser)
