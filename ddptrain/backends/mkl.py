"""Intel's MKL reached through ``ctypes``: ``cblas_?gemm``, ``?gemv``, ``?dot`` and ``?axpby``.

``cblas_?gemm`` takes each operand as a pointer, a leading dimension and
"transposed or not", which is how numpy describes a C-ordered array or its
``.T`` view, so nothing is copied. An operand in any other layout (or another
dtype) goes to ``np.matmul``.

Settings made when MKL is loaded, and why:

- Threading layer INTEL, on the ``intel-openmp`` runtime the wheel brings:
  MKL's own threads, which ``threadpoolctl`` (hence ``--threads`` and the
  per-rank split of the cores) controls like OpenBLAS's.
- Conditional Numerical Reproducibility ``AUTO | STRICT``: the same inputs
  give the same bits from run to run, wherever numpy placed the arrays in
  memory (MKL's default may round differently with the alignment). A seed
  still fixes a run.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import re
import threading

import numpy as np

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112   # cblas' enums
_THREADING_INTEL = 0                             # MKL_Set_Threading_Layer
_CBWR_AUTO, _CBWR_STRICT, _CBWR_SUCCESS = 2, 0x10000, 0
# mkl_cbwr.h's branches: the instruction set of the kernels MKL picked for this CPU
# (MKL_CBWR_Get_Auto_Branch)
_CBWR_BRANCHES = {2: "generic", 3: "compatible", 4: "SSE2", 6: "SSSE3", 7: "SSE4.1", 8: "SSE4.2",
                  9: "AVX", 10: "AVX2", 12: "AVX-512", 14: "AVX-512 E1"}
_INT_LIMIT = 2 ** 31                              # sizes and strides passed as C ints

# libmkl_rt.so.2 in the 2025 wheels, .so.3 in 2026's
_MKL_RT = re.compile(r"libmkl_rt\.so(\.\d+)?$")
_OPENMP = re.compile(r"libiomp5\.so$")
_FOREIGN_OPENMP = re.compile(r"/libgomp[^/]*\.so")   # GNU's OpenMP runtime


def _installed_file(distribution, name):
    """The path of the file of an installed distribution whose name matches ``name`` (a regex), or
    None."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in dist.files or ():
        if name.search(str(entry)):
            return str(dist.locate_file(entry))
    return None


def foreign_openmp():
    """Another OpenMP runtime already in this process (GNU's libgomp, which PyTorch's wheels
    load), by path, while MKL is not loaded yet; else None.

    MKL's threads run on Intel's runtime, but the ``omp_*`` functions they call
    to split the work resolve to the runtime loaded first: with libgomp first,
    every thread believes it is thread 0 and the products come out wrong.
    Loaded before the other runtime, MKL is safe (its symbols win).
    """
    if _loaded is not None:
        return None
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
            for line in maps:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                if _FOREIGN_OPENMP.search(path):
                    return path
    except OSError:
        pass
    return None


def mkl_installed():
    """The version of the ``mkl`` wheel when it and its OpenMP runtime are installed, else None."""
    if _installed_file("mkl", _MKL_RT) is None or _installed_file("intel-openmp", _OPENMP) is None:
        return None
    return importlib.metadata.version("mkl")


