"""Central finite differences in float64, for the gradient tests.

``numerical_grad(f, x)`` perturbs ``x`` in place one coordinate at a time,
evaluates the scalar ``f(x)`` at ``x + eps`` and ``x - eps``, and restores the
coordinate exactly. ``f`` may ignore its argument and read ``x`` (or a buffer
that ``x`` is a view of) through a closure: that is how a model's parameters
are checked.

Imported by the tests as ``from gradcheck import ...``: ``tests/`` has no
``__init__.py``, so pytest's default import mode puts it on ``sys.path``.
"""

from __future__ import annotations

import numpy as np


def numerical_grad(f, x, eps=1e-6, indices=None):
    """``d f(x) / d x`` by central differences, ``(f(x + eps) - f(x - eps)) / (2 eps)``.

    ``x`` must be a writable float64 array. With ``indices`` (flat indices into
    ``x``, e.g. from ``random_indices``) only those coordinates are computed and
    a 1-D array of their derivatives is returned; otherwise an array shaped
    like ``x``.
    """
    x = np.asarray(x)
    if x.dtype != np.float64:
        raise TypeError(f"finite differences need float64, got {x.dtype}")
    flat = x.reshape(-1)
    if not np.shares_memory(flat, x):
        raise ValueError("x must be perturbable in place (reshape(-1) made a copy)")
    coords = range(flat.size) if indices is None else np.asarray(indices).reshape(-1)
    grad = np.empty(len(coords), dtype=np.float64)
    for k, i in enumerate(coords):
        original = flat[i]
        try:
            flat[i] = original + eps
            f_plus = float(f(x))
            flat[i] = original - eps
            f_minus = float(f(x))
        finally:
            flat[i] = original
        grad[k] = (f_plus - f_minus) / (2 * eps)
    return grad.reshape(x.shape) if indices is None else grad


def random_indices(x, k, seed=0):
    """Up to ``k`` distinct flat indices into ``x``, drawn reproducibly (all of them if ``x`` is small)."""
    size = np.asarray(x).size
    if size <= k:
        return np.arange(size)
    return np.sort(np.random.default_rng(seed).choice(size, size=k, replace=False))


def rel_error(a, b):
    """``max|a - b| / max(|a|, |b|)``: a scale-free distance between two arrays."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    scale = max(1e-12, float(np.max(np.abs(a), initial=0.0)), float(np.max(np.abs(b), initial=0.0)))
    return float(np.max(np.abs(a - b), initial=0.0)) / scale
