"""The library that multiplies the matrices: numpy's BLAS, or Intel's MKL where it is installed.

Nearly all of a step's arithmetic is the Linear and Conv2d layers' matrix
products (a "GEMM" each: general matrix-matrix multiply). numpy's wheels
multiply with OpenBLAS. PyTorch's multiply with MKL, which on Intel's CPUs
is 10-20% faster for the shapes of a training step (the eight products of a
step of the default MLP: 0.93 against 1.08 ms at batch 128, 3.36 against
3.65 ms at batch 512, 2 threads of an Intel Xeon with AVX-512). So ddptrain
can hand its products to MKL too: ``pip install -e '.[mkl]'`` installs
Intel's ``mkl`` wheel (about 250 MB with its OpenMP runtime), and
``--gemm auto`` (the default) uses it on an Intel CPU. On other CPUs numpy's
OpenBLAS stays: it has kernels tuned for them, MKL does not.

MKL is reached through ``ctypes``: its ``cblas_?gemm`` takes each operand as
a pointer, a leading dimension and "transposed or not", which is how numpy
describes a C-ordered array or its ``.T`` view, so nothing is copied. An
operand in any other layout (or another dtype) goes to ``np.matmul``.

Settings made when MKL is loaded, and why:

- Threading layer INTEL, on the ``intel-openmp`` runtime the wheel brings:
  MKL's own threads, which ``threadpoolctl`` (hence ``--threads`` and the
  per-rank split of the cores) controls like OpenBLAS's.
- Conditional Numerical Reproducibility ``AUTO | STRICT``: the same inputs
  give the same bits from run to run, wherever numpy placed the arrays in
  memory (MKL's default may round differently with the alignment). A seed
  still fixes a run.
- ``axpby`` (``blas.py``, the SGD update) is MKL's too: one pool of threads
  for a step, not two competing for the same cores.

MKL's results differ from OpenBLAS's by rounding only (each sums the
products in its own order); P ranks reproduce one process with either, as
with any BLAS: the tests check both.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import re
import threading
from dataclasses import dataclass

import numpy as np

from . import blas
from .errors import UserError

GEMMS = ("auto", "numpy", "mkl")

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112   # cblas' enums
_THREADING_INTEL = 0                             # MKL_Set_Threading_Layer
_CBWR_AUTO, _CBWR_STRICT, _CBWR_SUCCESS = 2, 0x10000, 0
# mkl_cbwr.h's branches: the instruction set of the kernels MKL picked for this CPU (MKL_CBWR_Get_Auto_Branch)
_CBWR_BRANCHES = {3: "compatible", 4: "SSE2", 6: "SSSE3", 7: "SSE4.1", 8: "SSE4.2", 9: "AVX", 10: "AVX2",
                  12: "AVX-512", 14: "AVX-512 E1"}
_INT_LIMIT = 2 ** 31                              # sizes and strides passed as C ints


@dataclass(frozen=True)
class Choice:
    name: str          # "numpy" or "mkl"
    description: str   # for the start-up line: "MKL 2026.2.0 (an Intel CPU)", "numpy's openblas (...)"

    @property
    def reason(self):
        """Why ``auto`` took this library, the description's parenthesis: ``MKL is not installed``; or ''."""
        return self.description.partition(" (")[2].removesuffix(")")


def cpu_vendor():
    """``GenuineIntel``, ``AuthenticAMD``, ... from /proc/cpuinfo; ``unknown`` where it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


_MKL_RT = re.compile(r"libmkl_rt\.so(\.\d+)?$")     # libmkl_rt.so.2 in the 2025 wheels, .so.3 in 2026's
_OPENMP = re.compile(r"libiomp5\.so$")


def _installed_file(distribution, name):
    """The path of the file of an installed distribution whose name matches ``name`` (a regex), or None."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in dist.files or ():
        if name.search(str(entry)):
            return str(dist.locate_file(entry))
    return None


def mkl_installed():
    """The version of the ``mkl`` wheel when it and its OpenMP runtime are installed, else None."""
    if _installed_file("mkl", _MKL_RT) is None or _installed_file("intel-openmp", _OPENMP) is None:
        return None
    return importlib.metadata.version("mkl")


