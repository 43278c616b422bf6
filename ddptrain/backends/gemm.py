"""The library that multiplies the matrices: numpy's BLAS, or Intel's MKL where it is installed.

Nearly all of a step's arithmetic is the Linear and Conv2d layers' matrix
products (a "GEMM" each: general matrix-matrix multiply). numpy's wheels
multiply with OpenBLAS. PyTorch's multiply with MKL, which on Intel's CPUs is
faster for the shapes of a training step (docs/performance.md has the
figures). So ddptrain can hand its products to MKL too: ``pip install -e
'.[mkl]'`` installs Intel's ``mkl`` wheel, and ``--gemm auto`` (the default)
uses it on an Intel CPU. On other CPUs numpy's OpenBLAS stays: it has kernels
tuned for them, MKL does not.

The choice is an object, a ``Backend``, that the run hands to its model and
its optimiser (``Sequential.use_backend``, the optimisers' ``backend``): no
module-level function is rebound, and ``NUMPY``, the plain path, needs none
of the optional machinery. MKL's results differ from OpenBLAS's by rounding
only (each sums the products in its own order); P ranks reproduce one
process with either, as with any BLAS: the tests check both.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ddptrain.backends import blas, mkl
from ddptrain.errors import UserError

GEMMS = ("auto", "numpy", "mkl")


@dataclass(frozen=True)
class Choice:
    name: str          # "numpy" or "mkl"
    # for the start-up line: "MKL 2026.2.0 (an Intel CPU)", "numpy's openblas (...)"
    description: str

    @property
    def reason(self):
        """Why ``auto`` took this library, the description's parenthesis: ``MKL is not installed``;
        or ''."""
        return self.description.partition(" (")[2].removesuffix(")")


@dataclass(frozen=True)
class Backend:
    """The functions a model's layers, its optimiser and the step's gradient norm compute with."""

    name: str                  # "numpy" or "mkl"
    matmul: Callable           # np.matmul(a, b, out=out)
    dot: Callable              # np.dot of two 1-D arrays
    axpby: Callable            # y = alpha * x + beta * y, in place (blas.axpby)
    # the instruction set of the library's kernels, where it says
    code_path: Optional[Callable] = None

    def __repr__(self):
        return f"Backend({self.name!r})"


# The plain path: numpy's matmul and dot, and the axpby of the BLAS numpy loaded (or numpy's own
# arithmetic).
NUMPY = Backend("numpy", np.matmul, np.dot, blas.axpby)


def with_updates_anywhere(backend, dtype):
    """``backend`` with an ``axpby`` that gives an element the same bits wherever it sits in the
    array (``--reproducible``: a rank's slice of the parameters, ``--shard-optimizer`` or a node's
    shared memory, is updated as the whole is in one process): the BLAS's where its kernel does for
    ``dtype`` (``blas.same_bits_in_any_slice``), else numpy's arithmetic, a multiply and an add
    per element."""
    if backend.axpby is blas.axpby and blas.same_bits_in_any_slice(dtype):
        return backend
    return dataclasses.replace(backend, axpby=functools.partial(blas.axpby, functions={}))


def cpu_vendor():
    """``GenuineIntel``, ``AuthenticAMD``, ... from /proc/cpuinfo; ``unknown`` where it cannot be
    read."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def choose(request="auto", vendor=None):
    """The library for ``--gemm request``: a ``Choice``; a UserError where ``mkl`` is asked for and
    absent."""
    if request not in GEMMS:
        raise UserError(f"--gemm must be one of {', '.join(GEMMS)}, got {request!r}")
    if request == "numpy":
        return Choice("numpy", f"numpy's {blas.library_name()}")
    version = mkl.mkl_installed()
    foreign = mkl.foreign_openmp() if version is not None else None
    if request == "mkl":
        if version is None:
            raise UserError("--gemm mkl: MKL is not installed here (ddptrain's mkl extra: pip "
                            "install -e '.[mkl]' in its checkout installs the mkl and "
                            "intel-openmp wheels)")
        if foreign:
            raise UserError(f"--gemm mkl: another OpenMP runtime is loaded in this process "
                            f"({foreign}, PyTorch's, say), with which MKL's threads would compute "
                            f"wrong products; use --gemm numpy, or train in a process that has not "
                            f"imported it")
        return Choice("mkl", f"MKL {version}")
    if version is None:
        return Choice("numpy", f"numpy's {blas.library_name()} (MKL is not installed)")
    if foreign:
        return Choice("numpy", f"numpy's {blas.library_name()} (MKL is installed, but another "
                      f"OpenMP runtime is loaded in this process: {foreign})")
    vendor = cpu_vendor() if vendor is None else vendor
    if vendor != "GenuineIntel":
        return Choice("numpy", f"numpy's {blas.library_name()} (MKL is installed, but this CPU is "
                      f"{vendor}'s, not Intel's)")
    return Choice("mkl", f"MKL {version} (an Intel CPU)")


def backend(choice):
    """The ``Backend`` of a ``Choice``; for MKL, the process's library is loaded on first use."""
    if choice.name == "numpy":
        return NUMPY
    try:
        library = mkl.load()
    except (OSError, AttributeError) as error:
        raise UserError(f"--gemm mkl: MKL did not load ({error}); --gemm numpy multiplies with "
                        "numpy's BLAS") from None
    # SGD's axpby is MKL's too: one pool of threads for a step, not two competing for the same
    # cores.
    return Backend("mkl", library.matmul, library.dot,
                   functools.partial(blas.axpby, functions=library.axpby), library.code_path)
