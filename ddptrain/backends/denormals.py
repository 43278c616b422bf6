"""Denormal floats flushed to zero while a run trains (``--denormals flush``, the default).

A float32 below 1.2e-38 in magnitude is "denormal" (subnormal): CPUs compute
with it through a slow path, about a hundred times slower per instruction.
Training makes such values by itself: SGD's momentum of a weight whose input
is nearly always zero (a border pixel of MNIST) decays by 0.9 at each step
where its gradient is zero, and passes through the denormal range for about
150 steps on its way to zero, slowing the updates and so the later epochs
(docs/performance.md has the figures).

The CPU can be told to treat denormal inputs as zero and to write zero for
denormal results (the x86 MXCSR's DAZ and FTZ bits; AArch64's FPCR.FZ).
TensorFlow and XLA train that way by default; PyTorch offers it as
``torch.set_flush_denormal(True)``. The results differ only where a value
would have been below 1.2e-38 (float32; 2.2e-308 in float64): the test
accuracies of the runs measured were the same to the last digit.

The setting belongs to each thread. ``flushed`` sets it for the thread that
runs the rank (each simulated rank is a thread of its own) and restores it
afterwards, so a process that trains with ``ddptrain.train`` gets its own
setting back. Threads started while it holds inherit it, and MKL's OpenMP
threads take the calling thread's at each parallel region; the threads of
numpy's OpenBLAS, started when numpy was imported, keep the setting they
had. It is reached through C's ``fegetenv``/``fesetenv``, on glibc's
``fenv_t`` as <bits/fenv.h> declares it per architecture (``_X86_64_FENV``,
``_AARCH64_FENV``): x86-64 and AArch64 Linux are known here; elsewhere
``flushed`` changes nothing and ``supported()`` says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import platform
import sys

MODES = ("flush", "keep")


class _X86_64_FENV(ctypes.Structure):
    """glibc's x86-64 ``fenv_t``: the x87 FPU's environment (``fnstenv``'s 28 bytes), then SSE's
    MXCSR."""

    _fields_ = [("x87_environment", ctypes.c_ubyte * 28), ("control", ctypes.c_uint32)]
    # MXCSR's FTZ (flush results to zero) and DAZ (denormal inputs are zero)
    flush_bits = 0x8000 | 0x0040


class _AARCH64_FENV(ctypes.Structure):
    """glibc's AArch64 ``fenv_t``: the floating-point control register, then the status register."""

    _fields_ = [("control", ctypes.c_uint32), ("status", ctypes.c_uint32)]
    flush_bits = 1 << 24           # FPCR.FZ: flush to zero


_FENV_TYPES = {"x86_64": _X86_64_FENV, "aarch64": _AARCH64_FENV}


@functools.lru_cache(maxsize=None)
def _libm():
    try:
        return ctypes.CDLL("libm.so.6")   # glibc's, on every Linux this knows the fenv_t of
    except OSError:
        return None


def _fenv_type():
    """glibc's ``fenv_t`` on this machine, as a ctypes Structure, or None where it is not known
    here."""
    if not sys.platform.startswith("linux"):
        return None
    return _FENV_TYPES.get(platform.machine())


def supported():
    """Whether ``flushed`` can set this CPU's flush-to-zero bits from Python here."""
    return _fenv_type() is not None and _libm() is not None


@contextlib.contextmanager
def flushed(enabled=True):
    """Within the block, this thread (and threads it starts) computes with denormals flushed to
    zero."""
    fenv_type = _fenv_type() if enabled else None
    libm = _libm() if fenv_type else None
    if libm is None:
        yield
        return
    saved = fenv_type()
    if libm.fegetenv(ctypes.byref(saved)) != 0:
        yield
        return
    flushing = fenv_type.from_buffer_copy(saved)
    flushing.control |= fenv_type.flush_bits
    libm.fesetenv(ctypes.byref(flushing))
    try:
        yield
    finally:
        libm.fesetenv(ctypes.byref(saved))


def describe(mode):
    """For the start-up line."""
    if mode == "keep":
        return "denormals kept"
    return ("denormals flushed to zero" if supported() else "denormals kept (flushing is not known "
            "on this platform)")
