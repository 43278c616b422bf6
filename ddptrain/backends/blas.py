"""Fused vector updates from the BLAS that numpy already loaded: ``axpby``, ``y = a * x + b * y`` in
one pass.

numpy runs ``v *= m; v += g`` as two passes over memory, on one core; the
BLAS's ``axpby`` does it in one, split over the BLAS's threads. SGD's update
(``optim.SGD``) is two such passes instead of four, which matters when a step
of a small model takes a few milliseconds (docs/performance.md).

The library is the one ``threadpoolctl`` finds behind numpy (OpenBLAS in
numpy's wheels, whose symbols carry a prefix and a suffix:
``scipy_cblas_saxpby64_``; MKL and plain OpenBLAS use ``cblas_saxpby``).
Where no such symbol exists (another BLAS, Apple's Accelerate), ``axpby``
falls back to numpy, with the same results. Where MKL multiplies the
matrices (``gemm.py``), its backend passes MKL's functions: one pool of
threads for the whole step.

The results are numpy's up to the rounding of one operation: a BLAS kernel
may fuse the multiply and the add (MKL's do; OpenBLAS's do not, in the
kernels measured here, so there the results are the same bits). A kernel may
also treat the elements of its vector loop and of its tail (or of a head it
peels off to align its loads) otherwise, so that an element of a slice of
the array (a rank's shard of the parameters) is rounded otherwise than in
the whole: ``same_bits_in_any_slice`` checks the kernel for that, which
``--reproducible`` needs (``gemm.with_updates_anywhere``).
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np

_lock = threading.Lock()
_found = None   # {dtype: C function} of numpy's BLAS, looked up once


def _candidates(kind):
    """Symbol names of cblas ``<kind>axpby`` (kind "s" or "d") in the builds ddptrain knows."""
    return [f"{prefix}cblas_{kind}axpby{suffix}" for prefix in ("scipy_", "")
            for suffix in ("64_", "")]


def _look_up():
    """The C ``axpby`` of each dtype in numpy's BLAS, by dtype; empty if there is none."""
    found = {}
    try:
        from threadpoolctl import threadpool_info
        paths = [lib["filepath"] for lib in threadpool_info() if lib.get("user_api") == "blas"]
    except Exception:   # noqa: BLE001 - no threadpoolctl or no BLAS found: numpy it is
        return found
    for path in paths:
        try:
            library = ctypes.CDLL(path)   # already loaded by numpy: this only finds it
        except OSError:
            continue
        for dtype, kind, real in ((np.float32, "s", ctypes.c_float),
                                  (np.float64, "d", ctypes.c_double)):
            for name in _candidates(kind):
                function = getattr(library, name, None)
                if function is not None and np.dtype(dtype) not in found:
                    # n and the strides as 64-bit integers: right for ILP64 builds, and read as
                    # their low 32 bits, in registers, by LP64 ones.
                    function.argtypes = [ctypes.c_int64, real, ctypes.c_void_p, ctypes.c_int64,
                                         real, ctypes.c_void_p, ctypes.c_int64]
                    function.restype = None
                    found[np.dtype(dtype)] = function
                    break
    return found


def library_name():
    """The name ``threadpoolctl`` gives numpy's BLAS (``openblas``, ``mkl``, ...), or ``BLAS``: the
    first BLAS loaded, as numpy loads its own when it is imported (``mkl.Mkl`` later)."""
    try:
        from threadpoolctl import threadpool_info
        return next((lib["internal_api"] for lib in threadpool_info()
                     if lib.get("user_api") == "blas"), "BLAS")
    except Exception:   # noqa: BLE001 - no threadpoolctl: a name is all this is for
        return "BLAS"


def available(dtype):
    """Whether ``axpby`` of ``dtype`` runs in the BLAS (else in numpy)."""
    return np.dtype(dtype) in _functions()


def _functions():
    global _found
    if _found is None:
        with _lock:
            if _found is None:
                _found = _look_up()
    return _found


def axpby(alpha, x, beta, y, functions=None):
    """``y = alpha * x + beta * y``, in place, for contiguous 1-D arrays of one floating type; with
    the C functions of ``functions`` (``{dtype: function}``, another BLAS's: ``mkl.Mkl.axpby``), or
    numpy's BLAS's."""
    if x.shape != y.shape or x.dtype != y.dtype or not (x.flags.c_contiguous
                                                        and y.flags.c_contiguous):
        raise ValueError("axpby needs two contiguous arrays of the same shape and type")
    function = (_functions() if functions is None else functions).get(y.dtype)
    if function is not None and y.size:
        function(y.size, alpha, x.ctypes.data, 1, beta, y.ctypes.data, 1)
        return y
    cast = y.dtype.type
    if beta != 1:
        y *= cast(beta)
    if alpha == 1:
        y += x
    elif alpha == -1:
        y -= x
    else:
        y += x * cast(alpha)
    return y


# The probe of same_bits_in_any_slice: cuts inside and at the edges of a kernel's vector loop, and
# starts at every offset of a 64-byte line (a kernel may peel elements to align its loads).
_PROBE_SIZE = 3 * 4096 + 77
_PROBE_CUTS = (1, 7, 100, 4096, 4096 + 13, 2 * 4096)
_PROBE_OFFSETS = range(17)
_slices_agree = {}   # {dtype: verdict} for numpy's BLAS, measured once


def same_bits_in_any_slice(dtype, functions=None):
    """Whether ``axpby`` with ``functions`` (numpy's BLAS's: None, measured once) gives every
    element of an array of ``dtype`` the same bits whether it is called on the whole array or on
    slices of it, at any address: checked on fixed values. numpy's arithmetic always does."""
    dtype = np.dtype(dtype)
    if functions is not None:
        return _probe(dtype, functions)
    if dtype not in _slices_agree:
        _slices_agree[dtype] = _probe(dtype, _functions())
    return _slices_agree[dtype]


def _probe(dtype, functions):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(_PROBE_SIZE).astype(dtype)
    y = rng.standard_normal(_PROBE_SIZE).astype(dtype)
    alpha, beta = -0.0137, 0.9
    whole = axpby(alpha, x, beta, y.copy(), functions)
    edges = [0, *_PROBE_CUTS, _PROBE_SIZE]
    for offset in _PROBE_OFFSETS:
        at_x = np.empty(_PROBE_SIZE + offset, dtype)[offset:]
        at_y = np.empty(_PROBE_SIZE + offset, dtype)[offset:]
        at_x[...], at_y[...] = x, y
        for start, stop in zip(edges[:-1], edges[1:]):
            axpby(alpha, at_x[start:stop], beta, at_y[start:stop], functions)
        if not np.array_equal(at_y.view(np.uint8), whole.view(np.uint8)):
            return False
    return True
