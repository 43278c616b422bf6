"""The machine and the libraries: the CPU and its vector instructions, the BLAS, PyTorch's presence.

The header of the benchmark's output is made here (``describe_machine``, then
``machine_lines``), and so are the notes each worker reports about the code it
ran (``ddptrain_vector_code``, ``blas_description``).
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import platform
import resource
import socket
import subprocess
import sys

import numpy as np

TORCH_INSTALL = "pip install torch==2.13.0"
# OpenBLAS reads these, which change its kernel: the header shows their values.
OPENBLAS_SETTINGS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
HEADER_FLAGS = ("avx2", "fma", "avx512f")   # the CPU flags the header names


def max_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def numpy_simd():
    """numpy's optional SIMD targets (its loops pick the best the CPU has), and the CPU's
    features."""
    try:
        from numpy._core import _multiarray_umath as umath  # numpy 2
    except ImportError:
        from numpy.core import _multiarray_umath as umath  # numpy 1
    return umath.__cpu_dispatch__, umath.__cpu_features__


def cpu_flags():
    """The CPU's feature flags (/proc/cpuinfo's): {"avx2", "avx512f", ...}; empty where unknown."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            line = next(line for line in cpuinfo if line.startswith("flags"))
        return set(line.split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


def cpu_name():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def isa_environment(isa):
    """The environment variables that hold every library's vector code to ``isa`` ("native":
    none)."""
    if isa == "native":
        return {}
    dispatch, _ = numpy_simd()
    beyond_avx2 = [target for target in dispatch if "AVX512" in target or target == "X86_V4"]
    return {"OPENBLAS_CORETYPE": "Haswell",        # numpy's OpenBLAS: its AVX2 kernels
            "MKL_ENABLE_INSTRUCTIONS": "AVX2",     # MKL: ddptrain's (--gemm mkl) and PyTorch's
            "NPY_DISABLE_CPU_FEATURES": " ".join(beyond_avx2),
            "ATEN_CPU_CAPABILITY": "avx2",         # PyTorch's element-wise kernels
            "ONEDNN_MAX_CPU_ISA": "AVX2"}          # PyTorch's oneDNN kernels


def numpy_vector_code():
    """numpy's own loops: the best SIMD target its dispatch may use on this CPU."""
    dispatch, features = numpy_simd()
    usable = [target for target in dispatch if features.get(target)]
    return usable[-1] if usable else "baseline"


def ddptrain_vector_code(backend):
    """The vector code a ddptrain row runs: numpy's loops, and the kernels of the library that
    multiplies (``backend``)."""
    from threadpoolctl import threadpool_info
    openblas = next((lib for lib in threadpool_info() if lib.get("internal_api") == "openblas"), {})
    parts = [f"numpy's loops {numpy_vector_code()}",
             f"openblas kernel {openblas.get('architecture', '?')}"]
    if backend.name == "mkl":
        parts.append(f"MKL kernels {backend.code_path()}")
    return ", ".join(parts)


def blas_description(backend):
    """The library of the matrix products (``backend``) with its version, kernel and threads."""
    from threadpoolctl import threadpool_info
    name = "mkl" if backend.name == "mkl" else None
    blas = next((lib for lib in threadpool_info() if lib.get("user_api") == "blas"
                 and (name is None or lib.get("internal_api") == name)), {})
    # MKL has no one kernel to show: it chooses one for each call.
    kernel = (f"kernel {blas.get('architecture', '?')}" if "architecture" in blas else
              f"{blas.get('threading_layer', '?')} threading")
    return (f"{blas.get('internal_api', 'unknown BLAS')} {blas.get('version', '')} {kernel}, "
            f"{blas.get('num_threads', '?')} threads").strip()


def torch_available():
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def torch_version():
    """PyTorch's version, asked of a fresh interpreter (this process does not import torch)."""
    proc = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                          capture_output=True, text=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def describe_machine(cores, torch_ver, no_torch):
    """The header's facts: date, host, CPU, memory, Python, numpy, OpenBLAS's settings, PyTorch."""
    if torch_ver:
        pytorch_rows = "run"
    elif no_torch and torch_available():
        pytorch_rows = "skipped (--no-torch)"
    else:
        pytorch_rows = "skipped (not installed)"
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "host": socket.gethostname(), "cpu": cpu_name(),
            "cpu_flags": [flag for flag in HEADER_FLAGS if flag in cpu_flags()], "cores": cores,
            "memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30,
            "python": platform.python_version(), "numpy": np.__version__,
            "environment": {name: os.environ.get(name) for name in OPENBLAS_SETTINGS},
            "pytorch": torch_ver, "pytorch_rows": pytorch_rows}


def machine_lines(machine):
    """The header's first lines, from ``describe_machine``."""
    flags = f" ({', '.join(machine['cpu_flags'])})" if machine["cpu_flags"] else ""
    env = ", ".join(f"{name}={value!r}" if value is not None else f"{name} unset"
                    for name, value in machine["environment"].items())
    if machine["pytorch"]:
        pytorch = f"PyTorch: {machine['pytorch']}"
    elif machine["pytorch_rows"] == "skipped (--no-torch)":
        pytorch = "PyTorch: rows skipped (--no-torch)"
    else:
        pytorch = f"PyTorch: not installed, PyTorch rows skipped (optional: {TORCH_INSTALL})"
    return [
        f"date: {machine['date']}; host {machine['host']}",
        (f"machine: {machine['cpu']}{flags}, {machine['cores']} cores available to this process, "
         f"{machine['memory_gib']:.0f} GiB"),
        f"python {machine['python']}, numpy {machine['numpy']}; environment: {env}",
        pytorch,
    ]
