"""Everything only rank 0 does: printing (``Console``), the run folder's files (``RunFolder``) and
its TensorBoard events (``EventFile``).

``Console`` prints on rank 0 and does nothing elsewhere; it never
communicates. Every method of ``RunFolder`` is collective: all ranks call
it at the same point of the run, rank 0 does the work, and the outcome
(success, or the error message) is broadcast, so that a failed write stops
every rank with the same clear error instead of leaving the others waiting
in their next collective. The broadcast sits outside the rank-0 branch: a
collective inside one deadlocks.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import socket
import sys
import time
from pathlib import Path

from ddptrain.durable import NO_FOLLOW, append, open_lock_file, write_atomically
from ddptrain.errors import CheckpointError, UserError
from ddptrain.files import open_regular
from ddptrain.run import checkpoint as ckpt_io
from ddptrain.run.progress import Progress


def run_on_rank0(comm, work, error_type=UserError, describe="failed"):
    """Run ``work()`` on rank 0 and return its result on every rank.

    If it fails there with a UserError or an OSError, every rank raises the
    same error (``error_type`` with ``describe`` for an OSError), marked
    ``all_ranks`` so that only rank 0 prints it.
    """
    result, error = None, None
    if comm.rank == 0:
        try:
            result = work()
        except UserError as exc:
            error = (type(exc), str(exc))
        except OSError as exc:
            error = (error_type, f"{describe}: {exc.strerror or exc}")
    result, error = comm.bcast((result, error))   # DDP: all ranks learn rank 0's outcome
    if error is not None:
        failure = error[0](error[1])
        failure.all_ranks = True
        raise failure
    return result


class Console:
    """Printing on rank 0 only: start-up lines, progress, per-epoch lines, warnings."""

    def __init__(self, rank, quiet=False, log_every=100):
        self.is_rank0 = rank == 0
        self.quiet = quiet
        self._progress = Progress(log_every, quiet=quiet) if self.is_rank0 else None

    def print(self, message, always=False):
        """Print on rank 0 only (``always``: even with --quiet)."""
        if self.is_rank0 and (always or not self.quiet):
            self._progress.clear()
            print(message, flush=True)

    def progress(self, **step):
        """After every step: a progress bar on a terminal, a line every --log-every steps
        otherwise."""
        if self.is_rank0:
            self._progress.update(**step)

    def warn(self, message):
        if self.is_rank0:
            self._progress.clear()
            print(message, file=sys.stderr, flush=True)


class RunFolder:
    """The run folder (``config.json``, ``metrics.jsonl``, ``checkpoints/``, ``tensorboard/``),
    written by rank 0 alone.

    One run at a time: ``take`` locks the folder (``flock`` on ``RUN_DIR/.lock``)
    until ``release`` or until the process ends, however it ends, so a killed
    run leaves no stale lock behind.

    A folder in which any of those is a symbolic link is refused: a run writes
    its own files there and nowhere else (every write goes through
    ``durable``, which never follows a link, should one be planted later).
    """

    LOCK = ".lock"
    TENSORBOARD = "tensorboard"
    HASHES = "hashes.jsonl"
    FILES = ("config.json", "metrics.jsonl", HASHES, LOCK, "checkpoints", TENSORBOARD)

    def __init__(self, comm, run_dir):
        self.comm = comm
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.tensorboard_dir = self.run_dir / self.TENSORBOARD
        self._lock = None
        self._events = None   # rank 0's EventFile, once open_events has opened it

    def take(self):
        """Create the folder and lock it for this run; a UserError if another run holds it."""
        def work():
            self._refuse_links()
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            lock = open_lock_file(self.run_dir / self.LOCK)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(lock, 400).decode(errors="replace").strip() or "another process"
                os.close(lock)
                raise UserError(f"the run folder {self.run_dir} is in use by another run "
                                f"({holder}): wait for it to end, or give another "
                                "--run-dir") from None
            except BaseException:
                os.close(lock)
                raise
            self._lock = lock   # from here on, release() lets it go whatever happens next
            os.ftruncate(lock, 0)
            os.write(lock, f"pid {os.getpid()} on {socket.gethostname()} since "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        run_on_rank0(self.comm, work, UserError, f"cannot write to the run folder {self.run_dir}")

    def check_free(self):
        """For --dry-run: a UserError if another run holds the folder (nothing is created)."""
        def work():
            self._refuse_links()
            try:
                lock = os.open(self.run_dir / self.LOCK, os.O_RDONLY | NO_FOLLOW)
            except FileNotFoundError:
                return
            try:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(f"the run folder {self.run_dir} is in use by another run: wait for "
                                "it to end, or give another --run-dir") from None
            finally:
                os.close(lock)
        run_on_rank0(self.comm, work, UserError, f"cannot read the run folder {self.run_dir}")

    def _refuse_links(self):
        """A UserError naming the first of the run's files (or of ``checkpoints/``'s) that is a
        symbolic link."""
        files = [self.run_dir / name for name in self.FILES]
        if self.checkpoint_dir.is_dir() and not self.checkpoint_dir.is_symlink():
            files += sorted(self.checkpoint_dir.iterdir())
        for path in files:
            if path.is_symlink():
                raise UserError(f"{path} is a symbolic link (to {os.readlink(path)}): a run "
                                "writes its own files in its folder and follows no link out of "
                                "it; remove the link, or give another --run-dir")

    def release(self):
        if self._events is not None:   # however the run ends: what it wrote is complete
            self._events.close()
            self._events = None
        if self._lock is not None:
            os.close(self._lock)   # the lock goes with the descriptor
            self._lock = None

    def open_events(self, step, warn):
        """A new event file in ``tensorboard/`` (created if missing) for a run that starts at
        ``step``: the ``EventFile`` on rank 0, None elsewhere. Collective; a UserError on every rank
        if it cannot be created. ``warn``: how a later failed write is reported (rank 0).

        The file purges the events of earlier files from ``step`` on (``EventFile``): those that a
        stopped or killed run wrote at the steps this one runs again. In a folder that holds no
        event file yet (the run's earlier part ran without --tensorboard, or in another folder),
        from step 0: the records of the run's history are all to be written."""
        def work():
            self.tensorboard_dir.mkdir(exist_ok=True)
            self._refuse_links()   # the folder, made or found: never a link out of the run folder
            existing = event_files(self.tensorboard_dir)
            self._events = EventFile(self.tensorboard_dir, purge_step=step if existing else 0,
                                     number=len(existing) + 1, warn=warn)
        run_on_rank0(self.comm, work, UserError, f"cannot write to {self.tensorboard_dir}")
        return self._events

    def write_config(self, config_dict):
        def work():
            _replace(self.run_dir / "config.json",
                     json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        run_on_rank0(self.comm, work, UserError, f"cannot write to the run folder {self.run_dir}")

    def append_metrics(self, record):
        def work():
            append(self.run_dir / "metrics.jsonl", json.dumps(record, sort_keys=True) + "\n")
        run_on_rank0(self.comm, work, UserError,
                     f"cannot append to {self.run_dir / 'metrics.jsonl'}")

    def rewrite_metrics(self, records):
        """``metrics.jsonl`` holds exactly ``records``: those of the checkpoint a run resumes from,
        or none for a run that starts from the beginning. Whatever a stopped or killed run recorded
        after its last checkpoint is recorded again as the steps run again, once."""
        def work():
            _replace(self.run_dir / "metrics.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n"
                                                             for r in records))
        run_on_rank0(self.comm, work, UserError, f"cannot write {self.run_dir / 'metrics.jsonl'}")

    def append_hash(self, record):
        """--record-hashes: one line of ``hashes.jsonl`` (``callbacks.HashRecord``)."""
        def work():
            append(self.run_dir / self.HASHES, json.dumps(record, sort_keys=True) + "\n")
        run_on_rank0(self.comm, work, UserError, f"cannot append to {self.run_dir / self.HASHES}")

    def rewrite_hashes(self, step):
        """``hashes.jsonl`` holds the lines of steps up to ``step`` only (the step a run resumes at;
        0: none), as ``rewrite_metrics`` does for the metrics: a resumed run records each step
        once."""
        def work():
            path = self.run_dir / self.HASHES
            kept = []
            if step and path.exists():
                with open_regular(path, "hashes file") as f:
                    for line in f.read().decode("utf-8", errors="replace").splitlines():
                        try:
                            record = json.loads(line)
                        except ValueError:
                            continue   # a line a killed run left half written
                        if isinstance(record, dict) and isinstance(record.get("step"), int) \
                                and record["step"] <= step:
                            kept.append(line + "\n")
            _replace(path, "".join(kept))
        run_on_rank0(self.comm, work, UserError, f"cannot write {self.run_dir / self.HASHES}")

    def write_timeline(self, trace, warn=print):
        """Write ``trace`` (rank 0's; None on the others) as ``timeline.json``, or, where a run
        before this one left one, as the first free ``timeline-<n>.json``: a resumed run keeps
        the timelines of the attempts before it. Returns the path, on every rank; None where the
        write failed, which is a warning (``warn``, on rank 0): the training goes on."""
        def work():
            path = timeline_paths(self.run_dir, free=True)[-1]
            try:
                write_atomically(path, json.dumps(trace, separators=(",", ":")).encode())
            except OSError as error:
                warn(f"warning: could not write the timeline {path}: {error.strerror or error}; "
                     "the run goes on without it")
                return None
            return path
        return run_on_rank0(self.comm, work, UserError,
                            f"cannot write the timeline in the run folder {self.run_dir}")

    def has_step_checkpoints(self):
        return run_on_rank0(self.comm, lambda: bool(ckpt_io.step_checkpoints(self.checkpoint_dir)))

    def save_checkpoint(self, make_checkpoint, step, keep, is_best=False, warn=print):
        """Write ``step-<step>.h5``, delete all but the ``keep`` newest, then write ``best.h5`` when
        ``is_best``.

        ``make_checkpoint()`` builds the Checkpoint, on rank 0 only. A failed
        write of the step checkpoint leaves every earlier checkpoint as it was
        and stops every rank with the same CheckpointError. Once it is written,
        the run can resume from it: a failed write of ``best.h5`` (a copy, for
        evaluation) is a warning (``warn``, on rank 0) naming it, and the run
        goes on, with ``best.h5`` as it was.
        """
        path = ckpt_io.step_path(self.checkpoint_dir, step)
        best = self.checkpoint_dir / "best.h5"

        def work():
            content = ckpt_io.encode(make_checkpoint())   # once, for best.h5 too
            write_atomically(path, content)
            # before best.h5: on a full disk, the space of the step checkpoints it deletes
            ckpt_io.prune(self.checkpoint_dir, keep)
            if is_best:
                try:
                    write_atomically(best, content)
                except OSError as error:
                    warn(f"warning: could not write {best}: {error.strerror or error}; it is left "
                         f"as it was, and {path.name} holds the best model so far (the run goes "
                         "on, and can resume from it)")
        run_on_rank0(self.comm, work, CheckpointError, f"could not write checkpoint {path} "
                     "(the previous ones are intact)")
        return path


TIMELINE = re.compile(r"timeline(?:-([1-9][0-9]{0,8}))?\.json")


def timeline_paths(run_dir, free=False):
    """The timelines in ``run_dir``, oldest first (``timeline.json``, ``timeline-2.json``, ...);
    ``free``: and then the name the next one gets."""
    numbers = []
    if Path(run_dir).is_dir():
        numbers = sorted(int(m.group(1) or 1) for name in os.listdir(run_dir)
                         if (m := TIMELINE.fullmatch(name)))
    paths = [Path(run_dir) / _timeline_name(n) for n in numbers]
    if free:
        paths.append(Path(run_dir) / _timeline_name(numbers[-1] + 1 if numbers else 1))
    return paths


def _timeline_name(number):
    return "timeline.json" if number == 1 else f"timeline-{number}.json"


def _replace(path, text):
    write_atomically(path, text.encode())


EVENT_FILE_PREFIX = "events.out.tfevents."   # tensorboardX's names, which TensorBoard looks for


def event_files(folder):
    """The TensorBoard event files in ``folder``, in the order TensorBoard reads them (by name)."""
    return sorted(path for path in Path(folder).iterdir()
                  if path.name.startswith(EVENT_FILE_PREFIX))


def import_tensorboardx():
    """tensorboardX's ``summary`` module, ``EventsWriter`` and ``event_pb2``, imported here, on the
    rank that writes the events: the other ranks never load it. A UserError if it cannot be
    imported."""
    try:
        from tensorboardX import summary
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto import event_pb2
    except ImportError as error:
        raise UserError(f"--tensorboard needs tensorboardX, which cannot be imported here "
                        f"({error}): pip install -e '.[tensorboard]' (or pip install "
                        "tensorboardX)") from None
    return summary, EventsWriter, event_pb2


class EventFile:
    """One run's TensorBoard event file, on rank 0: scalars, histograms and text, each event encoded
    by tensorboardX and written at once.

    Through tensorboardX's ``EventsWriter`` rather than its ``SummaryWriter``, which hands events to
    a thread of its own through a queue of 10: a write that fails there (a full disk) ends that
    thread, the queue fills, and rank 0 waits forever in its next event, with every other rank
    waiting for it. Here a failed write is an OSError where it is made: a warning (``warn``), and
    the run goes on without events. ``flush`` puts what was written on disk (tensorboardX fsyncs),
    so that what was flushed before a checkpoint survives a kill.

    The first event after tensorboardX's own (the file version) is a SessionLog START at
    ``purge_step``, as ``SummaryWriter(purge_step=...)`` writes: TensorBoard then drops the events
    of earlier files at that step or later, those of a stopped or killed run that the resumed one
    writes again. Files are read in the order of their names, which begin with the time in
    seconds: ``number`` (the count of files before it, and this one) puts this file after those of
    an earlier run in the same second. The random end of the name makes it one nobody can have
    planted a link at (``durable``'s rule).
    """

    def __init__(self, folder, purge_step, number, warn):
        self._summary, events_writer, self._pb = import_tensorboardx()
        self.folder, self.purge_step, self._warn = Path(folder), purge_step, warn
        self._writer = events_writer(str(self.folder / "events"),
                                     f".{number:06d}.{secrets.token_hex(8)}")
        self._write(self._pb.Event(step=purge_step, wall_time=time.time(), session_log=(
            self._pb.SessionLog(status=self._pb.SessionLog.START))))

    def scalar(self, tag, value, step):
        self._add(self._summary.scalar(tag, float(value)), step)

    def histogram(self, tag, values, step):
        # 64 equal bins between the smallest and largest value: one pass over the values
        self._add(self._summary.histogram(tag, values, bins=64), step)

    def text(self, tag, text, step):
        self._add(self._summary.text(tag, text), step)

    def _add(self, summary, step):
        self._write(self._pb.Event(step=step, wall_time=time.time(), summary=summary))

    def _write(self, event):
        self._guarded(lambda writer: writer.write_event(event))

    def flush(self):
        self._guarded(lambda writer: writer.flush())

    def close(self):
        self._guarded(lambda writer: writer.close())
        self._writer = None

    def _guarded(self, work):
        if self._writer is None:   # closed, or stopped by a failed write
            return
        try:
            work(self._writer)
        except OSError as error:
            self._writer = None
            self._warn(f"warning: could not write TensorBoard's events in {self.folder}: "
                       f"{error.strerror or error}; the run goes on without them (metrics.jsonl "
                       "holds every record)")
