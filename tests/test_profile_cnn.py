"""scripts/profile_cnn.py: it times every layer of a CNN and a whole step, on the library asked
for, and against older layer modules. Nothing is judged by how fast it ran."""

import importlib.util
import re

import pytest

import helpers

SCRIPT = helpers.ROOT / "scripts" / "profile_cnn.py"


def profile_cnn():
    spec = importlib.util.spec_from_file_location("profile_cnn", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_layer_and_a_whole_step_are_timed_against_the_older_modules(capsys):
    profile_cnn().main(["--model", "lenet5", "--batch", "3", "--threads", "1", "--repeats", "1",
                        "--old", str(helpers.ROOT / "ddptrain" / "nn")])
    out = capsys.readouterr().out
    assert "matrix products: numpy's" in out
    assert "batch 3, 1 thread(s): median ms (new / old)" in out
    for label in ("Conv2d 1->6 5x5 pad 2", "Conv2d 6->16 5x5", "AvgPool2d 2x2", "Linear 84->10"):
        assert re.search(rf"{re.escape(label)} +fwd +[\d.]+ / +[\d.]+ +bwd", out), label
    assert re.search(r"whole step \(fwd\+bwd\+SGD\) +[\d.]+ / +[\d.]+ +\(new/old [\d.]+\)", out)


def test_the_products_library_is_the_one_asked_for(capsys):
    module = profile_cnn()
    with pytest.raises(SystemExit):
        module.main(["--gemm", "blas"])
    assert "invalid choice: 'blas'" in capsys.readouterr().err
