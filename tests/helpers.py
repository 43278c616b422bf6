"""What the tests share: small data sets, running ddptrain as a user would, finite differences,
damage.

Imported as ``from helpers import ...``: ``tests/`` has no ``__init__.py``,
and ``conftest.py`` puts this folder on ``sys.path``.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np

from ddptrain.data.sampler import DEFAULT_VIRTUAL_SHARDS, epoch_plan
from ddptrain.data.writer import write_dataset
from ddptrain.distributed.launcher import environ_without_launcher, mpiexec_argv
from ddptrain.nn.layer import Layer
from ddptrain.run import checkpoint as ckpt_io
from ddptrain.training.trainer import Callback
from launchers import launcher, without_launcher_reports

ROOT = Path(__file__).resolve().parent.parent
INJECT = Path(__file__).resolve().parent / "inject.py"

# ---------------------------------------------------------------- small, learnable data sets
#
# Each class has a random 0..255 template; a sample is its class template plus
# noise. A tiny MLP learns them in a few steps, so training tests can check
# that the loss falls, while the files stay a few kilobytes.


def make_images(n, side, n_classes, rng, templates):
    labels = rng.integers(0, n_classes, size=n).astype(np.uint8)
    noise = rng.normal(0, 40, size=(n, side, side))
    images = np.clip(templates[labels] + noise, 0, 255).astype(np.uint8)
    return images, labels


def template_arrays(side=8, n_train=240, n_test=60, n_classes=10, seed=0):
    """In-memory float32 data, ``(x_train, y_train, x_test, y_test)``: a template per class plus
    uniform noise, ``side x side`` images, as ``ddptrain.train(data=...)`` takes them."""
    rng = np.random.default_rng(seed)
    templates = rng.random((n_classes, side, side))
    y_train, y_test = rng.integers(0, n_classes, n_train), rng.integers(0, n_classes, n_test)

    def noisy(labels):
        return (templates[labels] + 0.5 * rng.random((len(labels), side, side))).astype(np.float32)

    return noisy(y_train), y_train, noisy(y_test), y_test


def make_dataset(path, n_train=240, n_test=60, side=8, n_classes=10, seed=0):
    """Write a ddptrain HDF5 file of ``side x side`` images; returns the path (as str)."""
    rng = np.random.default_rng(seed)
    templates = rng.uniform(0, 255, size=(n_classes, side, side))
    train = make_images(n_train, side, n_classes, rng, templates)
    test = make_images(n_test, side, n_classes, rng, templates)
    write_dataset(path, *train, *test, attrs={"source": "synthetic test data"})
    return str(path)


def make_chunked_dataset(path, n_train=480, n_test=60, side=8, chunk_rows=16, n_classes=10, seed=0):
    """``make_dataset``'s kind of data, its training images chunked by ``chunk_rows`` rows (the
    writer chunks by about 1 MiB): a small file whose virtual shards span several chunks, to stream.
    Written with h5py in the layout ``format.py`` describes."""
    from ddptrain.data.format import FORMAT, FORMAT_VERSION
    from ddptrain.data.writer import content_sha256
    rng = np.random.default_rng(seed)
    templates = rng.uniform(0, 255, size=(n_classes, side, side))
    splits = {"train": make_images(n_train, side, n_classes, rng, templates),
              "test": make_images(n_test, side, n_classes, rng, templates)}
    with h5py.File(path, "w", libver="latest") as f:
        f.attrs.update({"format": np.bytes_(FORMAT), "format_version": FORMAT_VERSION,
                        "n_classes": n_classes,
                        "class_names": np.array([str(c).encode() for c in range(n_classes)]),
                        "content_sha256": np.bytes_(content_sha256(splits).encode())})
        for split, (images, labels) in splits.items():
            rows = chunk_rows if split == "train" else len(images)
            f.create_dataset(f"{split}/images", data=images, chunks=(rows, side, side),
                             fletcher32=True)
            f.create_dataset(f"{split}/labels", data=labels, chunks=(min(rows, len(labels)),),
                             fletcher32=True)
    return str(path)


def model_spec(side=8, hidden=(16,), n_classes=10):
    """The MLP spec that fits ``make_dataset(side=side)``."""
    return "-".join(str(s) for s in (side * side, *hidden, n_classes))


# ---------------------------------------------------------------- running ddptrain as a user would


def mpiexec(ranks):
    """The argv that starts ``ranks`` ranks of the program that follows: the mpiexec of the MPI this
    interpreter's venv has (MPICH's or Open MPI's wheel), with what Open MPI's needs to act as
    Hydra."""
    return mpiexec_argv(ranks)


def command(args, ranks=None, faults=None):
    """The argv that runs ``python -m ddptrain ARGS``, under mpiexec with ``ranks`` ranks if given.

    ``faults`` (see ``tests/inject.py``) runs it through the fault injector instead.
    """
    program = [str(INJECT), faults] if faults else ["-m", "ddptrain"]
    python = [sys.executable, *program, *map(str, args)]
    return python if ranks is None else [*mpiexec(ranks), *python]


def clean_env(extra=None):
    # A test must not inherit an MPI or SLURM context from whatever started pytest.
    return {**environ_without_launcher(), **(extra or {})}


def run(args, ranks=None, timeout=120, env=None, cwd=None, faults=None):
    """Run ddptrain to completion; returns the CompletedProcess (stdout and stderr as text)."""
    return subprocess.run(command(args, ranks, faults), capture_output=True, text=True,
                          timeout=timeout, env=clean_env(env), cwd=cwd or ROOT)


def start(args, ranks=None, env=None, cwd=None, faults=None):
    """Start ddptrain in the background (for signal tests); returns it as a ``Running``."""
    return Running(command(args, ranks, faults), env=clean_env(env), cwd=cwd or ROOT)


class Running:
    """A process started in the background, in a session of its own, whose output is read as it
    comes.

    A test that acts on a running process (a signal, a second run on its folder) first waits for a
    line that says the process got there (``wait_for_line``), rather than sleeping a guessed time: a
    loaded machine makes any guess wrong. Otherwise used as a ``Popen``: ``pid``, ``poll``,
    ``returncode``, ``communicate``.
    """

    def __init__(self, argv, env, cwd):
        self.popen = subprocess.Popen(list(map(str, argv)), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                                      start_new_session=True)
        self.pid = self.popen.pid
        self._lines = {"stdout": [], "stderr": []}
        self._open = {"stdout": True, "stderr": True}
        self._arrived = threading.Condition()
        self._readers = [threading.Thread(target=self._read, args=(name,),
                                          daemon=True) for name in self._lines]
        for reader in self._readers:
            reader.start()

    def _read(self, name):
        for line in getattr(self.popen, name):
            with self._arrived:
                self._lines[name].append(line)
                self._arrived.notify_all()
        with self._arrived:
            self._open[name] = False
            self._arrived.notify_all()

    def wait_for_line(self, text, stream="stdout", timeout=60):
        """The first line of ``stream`` that contains ``text``, once the process has printed it; an
        AssertionError, with what it printed, if it closes ``stream`` (ends) or ``timeout`` passes
        first."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                found = next((line for line in self._lines[stream] if text in line), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if not self._open[stream] or left <= 0:
                    why = "ended" if not self._open[stream] else f"printed none within {timeout} s"
                    raise AssertionError(f"no line with {text!r} on its {stream}: it "
                                         f"{why}\n{self._printed()}")
                self._arrived.wait(left)

    def wait_for_path(self, path, timeout=60):
        """Until ``path`` exists (a file the process writes); an AssertionError, with what it
        printed, if the process ends or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if self.poll() is not None:
                raise AssertionError(f"it ended ({self.returncode}) before writing "
                                     f"{path}\n{self._printed()}")
            assert time.monotonic() < deadline, (f"{path} did not appear within {timeout} s\n"
                                                 f"{self._printed()}")
            time.sleep(0.01)

    def _printed(self):
        return "".join(f"--- {name} ---\n{''.join(lines)[-3000:]}" for name,
                       lines in self._lines.items())

    def poll(self):
        return self.popen.poll()

    @property
    def returncode(self):
        return self.popen.returncode

    def communicate(self, timeout=60):
        """Wait for the process to end; ``(stdout, stderr)``, all of it."""
        self.popen.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=timeout)
        return "".join(self._lines["stdout"]), "".join(self._lines["stderr"])


def wait_until_mapped(pid, library, timeout=30):
    """Until process ``pid`` has a file whose name contains ``library`` mapped (/proc/PID/maps): how
    a test sees that a process got to an import (``_multiarray_umath``: numpy's; ``libhdf5``:
    h5py's) without asking it. An AssertionError if the process ends or ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(f"/proc/{pid}/maps") as maps:
                if library in maps.read():
                    return
        except OSError:
            raise AssertionError(f"process {pid} ended before it loaded {library}") from None
        assert time.monotonic() < deadline, f"process {pid} did not load {library} in {timeout} s"
        time.sleep(0.002)   # an import takes tens of milliseconds: a poll lands well inside it


# ---------------------------------------------------------------- the ranks of a running job


def _environ(pid):
    """The environment process ``pid`` started with (``/proc/PID/environ``: readable as root or its
    user), as a dict of bytes; None if the process is gone."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return dict(item.partition(b"=")[::2] for item in f.read().split(b"\0") if item)
    except OSError:
        return None


def _parent(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            # the command in (...) may hold spaces
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


# What a launcher tells the program it starts its rank by: Hydra (MPICH), Open MPI.
RANK_VARIABLES = (b"PMI_RANK", b"OMPI_COMM_WORLD_RANK")


def _rank_in(environ):
    for name in RANK_VARIABLES:
        if environ.get(name, b"").isdigit():
            return int(environ[name])
    return None


def launched_rank(pid):
    """The rank that an MPI launcher started process ``pid`` as, or None if it is no rank.

    A rank is a process with ``PMI_RANK`` (Hydra) or ``OMPI_COMM_WORLD_RANK`` (Open MPI) in its
    environment, set by the launcher's proxy or daemon for the program it starts, whose parent has
    none: that leaves out the proxy, the shells and launchers around it (whose command lines may
    well hold the word ``ddptrain``, from the path of the checkout), and the children a rank forks,
    which inherit its environment. The tests start their jobs without a launcher's variables
    (``clean_env``), so nothing else carries them.
    """
    environ = _environ(pid)
    rank = None if environ is None else _rank_in(environ)
    if rank is None:
        return None
    parent = _environ(_parent(pid))
    if parent is not None and _rank_in(parent) is not None:
        return None
    return rank


def ranks_among(pids):
    """``{rank: pid}`` of the ranks among ``pids``."""
    ranks = {}
    for pid in pids:
        rank = launched_rank(pid)
        if rank is not None:
            ranks[rank] = pid
    return ranks


def descendants(pid):
    """The pids of every process below ``pid`` in the process tree."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parent = _parent(entry)
            if parent is not None:
                children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_job(pid):
    """SIGKILL to process ``pid`` (a job's mpiexec), its process group and every process below it:
    the launchers start the ranks in process groups of their own (Hydra's proxy has one, Open
    MPI gives one to each rank), which a signal to the group of mpiexec misses, and ranks whose
    mpiexec is gone go on training."""
    below = descendants(pid)   # before the kill: orphans are adopted, and lost from the tree
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for process in below:
        try:
            os.kill(process, signal.SIGKILL)
        except ProcessLookupError:
            pass


def rank_pids(launcher_pid, ranks, timeout=30):
    """``{rank: pid}`` of the ``ranks`` ranks under mpiexec ``launcher_pid``, once all of them
    run."""
    deadline = time.monotonic() + timeout
    while True:
        found = ranks_among(descendants(launcher_pid))
        if len(found) == ranks:
            return found
        assert time.monotonic() < deadline, f"found only ranks {found} of {ranks} in {timeout} s"
        time.sleep(0.02)


def error_lines(stderr):
    """The lines that the program printed on ``stderr``, blank lines and the launcher's own reports
    (Open MPI's mpiexec frames one when a rank exits with a non-zero status) left out."""
    return [line for line in without_launcher_reports(stderr).splitlines() if line.strip()]


def in_process(argv, capsys):
    """``(status, stderr lines)`` of the command line ``argv`` run in this process (no process
    started)."""
    from ddptrain import cli
    status = cli.main([str(a) for a in argv])
    return status, error_lines(capsys.readouterr().err)


# ---------------------------------------------------------------- what a run leaves behind


def mpi_segments():
    """The names of the shared-memory segments in /dev/shm of this session's MPI (MPICH's
    ``mpich_shm_*``, or Open MPI's ``sm_segment.*``)."""
    try:
        return {name for name in os.listdir("/dev/shm")
                if name.startswith(launcher().segment_prefixes)}
    except OSError:
        return set()


def remove_orphaned_segments(before, grace=2.0):
    """Remove the MPI segments made since ``before`` (a ``mpi_segments()``) that no process maps
    any more.

    Ranks that a test kills (or that abort) never unlink their segments, and /dev/shm is memory: a
    few MB per such test, for as long as the machine runs. Segments still mapped belong to live jobs
    and stay.
    """
    deadline = time.monotonic() + grace
    while True:
        new = mpi_segments() - before
        mapped = _mapped(new) if new else set()
        for name in new - mapped:
            try:
                os.unlink(f"/dev/shm/{name}")
            except OSError:
                pass
        # A rank the launcher is still ending maps its segment a moment longer: wait for it, a
        # little.
        if not mapped or time.monotonic() > deadline:
            return
        time.sleep(0.05)


# Open MPI's mpiexec (PRRTE's prterun) keeps its session in /tmp/ompi.PID (TMPDIR's), and removes
# it as it ends, unless it is killed.
SESSIONS = Path(os.environ.get("TMPDIR", "/tmp"))


def open_mpi_sessions():
    return set(SESSIONS.glob("ompi.[0-9]*"))


def remove_orphaned_sessions(before):
    """Remove the Open MPI session folders made since ``before`` (an ``open_mpi_sessions()``) whose
    mpiexec is gone."""
    for folder in open_mpi_sessions() - before:
        if not Path(f"/proc/{folder.suffix[1:]}").exists():
            shutil.rmtree(folder, ignore_errors=True)


def _mapped(names):
    """Those of ``names`` (segments in /dev/shm) that some process maps."""
    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                text = f.read()
        except OSError:
            continue
        mapped.update(name for name in names if f"/dev/shm/{name}" in text)
    return mapped



def final_params(run_dir):
    """The newest checkpoint's parameters, as one flat float64 array in name order."""
    final = ckpt_io.newest_valid(Path(run_dir) / "checkpoints")
    return np.concatenate([final.params[name].ravel() for name in sorted(final.params)])


def metrics_records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def relative_error(a, b):
    """``max|a - b| / max|b|``."""
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ---------------------------------------------------------------- layers for tests


class Tally(Layer):
    """A buffer that counts the rows the layer saw in training mode (none in evaluation); passes x
    through."""

    def buffer_shapes(self):
        return {"rows": (1,)}

    def forward(self, x):
        if self.training:
            self.buffers["rows"] += len(x)
        return x

    def backward(self, dout, need_input_grad=True):
        return dout


# ---------------------------------------------------------------- damage


def flip_a_byte_of(path, dataset="params/linear1.weight"):
    """Corrupt the file on disk, as a bad sector would: one byte inside a dataset's stored data."""
    with h5py.File(path, "r") as f:
        offset = f[dataset].id.get_offset() + 5
    flip_byte_at(path, offset)


def flip_byte_at(path, offset, mask=0x40):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ mask]))


