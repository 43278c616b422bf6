import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))   # the shared test helpers: helpers.py

import helpers  # noqa: E402
from helpers import make_dataset  # noqa: E402


def pytest_ignore_collect(collection_path, config):
    # tests/mpi runs under mpiexec (see test_mpi.py, which launches it with
    # 2, 3 and 4 ranks); a plain pytest run does not collect it directly.
    if collection_path.name == "mpi" and not config.getoption("with_mpi", default=False):
        return True
    return None


@pytest.fixture(autouse=True)
def processes_only_in_slow_tests(request, monkeypatch):
    """A test that starts a process must be marked ``slow``: ``pytest -m "not slow"`` is then the
    fast subset.

    (Not under mpiexec: tests/mpi runs only from the slow tests/test_mpi.py.)
    """
    under_mpiexec = request.config.getoption("with_mpi", default=False)
    if request.node.get_closest_marker("slow") is None and not under_mpiexec:
        def refuse(*args, **kwargs):
            raise AssertionError(f"{request.node.nodeid} starts a process: mark it "
                                 f"@pytest.mark.slow")
        monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


@pytest.fixture(autouse=True)
def no_shared_memory_left_behind(request):
    """A test that starts ranks, and kills some, leaves no orphaned MPI segment in /dev/shm
    (memory), nor the session folder of an Open MPI mpiexec it killed."""
    if request.node.get_closest_marker("slow") is None:
        yield
        return
    before, sessions = helpers.mpi_segments(), helpers.open_mpi_sessions()
    yield
    helpers.remove_orphaned_segments(before)
    helpers.remove_orphaned_sessions(sessions)


@pytest.fixture(autouse=True)
def default_stop_signals():
    """Each test starts with Python's own handlers of the stop signals. A command line run in this
    process ignores them once it has finished (run/signals.py); left so, they would be ignored by
    every process a later test starts too (an ignored signal stays ignored across exec), and a
    signal sent to one before its first line would be lost."""
    yield
    for name in ("SIGTERM", "SIGUSR1"):
        signal.signal(getattr(signal, name), signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """A 240 + 60 row data set of 8x8 images (fits the model spec '64-16-10')."""
    return make_dataset(tmp_path_factory.mktemp("data") / "small.h5")


@pytest.fixture
def started():
    """``helpers.start``, for a test that acts on a run in the background: whatever of it still runs
    when the test ends (after a failed assertion, say) is killed, with every process below it."""
    runs = []

    def start(*args, **kwargs):
        runs.append(helpers.start(*args, **kwargs))
        return runs[-1]

    yield start
    for run in runs:
        if run.poll() is None:
            helpers.kill_job(run.pid)
            run.communicate()
