"""Denormal floats flushed to zero while a run trains (``--denormals flush``, the default): inside
the run a float32 below 1.2e-38 computes as zero, in the rank's thread and the threads it starts;
outside, and with ``--denormals keep``, arithmetic is IEEE's; the model trained is the same."""

import threading

import numpy as np
import pytest

from ddptrain import cli
from ddptrain.backends import denormals
from ddptrain.errors import UserError
from ddptrain.training.trainer import Callback
from helpers import final_params, metrics_records, model_spec

needs_flushing = pytest.mark.skipif(not denormals.supported(),
                                    reason="flushing is known on x86-64 and AArch64 Linux")

DENORMAL = np.float32(1e-39)   # below float32's smallest normal number, 1.18e-38


def survives(value=DENORMAL):
    """Whether a denormal comes out of a multiplication by one as itself (IEEE) rather than zero
    (flushed)."""
    return bool(np.array([value], np.float32) * np.float32(1.0) != 0)


@needs_flushing
def test_inside_the_block_denormals_compute_as_zero_and_afterwards_as_before():
    assert survives()
    with denormals.flushed():
        assert not survives()
        assert survives(np.float32(1.2e-38))   # the smallest normal numbers are untouched
    assert survives()
    with denormals.flushed(enabled=False):
        assert survives()


@needs_flushing
def test_threads_started_inside_the_block_flush_too():
    seen = {}
    with denormals.flushed():
        thread = threading.Thread(target=lambda: seen.update(survives=survives()))
        thread.start()
        thread.join()
    assert seen == {"survives": False}


@needs_flushing
def test_a_run_flushes_by_default_and_keeps_with_the_option(small_data, tmp_path):
    seen = []

    class Probe(Callback):
        def on_step_end(self, trainer, end):
            if len(seen) < 2:
                seen.append(survives())

    import ddptrain
    for mode in ("flush", "keep"):
        seen.clear()
        ddptrain.train(model_spec(), small_data, epochs=1, quiet=True, run_dir=str(tmp_path / mode),
                       callbacks=[Probe()], denormals=mode)
        assert seen and all(s == (mode == "keep") for s in seen), mode
        assert survives()   # the process's own setting is back


def test_an_unknown_mode_is_refused(small_data, capsys):
    assert cli.main(["--data", small_data, "--denormals", "sometimes"]) != 0
    assert "--denormals: invalid choice: 'sometimes'" in capsys.readouterr().err
    import ddptrain
    with pytest.raises(UserError, match="--denormals must be one of flush, keep, got 'sometimes'"):
        ddptrain.train(model_spec(), small_data, denormals="sometimes", dry_run=True)


def test_where_flushing_is_unknown_nothing_changes_and_the_start_up_line_says_so(monkeypatch):
    monkeypatch.setattr(denormals, "_fenv_type", lambda: None)
    assert not denormals.supported()
    before = survives()
    with denormals.flushed():
        assert survives() == before
    assert denormals.describe("flush") == "denormals kept (flushing is not known on this platform)"
    assert denormals.describe("keep") == "denormals kept"


@needs_flushing
def test_flushing_trains_the_model_keeping_trains_to_rounding_of_tiny_values(small_data, tmp_path):
    def train(mode):
        run_dir = tmp_path / mode
        assert cli.main(["--data", small_data, "--model", model_spec(), "--epochs", "2", "--quiet",
                         "--denormals", mode, "--run-dir", str(run_dir)]) == 0
        return final_params(run_dir), metrics_records(run_dir)[-1]["test_accuracy"]

    (flushed, flushed_accuracy), (kept, kept_accuracy) = train("flush"), train("keep")
    np.testing.assert_allclose(flushed, kept, rtol=0, atol=1e-30)
    assert flushed_accuracy == kept_accuracy