class Mkl:
    """MKL's ``cblas_?gemm``, ``?gemv``, ``?dot`` and ``?axpby`` (``load`` makes the one of the
    process)."""

    def __init__(self):
        # The OpenMP runtime first, globally: libmkl_rt looks its symbols up when it starts its
        # threads.
        ctypes.CDLL(_installed_file("intel-openmp", _OPENMP), mode=ctypes.RTLD_GLOBAL)
        self.library = ctypes.CDLL(_installed_file("mkl", _MKL_RT), mode=ctypes.RTLD_GLOBAL)
        self.library.MKL_Set_Threading_Layer(_THREADING_INTEL)   # before any other call into MKL
        if self.library.MKL_CBWR_Set(_CBWR_AUTO | _CBWR_STRICT) != _CBWR_SUCCESS:
            raise OSError("MKL refused its reproducible mode (MKL_CBWR_Set)")
        self.version = importlib.metadata.version("mkl")
        i, p = ctypes.c_int, ctypes.c_void_p
        self._gemm, self._gemv, self._dot, self.axpby = {}, {}, {}, {}
        for dtype, kind, real in ((np.float32, "s", ctypes.c_float),
                                  (np.float64, "d", ctypes.c_double)):
            dtype = np.dtype(dtype)
            self._gemm[dtype] = _bind(self.library, f"cblas_{kind}gemm",
                                      [i, i, i, i, i, i, real, p, i, p, i, real, p, i])
            self._gemv[dtype] = _bind(self.library, f"cblas_{kind}gemv",
                                      [i, i, i, i, real, p, i, p, i, real, p, i])
            self._dot[dtype] = _bind(self.library, f"cblas_{kind}dot", [i, p, i, p, i], real)
            self.axpby[dtype] = _bind(self.library, f"cblas_{kind}axpby",
                                      [ctypes.c_int64, real, p, ctypes.c_int64, real, p,
                                       ctypes.c_int64])

    def code_path(self):
        """The instruction set of the kernels MKL runs here: ``"AVX-512 E1"``, ``"AVX2"`` (with
        ``MKL_ENABLE_INSTRUCTIONS=AVX2`` on an AVX-512 CPU), ..."""
        branch = self.library.MKL_CBWR_Get_Auto_Branch()
        return _CBWR_BRANCHES.get(branch, f"branch {branch}")

    def matmul(self, a, b, out=None):
        """``np.matmul(a, b, out=out)``, by MKL where the operands' layout lets it read them in
        place."""
        gemm = self._gemm.get(a.dtype)
        if (gemm is None or a.ndim != 2 or b.ndim != 2 or b.dtype != a.dtype
                or a.shape[1] != b.shape[0] or 0 in a.shape or b.shape[1] == 0):
            return np.matmul(a, b, out=out)
        if out is None:
            out = np.empty((a.shape[0], b.shape[1]), dtype=a.dtype)
        a_layout, b_layout, c_rows = _layout(a), _layout(b), _layout(out)
        if (a_layout is None or b_layout is None or c_rows is None or c_rows[0] != _NO_TRANS
                or out.dtype != a.dtype or out.shape != (a.shape[0], b.shape[1])
                or np.may_share_memory(out, a) or np.may_share_memory(out, b)):
            return np.matmul(a, b, out=out)
        (trans_a, lda), (trans_b, ldb), (_, ldc) = a_layout, b_layout, c_rows
        # MKL's LP64 interface counts in C ints
        if max(*a.shape, b.shape[1], lda, ldb, ldc) >= _INT_LIMIT:
            return np.matmul(a, b, out=out)
        if a.shape[0] == 1:
            # One row times a matrix (a bias gradient: ones @ dout): MKL's gemv is about 3x its gemm
            # there. It reads b as stored, (k, n) or, for a .T view, (n, k), and multiplies x by its
            # transpose or not.
            stored = b.shape if trans_b == _NO_TRANS else b.shape[::-1]
            self._gemv[a.dtype](_ROW_MAJOR, _TRANS if trans_b == _NO_TRANS else _NO_TRANS,
                                stored[0], stored[1], 1.0, b.ctypes.data, ldb, a.ctypes.data,
                                a.strides[1] // a.itemsize, 0.0, out.ctypes.data,
                                out.strides[1] // out.itemsize)
            return out
        gemm(_ROW_MAJOR, trans_a, trans_b, a.shape[0], b.shape[1], a.shape[1], 1.0, a.ctypes.data,
             lda, b.ctypes.data, ldb, 0.0, out.ctypes.data, ldc)
        return out

    def dot(self, x, y):
        """``np.dot(x, y)`` of two 1-D arrays, by MKL where they are contiguous and of one floating
        type."""
        function = self._dot.get(x.dtype)
        if (function is None or x.ndim != 1 or y.shape != x.shape or y.dtype != x.dtype
                or not x.size or not (x.flags.c_contiguous and y.flags.c_contiguous)
                or x.size >= _INT_LIMIT):
            return np.dot(x, y)
        return x.dtype.type(function(x.size, x.ctypes.data, 1, y.ctypes.data, 1))


def _bind(library, name, argtypes, restype=None):
    function = getattr(library, name)
    function.argtypes, function.restype = argtypes, restype
    return function


def _layout(matrix):
    """``(transposed or not, leading dimension)`` for cblas, row-major, or None where cblas cannot
    read it.

    Rows of unit-stride elements (a C-ordered array, or a slice of its columns) are read as they
    are; a ``.T`` view of such an array (columns of unit stride) is read as the transpose of what it
    views.
    """
    item = matrix.itemsize
    rows, cols = matrix.strides
    if cols == item and rows % item == 0 and rows // item >= max(1, matrix.shape[1]):
        return _NO_TRANS, rows // item
    if rows == item and cols % item == 0 and cols // item >= max(1, matrix.shape[0]):
        return _TRANS, cols // item
    return None


_loading = threading.Lock()
_loaded = None   # the process's Mkl: loaded once, on first use, and never replaced


def load():
    """The process's ``Mkl``, loaded on first use (simulated ranks are threads: one of them loads
    it). OSError or AttributeError where the library does not load."""
    global _loaded
    with _loading:
        if _loaded is None:
            _loaded = Mkl()
    return _loaded