class Mkl:
    """MKL's ``cblas_?gemm``, ``?gemv``, ``?dot`` and ``?axpby``, loaded once per process."""

    def __init__(self):
        # The OpenMP runtime first, globally: libmkl_rt looks its symbols up when it starts its threads.
        ctypes.CDLL(_installed_file("intel-openmp", _OPENMP), mode=ctypes.RTLD_GLOBAL)
        self.library = ctypes.CDLL(_installed_file("mkl", _MKL_RT), mode=ctypes.RTLD_GLOBAL)
        self.library.MKL_Set_Threading_Layer(_THREADING_INTEL)   # before any other call into MKL
        if self.library.MKL_CBWR_Set(_CBWR_AUTO | _CBWR_STRICT) != _CBWR_SUCCESS:
            raise OSError("MKL refused its reproducible mode (MKL_CBWR_Set)")
        self.version = importlib.metadata.version("mkl")
        i, p = ctypes.c_int, ctypes.c_void_p
        self._gemm, self._gemv, self._dot, self.axpby = {}, {}, {}, {}
        for dtype, kind, real in ((np.float32, "s", ctypes.c_float), (np.float64, "d", ctypes.c_double)):
            dtype = np.dtype(dtype)
            self._gemm[dtype] = _bind(self.library, f"cblas_{kind}gemm", [i, i, i, i, i, i, real, p, i, p, i, real,
                                                                            p, i])
            self._gemv[dtype] = _bind(self.library, f"cblas_{kind}gemv", [i, i, i, i, real, p, i, p, i, real, p, i])
            self._dot[dtype] = _bind(self.library, f"cblas_{kind}dot", [i, p, i, p, i], real)
            self.axpby[dtype] = _bind(self.library, f"cblas_{kind}axpby", [ctypes.c_int64, real, p, ctypes.c_int64,
                                                                          real, p, ctypes.c_int64])

    def code_path(self):
        """The instruction set of the kernels MKL runs here: ``"AVX-512 E1"``, ``"AVX2"`` (with
        ``MKL_ENABLE_INSTRUCTIONS=AVX2`` on an AVX-512 CPU), ..."""
        branch = self.library.MKL_CBWR_Get_Auto_Branch()
        return _CBWR_BRANCHES.get(branch, f"branch {branch}")

    def matmul(self, a, b, out=None):
        """``np.matmul(a, b, out=out)``, by MKL where the operands' layout lets it read them in place."""
        gemm = self._gemm.get(a.dtype)
        if (gemm is None or a.ndim != 2 or b.ndim != 2 or b.dtype != a.dtype or a.shape[1] != b.shape[0]
                or 0 in a.shape or b.shape[1] == 0):
            return np.matmul(a, b, out=out)
        if out is None:
            out = np.empty((a.shape[0], b.shape[1]), dtype=a.dtype)
        a_layout, b_layout, c_rows = _layout(a), _layout(b), _layout(out)
        if (a_layout is None or b_layout is None or c_rows is None or c_rows[0] != _NO_TRANS
                or out.dtype != a.dtype or out.shape != (a.shape[0], b.shape[1])
                or np.may_share_memory(out, a) or np.may_share_memory(out, b)):
            return np.matmul(a, b, out=out)
        (trans_a, lda), (trans_b, ldb), (_, ldc) = a_layout, b_layout, c_rows
        if max(*a.shape, b.shape[1], lda, ldb, ldc) >= _INT_LIMIT:   # MKL's LP64 interface counts in C ints
            return np.matmul(a, b, out=out)
        if a.shape[0] == 1:
            # One row times a matrix (a bias gradient: ones @ dout): MKL's gemv is about 3x its gemm there.
            # It reads b as stored, (k, n) or, for a .T view, (n, k), and multiplies x by its transpose or not.
            stored = b.shape if trans_b == _NO_TRANS else b.shape[::-1]
            self._gemv[a.dtype](_ROW_MAJOR, _TRANS if trans_b == _NO_TRANS else _NO_TRANS, stored[0], stored[1], 1.0,
                                b.ctypes.data, ldb, a.ctypes.data, a.strides[1] // a.itemsize, 0.0, out.ctypes.data,
                                out.strides[1] // out.itemsize)
            return out
        gemm(_ROW_MAJOR, trans_a, trans_b, a.shape[0], b.shape[1], a.shape[1], 1.0, a.ctypes.data, lda,
             b.ctypes.data, ldb, 0.0, out.ctypes.data, ldc)
        return out

    def dot(self, x, y):
        """``np.dot(x, y)`` of two 1-D arrays, by MKL where they are contiguous and of one floating type."""
        function = self._dot.get(x.dtype)
        if (function is None or x.ndim != 1 or y.shape != x.shape or y.dtype != x.dtype or not x.size
                or not (x.flags.c_contiguous and y.flags.c_contiguous) or x.size >= _INT_LIMIT):
            return np.dot(x, y)
        return x.dtype.type(function(x.size, x.ctypes.data, 1, y.ctypes.data, 1))


def _bind(library, name, argtypes, restype=None):
    function = getattr(library, name)
    function.argtypes, function.restype = argtypes, restype
    return function


def _layout(matrix):
    """``(transposed or not, leading dimension)`` for cblas, row-major, or None where cblas cannot read it.

    Rows of unit-stride elements (a C-ordered array, or a slice of its columns) are read as they are; a
    ``.T`` view of such an array (columns of unit stride) is read as the transpose of what it views.
    """
    item = matrix.itemsize
    rows, cols = matrix.strides
    if cols == item and rows % item == 0 and rows // item >= max(1, matrix.shape[1]):
        return _NO_TRANS, rows // item
    if rows == item and cols % item == 0 and cols // item >= max(1, matrix.shape[0]):
        return _TRANS, cols // item
    return None


_loading = threading.Lock()
_mkl = None              # the loaded Mkl, once asked for
matmul = np.matmul       # what the layers call: np.matmul, or the loaded Mkl's matmul
dot = np.dot             # the gradient's squared norm (step.py): np.dot, or the Mkl's


def choose(request="auto", vendor=None):
    """The library for ``--gemm request``: a ``Choice``; a UserError where ``mkl`` is asked for and absent."""
    if request not in GEMMS:
        raise UserError(f"--gemm must be one of {', '.join(GEMMS)}, got {request!r}")
    if request == "numpy":
        return Choice("numpy", f"numpy's {blas.library_name()}")
    version = mkl_installed()
    if request == "mkl":
        if version is None:
            raise UserError("--gemm mkl: MKL is not installed here (ddptrain's mkl extra: pip install -e '.[mkl]' "
                            "in its checkout installs the mkl and intel-openmp wheels)")
        return Choice("mkl", f"MKL {version}")
    if version is None:
        return Choice("numpy", f"numpy's {blas.library_name()} (MKL is not installed)")
    vendor = cpu_vendor() if vendor is None else vendor
    if vendor != "GenuineIntel":
        return Choice("numpy", f"numpy's {blas.library_name()} (MKL is installed, but this CPU is {vendor}'s, "
                               f"not Intel's)")
    return Choice("mkl", f"MKL {version} (an Intel CPU)")


def use(choice):
    """Multiply with ``choice``'s library from now on, in this process (the layers and SGD's axpby)."""
    global _mkl, matmul, dot
    if choice.name == "numpy":
        matmul, dot = np.matmul, np.dot
        blas.use_functions(None)
        return
    with _loading:   # simulated ranks are threads: one of them loads MKL
        if _mkl is None:
            try:
                _mkl = Mkl()
            except (OSError, AttributeError) as error:
                raise UserError(f"--gemm mkl: MKL did not load ({error}); --gemm numpy multiplies with numpy's "
                                f"BLAS") from None
    matmul, dot = _mkl.matmul, _mkl.dot
    blas.use_functions(_mkl.axpby)


def configure(request="auto"):
    """``choose`` and ``use``: the ``Choice`` made."""
    choice = choose(request)
    use(choice)
    return choice


def in_use():
    """``"mkl"`` or ``"numpy"``: what the layers multiply with now."""
    return "numpy" if matmul is np.matmul else "mkl"


def mkl_code_path():
    """The instruction set of MKL's kernels where MKL multiplies (``Mkl.code_path``); None otherwise."""
    return _mkl.code_path() if in_use() == "mkl" else None
