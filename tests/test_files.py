"""Every path ddptrain reads is a regular file, or one line says what it is instead: a FIFO given as
--config, --data, --resume, evaluate's CHECKPOINT or plot's run folder ends the command at once,
where opening it would wait for a writer that may never come. And a stop signal ends a wait of the
start-up (``files.waiting``) at once, with status 128 + its number.
"""

import os
import signal
import socket
import threading

import pytest

from ddptrain import files
from ddptrain.errors import EXIT_USAGE, StartUpInterrupted, UserError
from ddptrain.run import signals
from helpers import in_process, model_spec

SMALL = ["--model", model_spec(), "--batch-size", "16", "--threads", "1", "--quiet"]


@pytest.fixture
def fifo(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    return tmp_path / "fifo"


@pytest.mark.parametrize("argv", [
    lambda data, fifo, run: ["--config", fifo, "--dry-run"],
    lambda data, fifo, run: ["--data", fifo, *SMALL, "--run-dir", run, "--dry-run"],
    lambda data, fifo, run: ["--data", data, *SMALL, "--run-dir", run, "--resume", fifo,
                             "--dry-run"],
    lambda data, fifo, run: ["--data", data, *SMALL, "--run-dir", run, "--resume", fifo],
    lambda data, fifo, run: ["evaluate", fifo],
    lambda data, fifo, run: ["evaluate", "--data", fifo, fifo],
    lambda data, fifo, run: ["plot", fifo.parent],   # its metrics.jsonl a FIFO
], ids=["config", "data", "resume", "resume-run", "evaluate", "evaluate-data", "plot"])
def test_a_fifo_for_any_file_read_is_refused_at_once_in_one_line(small_data, tmp_path, fifo, capsys,
                                                                 argv):
    if "plot" in str(argv(small_data, fifo, tmp_path)):
        os.rename(fifo, tmp_path / "metrics.jsonl")
        fifo = tmp_path / "metrics.jsonl"
    status, lines = in_process(argv(small_data, fifo, tmp_path / "run"), capsys)
    assert status == EXIT_USAGE and len(lines) == 1, lines
    assert f"{fifo}: not a regular file (a FIFO, a socket or a device)" in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_folder_a_socket_and_a_device_are_refused_with_the_path(tmp_path):
    with socket.socket(socket.AF_UNIX) as unix:
        unix.bind(str(tmp_path / "socket"))
        for path, problem in [(tmp_path, "is a folder, not a configuration file"),
                              (tmp_path / "socket", "not a regular file"),
                              ("/dev/zero", "not a regular file")]:
            with pytest.raises(UserError, match=f"^{path}: {problem}"):
                files.open_regular(path, "configuration file")


def test_a_path_swapped_for_a_fifo_after_the_check_is_refused_not_waited_on(fifo, monkeypatch):
    monkeypatch.setattr(files, "check_regular_file", lambda *args: None)   # the swap, in between
    with pytest.raises(UserError, match="not a regular file"):
        files.open_regular(fifo)


@pytest.fixture
def early_signals():
    """The stop signals handled as ``python -m ddptrain`` handles them from its first line."""
    previous = {number: signal.getsignal(number) for number in signals._numbers()}
    signals.remember_early_signals()
    yield
    for number, handler in previous.items():
        signal.signal(number, handler)
    signals._early.clear()
    files.stop_signal_arrived(None)


def test_a_stop_signal_ends_a_wait_of_the_start_up_blocked_in_the_kernel(fifo, early_signals):
    """Opening a FIFO blocks in the kernel; the handler's exception ends it (PEP 475 retries the
    call only when the handler returns)."""
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    with pytest.raises(StartUpInterrupted) as stopped, files.waiting():
        open(fifo, "rb")   # no writer: blocks until the signal
    timer.join()
    assert stopped.value.exit_status == 128 + signal.SIGTERM == 143
    assert str(stopped.value) == "stopped by SIGTERM during the start-up, before training"


def test_a_stop_signal_remembered_before_a_wait_ends_it_as_it_begins(early_signals):
    os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(StartUpInterrupted) as stopped, files.waiting():
        pytest.fail("the wait began")
    assert stopped.value.exit_status == 130


def test_outside_a_wait_a_stop_signal_is_only_remembered_for_the_run_to_stop_after_a_step(
        early_signals):
    os.kill(os.getpid(), signal.SIGTERM)
    request = signals.StopRequest().install()
    request.uninstall()
    assert request.signal_name == "SIGTERM"
    with files.waiting():   # taken over by the run: no longer ends a wait
        pass
