"""Denormal floats flushed to zero while a run trains (``--denormals flush``, the default).

A float32 below 1.2e-38 in magnitude is "denormal" (subnormal): CPUs compute
with it through a slow path, about a hundred times slower per instruction.
Training makes such values by itself. SGD's momentum of a weight whose input
is nearly always zero (a border pixel of MNIST) decays by 0.9 at each step
where its gradient is zero, and passes through the denormal range for about
150 steps on its way to zero. After two epochs of MNIST about 9,000 of the
536k momentum values are denormal at any time; each update of the
parameters then ran at 0.43 ms instead of 0.18 ms (2 threads of an Intel
Xeon), and the epochs from the third on at 8-10% fewer samples per second.

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
had. It is reached through C's ``fegetenv``/``fesetenv``, whose ``fenv_t``
glibc lays out per architecture: x86-64 and AArch64 Linux are known here;
elsewhere ``flushed`` changes nothing and ``supported()`` says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import platform
import struct
import sys

MODES = ("flush", "keep")

# Where the control register sits in glibc's fenv_t, and the bits that flush denormals.
_LAYOUTS = {
    "x86_64": (32, 28, 0x8040),       # fenv_t: the x87 environment, then __mxcsr; FTZ 0x8000 | DAZ 0x0040
    "aarch64": (8, 0, 1 << 24),       # fenv_t: __fpcr, __fpsr; FPCR.FZ
}


@functools.lru_cache(maxsize=None)
def _libm():
    try:
        return ctypes.CDLL("libm.so.6")   # glibc's, on every Linux this knows the fenv_t of
    except OSError:
        return None


def _layout():
    """(size of fenv_t, offset of the control register, flush bits) here, or None."""
    if not sys.platform.startswith("linux"):
        return None
    return _LAYOUTS.get(platform.machine())


def supported():
    """Whether ``flushed`` can set this CPU's flush-to-zero bits from Python here."""
    return _layout() is not None and _libm() is not None


@contextlib.contextmanager
def flushed(enabled=True):
    """Within the block, this thread (and threads it starts) computes with denormals flushed to zero."""
    layout = _layout() if enabled else None
    libm = _libm() if layout else None
    if libm is None:
        yield
        return
    size, offset, bits = layout
    saved = ctypes.create_string_buffer(size)
    if libm.fegetenv(saved) != 0:
        yield
        return
    flushing = ctypes.create_string_buffer(saved.raw, size)
    control = struct.unpack_from("<I", flushing.raw, offset)[0]
    ctypes.memmove(ctypes.addressof(flushing) + offset, struct.pack("<I", control | bits), 4)
    libm.fesetenv(flushing)
    try:
        yield
    finally:
        libm.fesetenv(saved)


def describe(mode):
    """For the start-up line."""
    if mode == "keep":
        return "denormals kept"
    return "denormals flushed to zero" if supported() else "denormals kept (flushing is not known on this platform)"
