"""``ddptrain launch -n N [options]``: ``mpiexec -n N python -m ddptrain [options]`` that never
loses a stop signal.

A signal sent to a plain ``mpiexec`` while the job starts can be lost or
turn into a crash. MPICH's ``mpiexec`` (Hydra) passes SIGTERM, SIGUSR1 and
SIGINT on to the ranks it has started, and in its first tens of
milliseconds it has started none: the signal is dropped and the job trains
to its end. A little later the ranks exist but are still starting Python,
before ddptrain's first line: the signal's default action kills them
(SIGINT raises KeyboardInterrupt inside Python's own imports, which can
crash or hang the job).

The launcher is the job's first process and catches these signals from its
own first line (``__main__``). It starts ``mpiexec`` in a process group of
its own, so that Ctrl-C on a terminal reaches the launcher alone, and passes
each signal on to ``mpiexec`` only once every rank can take it: rank 0 says
so (``run/supervised.py``) after a barrier that every rank reaches with its
stop handler installed. A signal that comes earlier is held until then, so
the run stops after its first step with a checkpoint (status 3), as a
signal during the start-up of one process does. If the ranks never say so
(a script that does not train), a second signal passes the held ones on at
once. The job's exit status is ``mpiexec``'s.
"""

from __future__ import annotations

import ctypes
import hmac
import os
import secrets
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import sys

from ddptrain.distributed.launcher import find_mpiexec, mpiexec_family, open_mpi_options
from ddptrain.errors import UserError
from ddptrain.run.signals import SIGNALS, take_early_signals
from ddptrain.run.supervised import VARIABLE

USAGE = """\
usage: ddptrain launch -n N [--mpiexec PATH] [--mpiexec-args "ARGS"] [--] [OPTIONS | SCRIPT.py ARGS]

Runs `mpiexec -n N python -m ddptrain OPTIONS` (or `mpiexec -n N python SCRIPT.py ARGS`), and
passes SIGTERM, SIGUSR1 and SIGINT on to it only once every rank can take them: a signal at any
moment stops the run after a step with a checkpoint (status 3), never lost, never a crash.

  -n, --ranks N          the number of ranks
  --mpiexec PATH         the MPI launcher (default: the mpiexec beside this Python, else on PATH)
  --mpiexec-args "ARGS"  more options for it, as one string (e.g. "-hosts a,b -ppn 2")
  --                     the end of the launcher's options (optional)
"""
MAX_RANKS = 1 << 20
PR_SET_PDEATHSIG = 1
TOKEN_BYTES = 16


class Launch:
    """The launcher's reading of its command line."""

    def __init__(self, ranks, mpiexec, mpiexec_args, rest):
        self.ranks, self.mpiexec, self.mpiexec_args, self.rest = ranks, mpiexec, mpiexec_args, rest

    def command(self, options=()):
        """The ``mpiexec`` command line of the job; ``options``: what this mpiexec needs to start
        the ranks as Hydra would (``open_mpi_options``)."""
        ranks_run = ([sys.executable] + self.rest if self.rest and self.rest[0].endswith(".py")
                     else [sys.executable, "-m", "ddptrain"] + self.rest)
        return ([self.mpiexec, *options] + self.mpiexec_args + ["-n", str(self.ranks)]
                + ranks_run)


def parse(argv):
    """The launcher's options, up to ``--`` or the first argument that is not one of them."""
    argv = list(argv)
    ranks, mpiexec, mpiexec_args = None, None, []
    while argv:
        word = argv[0]
        if word == "--":
            argv.pop(0)
            break
        if word in ("-h", "--help"):
            print(USAGE, end="")
            raise SystemExit(0)
        if word not in ("-n", "--ranks", "--mpiexec", "--mpiexec-args"):
            break
        argv.pop(0)
        if not argv:
            raise UserError(f"launch: {word} needs a value (see ddptrain launch --help)")
        value = argv.pop(0)
        if word in ("-n", "--ranks"):
            ranks = _ranks(value)
        elif word == "--mpiexec":
            mpiexec = value
        else:
            try:
                mpiexec_args = shlex.split(value)
            except ValueError as error:
                raise UserError(f"launch --mpiexec-args {value!r}: {error}") from None
    if ranks is None:
        raise UserError("launch: -n N, the number of ranks, is required "
                        "(see ddptrain launch --help)")
    return Launch(ranks, _find_mpiexec(mpiexec), mpiexec_args, argv)


def _ranks(text):
    if not text.isdigit() or not 1 <= int(text) <= MAX_RANKS:
        raise UserError(f"launch -n {text}: the number of ranks must be a whole number "
                        f"from 1 to {MAX_RANKS}")
    return int(text)


