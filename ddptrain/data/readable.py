"""Reading a data file cannot hang or crash a rank: its metadata is first read by a child process.

Files without HDF5's metadata checksums (format 1 of ddptrain 0.1, or written
by other tools) may hold attributes in HDF5's global heap, which has no
checksum: a flipped bit there can hang HDF5. So before a run opens any data
file, a child process reads its metadata with a time limit
(``check_readable``), and a file that would hang or crash HDF5 ends the run
with one line instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ddptrain.data.format import CHECK_SECONDS, _check_is_file, _one_line, inspect
from ddptrain.distributed.launcher import environ_without_launcher
from ddptrain.errors import DataError


def check_readable(path, seconds=None):
    """Make sure that reading the file cannot hang or crash this process; DataError (one line)
    otherwise.

    The file's metadata is first read by a child process (``inspect``, with
    its chunk index): if that does not finish within ``seconds``, or ends the
    child, the file is damaged in a way that would hang or crash HDF5, and
    this process never opens it. The child is forked (a few milliseconds)
    before MPI is initialised and while this process has one thread, and a
    new Python process otherwise (about 0.3 s). A file checked once is not
    checked again while it is unchanged.
    """
    path, seconds = os.fspath(path), seconds or CHECK_SECONDS
    _check_is_file(path)
    stamp = _stamp(path)
    if _checked.get(os.path.realpath(path)) == stamp:
        return
    if hasattr(os, "fork") and threading.active_count() == 1 and not _mpi_initialized():
        status, message = _run_in_forked_child(path, seconds)
    else:
        status, message = _run_in_new_process(path, seconds)
    if status == "hung":
        raise DataError(f"{path}: damaged: HDF5 did not finish reading its metadata "
                        f"within {seconds} s")
    if status != 0:
        raise DataError(message or f"{path}: damaged: reading its metadata ended the "
                        f"reader ({status})")
    _checked[os.path.realpath(path)] = stamp


_checked = {}   # realpath -> (inode, size, mtime) of the files check_readable passed


def mark_checked(path):
    """A file this process has just written whole (``writer.write_dataset``): not to be read
    again."""
    _checked[os.path.realpath(path)] = _stamp(path)


def _stamp(path):
    info = os.stat(path)
    return info.st_ino, info.st_size, info.st_mtime_ns


def _mpi_initialized():
    mpi = sys.modules.get("mpi4py.MPI")
    return mpi is not None and mpi.Is_initialized()


def _run_in_forked_child(path, seconds):
    """``(0 or exit status or "hung", message)`` of ``inspect`` run in a forked child."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: report, and leave without running any exit handler of the parent's
        status, message = 0, ""
        try:
            os.close(read_end)
            inspect(path, walk_chunks=True)
        except DataError as error:
            status, message = 2, str(error)
        except BaseException as error:   # noqa: BLE001 - reported to the parent as damage
            status, message = (3, f"{path}: damaged: reading its metadata failed "
                               f"({_one_line(error)})")
        os.write(write_end, message.encode()[:8192])
        os._exit(status)
    os.close(write_end)
    reaped = False
    try:
        deadline = time.monotonic() + seconds
        while True:
            done, wait_status = os.waitpid(pid, os.WNOHANG)
            if done:
                reaped = True
                break
            if time.monotonic() > deadline:
                return "hung", ""
            time.sleep(0.002)
        message = os.read(read_end, 8192).decode(errors="replace")
    finally:
        os.close(read_end)
        # hung, or this process was interrupted (Ctrl-C): no child outlives the check
        if not reaped:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    if os.WIFSIGNALED(wait_status):
        return f"signal {os.WTERMSIG(wait_status)}", ""
    return os.WEXITSTATUS(wait_status), message


def _run_in_new_process(path, seconds):
    """The same as ``_run_in_forked_child``, in a new Python process (safe with threads and with
    MPI)."""
    package_parent = str(Path(__file__).resolve().parents[2])
    env = environ_without_launcher()   # the child is not a rank of the launcher's job
    env["PYTHONPATH"] = os.pathsep.join(filter(None,
                                               [package_parent, os.environ.get("PYTHONPATH")]))
    try:
        child = subprocess.run([sys.executable, "-c", _CHILD_CHECK, path], capture_output=True,
                               text=True, timeout=seconds, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return "hung", ""
    if child.returncode < 0:
        return f"signal {-child.returncode}", ""
    return child.returncode, child.stderr.strip().splitlines()[-1] if child.stderr.strip() else ""


# Run by check_readable in a child process: read everything a run reads but the pixels.
_CHILD_CHECK = """
import sys
from ddptrain.data.format import inspect
from ddptrain.errors import DataError
try:
    inspect(sys.argv[1], walk_chunks=True)
except DataError as error:
    print(str(error).replace(chr(10), " "), file=sys.stderr)
    sys.exit(2)
except BaseException as error:
    print(f"{sys.argv[1]}: damaged: reading its metadata failed ({type(error).__name__})",
          file=sys.stderr)
    sys.exit(3)
"""
