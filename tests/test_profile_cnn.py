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


def test_the_older_model_works_in_place_where_the_new_one_does():
    """Sequential plans its in-place layers by their classes, which the older copies are not: the
    older ReLUs take their twins' plan, or the comparison would flatter the new code."""
    module = profile_cnn()
    backend = module.gemm.backend(module.gemm.choose("numpy"))
    older = module.old_classes(helpers.ROOT / "ddptrain" / "nn")
    new, old = module.build("lenet5", backend), module.build("lenet5", backend, older)
    assert [type(layer).__module__ for layer in old.layers if layer.label() == "ReLU"] == \
        ["old_layers"] * 4
    assert [layer.in_place for layer in old.layers if layer.label() == "ReLU"] == \
        [layer.in_place for layer in new.layers if layer.label() == "ReLU"] == [True] * 4