def _find_mpiexec(given):
    if given is None:
        try:
            return find_mpiexec()
        except RuntimeError as error:
            raise UserError(f"launch: {error}, or give --mpiexec PATH") from None
    found = shutil.which(given)
    if found is None:
        raise UserError(f"launch --mpiexec {given}: no such program")
    return found


def main(argv):
    """Run the job; returns its exit status (``mpiexec``'s, 128 + N if a signal N killed it)."""
    launch = parse(argv)
    return Supervisor(launch).run()


class Supervisor:
    """Starts ``mpiexec`` and passes each stop signal on once every rank can take it."""

    def __init__(self, launch):
        self.launch = launch
        self.family = mpiexec_family(launch.mpiexec)
        self.ranks_ready = False
        self.held = []      # signal numbers that came before the ranks were ready
        self._arrived = []  # signal numbers not yet dealt with

    def run(self):
        wakeup_read, wakeup_write = os.pipe()
        os.set_blocking(wakeup_write, False)
        previous_wakeup = signal.set_wakeup_fd(wakeup_write)
        previous = {number: signal.signal(number, self._remember) for number in _numbers()}
        # those that came since __main__'s first line, before the handlers above
        self._arrived[:0] = [getattr(signal, name) for name in take_early_signals()]
        token = secrets.token_hex(TOKEN_BYTES)
        try:
            with socket.create_server(("", 0), backlog=64) as listener:
                environ = dict(os.environ)
                environ[VARIABLE] = f"{socket.gethostname()}:{listener.getsockname()[1]}:{token}"
                try:
                    options = open_mpi_options(self.launch.mpiexec)
                    job = subprocess.Popen(self.launch.command(options), env=environ,
                                           stdin=subprocess.DEVNULL,
                                           preexec_fn=_own_group_and_leash)
                except OSError as error:
                    raise UserError(f"launch: cannot start {self.launch.mpiexec}: "
                                    f"{error.strerror or error}") from None
                self._watch(job, listener, wakeup_read, token)
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
            signal.set_wakeup_fd(previous_wakeup)
            os.close(wakeup_read)
            os.close(wakeup_write)
        status = job.returncode
        return status if status >= 0 else 128 - status

    def _remember(self, number, frame):
        self._arrived.append(number)   # dealt with in _watch's loop (set_wakeup_fd wakes it)

    def _watch(self, job, listener, wakeup_read, token):
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ, "rank 0")
        selector.register(wakeup_read, selectors.EVENT_READ, "signal")
        while job.poll() is None:
            self._pass_on(job)
            for key, _ in selector.select(timeout=0.05):
                if key.data == "signal":
                    os.read(wakeup_read, 512)
                elif _token_matches(listener, token):
                    self.ranks_ready = True
        selector.close()

    def _pass_on(self, job):
        arrived, self._arrived = self._arrived, []
        if arrived and not self.ranks_ready:
            if self.held:   # a second one: pass them all on now, ready or not
                self.held, arrived = [], self.held + arrived
            else:
                self.held, arrived = arrived, []
                print(f"ddptrain launch: {signal.Signals(self.held[0]).name} held until every "
                      "rank can take it (send it again to pass it on now)", file=sys.stderr,
                      flush=True)
        if self.ranks_ready and self.held:
            self.held, arrived = [], self.held + arrived
        for number in arrived:
            if self.family == "openmpi" and number != signal.SIGUSR1:
                # Open MPI's mpiexec ends the job itself on SIGTERM and SIGINT (SIGTERM to the
                # ranks, SIGKILL 0.25 s later); SIGUSR1 it passes on, and the ranks then stop
                # after a step with a checkpoint, as a stop signal promises
                number = signal.SIGUSR1
            try:
                os.kill(job.pid, number)   # mpiexec passes it on to every rank
            except ProcessLookupError:
                return


def _numbers():
    return [getattr(signal, name) for name in SIGNALS if hasattr(signal, name)]


def _token_matches(listener, token):
    """Whether the connection waiting on ``listener`` brings the job's token (rank 0's report)."""
    try:
        connection, _ = listener.accept()
    except OSError:
        return False
    with connection:
        connection.settimeout(2.0)
        try:
            received = connection.recv(len(token) + 1).strip()
        except OSError:
            return False
    return hmac.compare_digest(received, token.encode("ascii"))


def _own_group_and_leash():
    """In mpiexec before it starts: a process group of its own, so that Ctrl-C on the terminal
    reaches the launcher only; and SIGTERM when the launcher dies, so that the job does not run
    on unsupervised (it stops after a step, with a checkpoint)."""
    os.setpgid(0, 0)
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    except (OSError, AttributeError):
        pass   # not Linux: without the leash
