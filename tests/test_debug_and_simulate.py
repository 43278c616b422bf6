"""--debug finds where a gradient is wrong; --simulate-ranks runs P ranks in one process."""

import numpy as np
import pytest

import helpers
from ddptrain import cli
from ddptrain.errors import NumericalError
from ddptrain.nn.losses import SoftmaxCrossEntropy
from ddptrain.nn.model import Sequential
from ddptrain.training import step
from ddptrain.training.debug import FiniteChecker
from helpers import final_params, model_spec, relative_error

SMALL = ["--model", model_spec(), "--batch-size", "30", "--epochs", "2"]


@pytest.mark.slow
@pytest.mark.mpiexec
def test_simulated_ranks_train_the_parameters_of_mpiexec_and_of_one_process(small_data, tmp_path):
    runs = {"simulated": ([*SMALL, "--simulate-ranks", "4"], None), "mpiexec": (SMALL, 4),
            "single": (SMALL, None)}
    params = {}
    for name, (args, ranks) in runs.items():
        proc = helpers.run(["--data", small_data, "--dtype", "float64", "--run-dir",
                            tmp_path / name, *args], ranks=ranks)
        assert proc.returncode == 0, proc.stderr
        params[name] = final_params(tmp_path / name)
    assert relative_error(params["simulated"], params["mpiexec"]) < 1e-9
    assert relative_error(params["simulated"], params["single"]) < 1e-9


def test_simulated_ranks_report_the_split_like_real_ranks(small_data, tmp_path, capsys):
    assert cli.main(["--data", small_data, *SMALL, "--simulate-ranks", "3", "--run-dir",
                     str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "3 ranks (simulated (threads of one process))" in out
    assert "global batch 30 = 10 per rank" in out


@pytest.mark.slow
def test_simulated_ranks_refuse_to_run_under_mpiexec(small_data):
    proc = helpers.run(["--data", small_data, *SMALL, "--simulate-ranks", "2"], ranks=2)
    assert proc.returncode == 2 and "without mpirun" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [None, 2])
def test_debug_mode_confirms_a_correct_gradient(small_data, tmp_path, ranks):
    proc = helpers.run(["--data", small_data, *SMALL, "--debug", "--run-dir", tmp_path / "run"],
                       ranks=ranks)
    assert proc.returncode == 0, proc.stderr
    assert "float64" in proc.stdout
    assert "debug: at step 0 the allreduced gradient agrees with finite differences" in proc.stdout


def test_debug_mode_reports_a_gradient_scaled_by_the_local_instead_of_the_global_batch(
        small_data, tmp_path, monkeypatch, capsys):
    """The classic data-parallel bug, injected: each rank normalises by its own batch size."""
    real = step.local_gradient

    def local_mean_gradient(model, loss_fn, x, y, global_count):
        return real(model, loss_fn, x, y, global_count=len(y))   # wrong: the LOCAL count

    monkeypatch.setattr(step, "local_gradient", local_mean_gradient)
    status = cli.main(["--data", small_data, *SMALL, "--debug", "--simulate-ranks", "3",
                       "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 1
    assert "gradient check failed at step 0" in err and "ratio 3" in err   # 3 ranks: 3x too large
    assert err.count("ddptrain: error:") == 1 and "Traceback" not in err


def test_debug_mode_without_a_bug_in_process_passes(small_data, tmp_path, capsys):
    assert cli.main(["--data", small_data, *SMALL, "--debug", "--simulate-ranks", "3",
                     "--run-dir", str(tmp_path / "run")]) == 0
    assert "agrees with finite differences" in capsys.readouterr().out


def test_debug_refuses_float32(capsys):
    assert cli.main(["--debug", "--dtype", "float32", "--dry-run"]) == 2
    assert "float64" in capsys.readouterr().err


def test_a_nan_is_reported_with_the_layer_it_appeared_in():
    model = Sequential.from_spec("6-5-4-3", dtype=np.float64)
    model.observer = FiniteChecker()
    model.observer.step = 7
    model.layers[3].params["weight"][1, 1] = np.nan   # the second Linear
    with pytest.raises(NumericalError, match=r"output of layer linear2 \(Linear 5->4\) during the "
                                             r"forward pass of step 7"):
        model.forward(np.ones((2, 6)))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # inf * 0 in the matrix product, on purpose
def test_a_nan_in_a_backward_pass_names_the_layer():
    model = Sequential.from_spec("6-5-3", dtype=np.float64)
    model.observer = FiniteChecker()
    loss_fn = SoftmaxCrossEntropy()
    loss_fn.forward(model.forward(np.ones((2, 6))), np.array([0, 1]), 2)
    dout = loss_fn.backward().copy()
    dout[0, 0] = np.inf
    with pytest.raises(NumericalError, match=r"layer linear2 \(Linear 5->3\)"):
        model.backward(dout)
