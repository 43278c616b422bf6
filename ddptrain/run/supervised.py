"""The ranks' side of ``ddptrain launch``: telling it that every rank can take a stop signal.

``ddptrain launch`` (``ddptrain/supervisor.py``) starts ``mpiexec`` and holds
a stop signal that arrives before the ranks could take it: MPICH's
``mpiexec`` drops a signal that comes before it has started its ranks, and a
rank signalled while Python starts dies of it (a traceback for SIGINT) or
hangs. Once every rank has its handler (a barrier after ``StopRequest`` is
installed proves it), rank 0 connects to the address the launcher put in
``DDPTRAIN_SUPERVISOR`` and sends its token; from then on the launcher
passes every signal straight on to ``mpiexec``. Without that variable (a
plain ``mpiexec``, ``srun``, one process) nothing happens here.
"""

from __future__ import annotations

import os
import socket
import sys

VARIABLE = "DDPTRAIN_SUPERVISOR"   # HOST:PORT:TOKEN, set by ddptrain launch in its ranks
CONNECT_SECONDS = 5.0


def report_ready(comm):
    """Tell ``ddptrain launch`` that every rank has its stop handler; collective when launched."""
    address = os.environ.pop(VARIABLE, None)   # once: a process this rank starts is not a rank
    if address is None:
        return
    comm.barrier()   # every rank is past StopRequest.install
    if comm.rank == 0:
        try:
            _send_token(address)
        except (OSError, ValueError) as error:
            print(f"warning: could not tell ddptrain launch that the ranks are ready ({error}); "
                  "a stop signal sent to it during the start-up waits for a second one",
                  file=sys.stderr, flush=True)


def _send_token(address):
    host, port, token = address.rsplit(":", 2)
    if host == socket.gethostname():
        host = "127.0.0.1"   # the launcher listens on every interface of its host
    with socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS) as connection:
        connection.sendall(token.encode("ascii") + b"\n")