# ---------------------------------------------------------------- finite differences
#
# ``numerical_grad(f, x)`` perturbs ``x`` in place one coordinate at a time,
# evaluates the scalar ``f(x)`` at ``x + eps`` and ``x - eps``, and restores the
# coordinate exactly. ``f`` may ignore its argument and read ``x`` (or a buffer
# that ``x`` is a view of) through a closure: that is how a model's parameters
# are checked.


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
    """Up to ``k`` distinct flat indices into ``x``, drawn reproducibly (all of them if ``x`` is
    small)."""
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


# ---------------------------------------------------------------- simulated ranks


def on_simulated_ranks(size, work):
    """``work(comm)`` on ``size`` simulated ranks at once; every rank's result, in rank order."""
    from ddptrain.distributed.simulate import ThreadComm
    comms, results, errors = ThreadComm.create(size), [None] * size, []

    def run(comm):
        try:
            results[comm.rank] = work(comm)
        except BaseException as error:   # noqa: BLE001 - reported below
            errors.append(error)
            comm.break_collectives()

    threads = [threading.Thread(target=run, args=(comm,)) for comm in comms]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def one_hot(labels, n_classes, dtype=np.float32):
    """Rows of ``n_classes`` probabilities, 1 at each label: targets for the losses' soft-label
    paths."""
    out = np.zeros((len(labels), n_classes), dtype=dtype)
    out[np.arange(len(labels)), labels] = 1
    return out


def global_batches(n, global_batch, seed, epoch, n_shards=None, drop_last=False):
    """The global batches of one epoch as sorted arrays of file rows: what every rank count must
    train."""
    plan = epoch_plan(n, global_batch, 0, 1, seed, epoch, n_shards or DEFAULT_VIRTUAL_SHARDS,
                      drop_last)
    return [np.sort(plan.global_rows[plan.step_bounds[t]:plan.step_bounds[t + 1]])
            for t in range(plan.n_steps)]


class SignalAtStep(Callback):
    """Sends this process SIGUSR1 after step ``step``, as SLURM does before a time limit."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, end):
        if trainer.position.step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)
