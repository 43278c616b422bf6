"""Convolutional networks from the command line: the grammar, named models, --debug, evaluate,
info."""

import re

import numpy as np
import pytest

import helpers
from ddptrain import cli
from ddptrain.commands import model_lines
from ddptrain.errors import UserError
from ddptrain.nn.conv import Conv2d
from ddptrain.nn.layer import ShapeError
from ddptrain.nn.layers import Flatten, Linear, ReLU
from ddptrain.nn.model import Sequential
from ddptrain.nn.pooling import MaxPool2d
from ddptrain.nn.spec import NAMED_MODELS, Token, parse_spec
from ddptrain.run.config import with_model_defaults

# 8x8 test images: 4x8x8 -> maxpool 4x4x4 -> 6x2x2 (stride 2) -> avgpool 6x1x1 -> 12 -> 10
SMALL_CNN = "conv4k3p1-bn-maxpool2-conv6k3s2p1-bn-drop0.1-avgpool2-flatten-12-10"


# ---------------------------------------------------------------- the grammar

def test_a_cnn_spec_reads_convolutions_pooling_and_flatten_and_prints_canonically():
    parsed = parse_spec(
        "conv32k3s1p0-bn-maxpool2s2-conv8k5s2p2-drop0.25-avgpool3s1-flatten-64-bn-10")
    assert parsed.tokens == (Token("conv", 32, kernel=3, batchnorm=True),
                             Token("maxpool", kernel=2, stride=2),
                             Token("conv", 8, kernel=5, stride=2, padding=2, dropout=0.25),
                             Token("avgpool", kernel=3, stride=1), Token("flatten"),
                             Token("size", 64, batchnorm=True), Token("size", 10))
    # defaults (stride 1, no padding; a pool's stride is its kernel) are left out
    assert str(parsed) == "conv32k3-bn-maxpool2-conv8k5s2p2-drop0.25-avgpool3s1-flatten-64-bn-10"
    assert parse_spec(str(parsed)) == parsed


def test_layers_follow_the_tokens_and_take_their_sizes_from_the_image():
    model = Sequential.from_spec("conv8k3p1-bn-maxpool2-conv4k3-drop0.5-flatten-16-10",
                                 input_shape=(12, 12))
    assert [layer.label() for layer in model.layers] == [
        "Conv2d 1->8 3x3 pad 1", "BatchNorm 8", "MaxPool2d 2x2", "ReLU", "Conv2d 8->4 3x3", "ReLU",
        "Dropout 0.5", "Flatten", "Linear 64->16", "ReLU", "Linear 16->10"]
    # no bias before a BatchNorm (it would cancel), a bias everywhere else
    assert [name for name, _ in model.named_params()] == [
        "conv2d1.weight", "batchnorm1.weight", "batchnorm1.bias", "conv2d2.weight", "conv2d2.bias",
        "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"]
    assert model.input_shape((12, 12)) == (1, 12, 12)         # images gain a channel axis
    assert model.output_shape((12, 12)) == (10,)
    assert model.as_input(np.zeros((5, 12, 12))).shape == (5, 1, 12, 12)


def test_max_pooling_after_a_relu_runs_first_and_computes_the_same_values_and_gradients():
    """The builder swaps ReLU -> MaxPool2d (the spec's order) to MaxPool2d -> ReLU: max and ReLU
    commute."""
    swapped = Sequential.from_spec("conv3k3p1-maxpool2-flatten-5", input_shape=(6, 6),
                                   dtype=np.float64, seed=2)
    assert [type(layer).__name__ for layer in swapped.layers][:3] == ["Conv2d", "MaxPool2d", "ReLU"]
    as_written = Sequential([Conv2d(1, 3, 3, padding=1), ReLU(), MaxPool2d(2), Flatten(),
                             Linear(27, 5, init="glorot")], dtype=np.float64, seed=2)
    np.testing.assert_array_equal(as_written.params, swapped.params)
    x = np.random.default_rng(3).standard_normal((4, 1, 6, 6))
    g = np.random.default_rng(4).standard_normal((4, 5))
    for model in (as_written, swapped):
        model.forward(x)
        model.backward(g, need_input_grad=True)
    np.testing.assert_array_equal(swapped.forward(x), as_written.forward(x))
    np.testing.assert_array_equal(swapped.grads, as_written.grads)


@pytest.mark.parametrize("spec, image, problem", [
    ("conv8k5-flatten-10", (4, 4), "'conv8k5' (token 1) does not fit its input of 1x4x4: "),
    ("conv8k3-maxpool2-maxpool2-maxpool2-flatten-10", (8, 8),
     "'maxpool2' (token 4) does not fit its input of 8x1x1"),
    ("conv8k3s2-avgpool4-flatten-10", (8, 8),
     "'avgpool4' (token 2) does not fit its input of 8x3x3"),
])
def test_a_token_that_does_not_fit_its_input_is_named_with_the_shape_it_gets(spec, image, problem):
    with pytest.raises(ShapeError) as raised:
        parse_spec(spec).layers(image)
    message = str(raised.value)
    assert message.startswith(f"--model {spec}: {problem}") and "\n" not in message


def test_named_models_are_specs_with_training_defaults():
    cnn = parse_spec("cnn")
    assert cnn.name == "cnn" and str(cnn) == NAMED_MODELS["cnn"].spec
    assert cnn.describe() == f"cnn ({NAMED_MODELS['cnn'].spec})"
    # LeCun et al.'s count
    assert Sequential.from_spec("lenet5", input_shape=(28, 28)).params.size == 61_706
    # the model's defaults fill what is not set; what is set wins
    values = with_model_defaults({"model": "cnn", "lr": 0.2})
    assert values["lr"] == 0.2 and values["epochs"] == NAMED_MODELS["cnn"].defaults["epochs"]
    assert with_model_defaults({"model": "784-10", "lr": 0.2}) == {"model": "784-10", "lr": 0.2}


def test_the_named_model_defaults_reach_the_run_configuration():
    config = cli.config_from_args(cli.parse(["--model", "cnn", "--epochs", "3"]))
    assert config.epochs == 3                                      # given
    assert config.lr == NAMED_MODELS["cnn"].defaults["lr"]          # the model's
    assert config.eval_batch == 500                                 # ddptrain's


def test_cnn_fast_is_the_cnn_network_with_a_one_cycle_schedule_of_four_epochs():
    fast = parse_spec("cnn-fast")
    assert fast.name == "cnn-fast" and fast.tokens == parse_spec("cnn").tokens
    config = cli.config_from_args(cli.parse(["--model", "cnn-fast"]))
    assert (config.epochs, config.warmup_epochs, config.lr_schedule) == (4, 1, "cosine")
    assert (config.lr, config.batch_size, config.nesterov) == (0.2, 128, True)
    # what is set wins, as for any named model
    assert cli.config_from_args(cli.parse(["--model", "cnn-fast", "--warmup-epochs", "0"])
                                ).warmup_epochs == 0


def test_a_cnn_that_does_not_fit_the_data_is_refused_with_one_line(small_data, tmp_path, capsys):
    assert cli.main(["--data", small_data, "--model", "conv4k9-flatten-10", "--run-dir",
                     str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "'conv4k9' (token 1) does not fit its input of 1x8x8" in err
    assert not (tmp_path / "r").exists()


def test_a_cnn_with_the_wrong_number_of_classes_is_refused_naming_both(
        small_data, tmp_path, capsys):
    assert cli.main(["--data", small_data, "--model", "conv4k3-flatten-7", "--run-dir",
                     str(tmp_path / "r")]) == 2
    assert "it gives 7 outputs per image, and the data has 10 classes" in capsys.readouterr().err


# ---------------------------------------------------------------- training, --debug, evaluate, info

def test_a_cnn_trains_from_the_command_line_and_learns(small_data, tmp_path, capsys):
    assert cli.main(["--data", small_data, "--model", "conv8k3p1-bn-maxpool2-flatten-16-10",
                     "--epochs", "3", "--batch-size", "16", "--lr", "0.05", "--run-dir",
                     str(tmp_path / "r"), "--quiet"]) == 0
    records = helpers.metrics_records(tmp_path / "r")
    assert records[-1]["test_accuracy"] > 0.5
    assert records[-1]["train_loss"] < records[0]["train_loss"]


def test_debug_confirms_the_gradient_of_a_cnn_on_simulated_ranks(small_data, tmp_path, capsys):
    assert cli.main(["--data", small_data, "--model", SMALL_CNN, "--batch-size", "29", "--epochs",
                     "1", "--debug", "--simulate-ranks", "3", "--run-dir",
                     str(tmp_path / "r")]) == 0
    assert "the allreduced gradient agrees with finite differences" in capsys.readouterr().out


def test_info_describes_a_model_layer_by_layer_with_its_flops():
    lines = model_lines("conv8k3p1-maxpool2-flatten-10", (8, 8))
    assert lines[0].startswith("model        conv8k3p1-maxpool2-flatten-10 on 8x8 images: 1,370 "
                               "parameters, ")
    # conv: 2 * 8 filters * 64 pixels * 9 weights = 9,216 FLOPs; linear: 2 * 128 * 10 = 2,560
    assert "0.01 MFLOP per image forward" in lines[0]
    # a training step: forward, weight gradients, and input gradients but the first layer's
    assert f"{(3 * 11_776 - 9_216) / 1e6:.2f} MFLOP per sample per training step" in lines[0]
    assert [line.split()[0] for line in lines[2:]] == ["conv2d1", "maxpool2d1", "relu1", "flatten1",
                                                       "linear1"]


@pytest.mark.slow
def test_evaluate_and_info_work_for_a_cnn(small_data, tmp_path):
    run_dir = tmp_path / "r"
    proc = helpers.run(["--data", small_data, "--model", SMALL_CNN, "--epochs", "1", "--run-dir",
                        run_dir])
    assert proc.returncode == 0, proc.stderr
    evaluated = helpers.run(["evaluate", run_dir / "checkpoints" / "best.h5", "--data", small_data],
                            ranks=2)
    assert evaluated.returncode == 0, evaluated.stderr
    record = helpers.metrics_records(run_dir)[-1]
    assert f"test accuracy {100 * record['test_accuracy']:.2f}%" in evaluated.stdout
    info = helpers.run(["info", "--data", small_data, "--model", SMALL_CNN])
    assert info.returncode == 0, info.stderr
    assert f"model        {SMALL_CNN} on 8x8 images: " in info.stdout, info.stdout
    assert re.search(r"conv2d2 +Conv2d 4->6 3x3 stride 2 pad 1 +6x2x2 +216 ",
                     info.stdout), info.stdout
    # A model that does not fit the data is described as such, and the rest of info still prints.
    info = helpers.run(["info", "--data", small_data, "--model", "cnn"])
    assert info.returncode == 0, info.stderr
    assert "'conv32k5' (token 3) does not fit its input of 16x2x2" in info.stdout


def test_a_spec_error_is_a_user_error():
    with pytest.raises(UserError):
        parse_spec("conv4k3-bn-bn-flatten-10")


def test_a_cnn_evaluated_on_ranks_with_an_empty_last_pass_gives_the_one_process_result():
    """A rank whose block of the test split ends a pass early runs an empty pass (evaluation keeps
    every rank's pass count equal): its convolutions take an empty batch, and the ranks' sums are
    one process's."""
    from ddptrain.training.batches import Split
    from ddptrain.training.evaluation import evaluate
    rng = np.random.default_rng(21)
    images = rng.integers(0, 256, (11, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 11)
    model = Sequential.from_spec("conv4k5-bn-maxpool2-conv8k3-flatten-10", input_shape=(1, 28, 28),
                                 dtype=np.float64)
    model.train()
    model.forward(rng.random((4, 1, 28, 28)))   # running statistics other than the initial ones
    blocks = [(0, 7), (7, 11)]                  # 3 rows a pass: 3 passes; 2 and an empty one

    def split(first, last):
        return Split(images[first:last].reshape(-1, 1, 28, 28), labels[first:last], np.float64)

    def on_rank(comm):
        return evaluate(model.replica(), comm, split(*blocks[comm.rank]), 10, chunk=3)

    two = helpers.on_simulated_ranks(2, on_rank)
    one = helpers.on_simulated_ranks(1, lambda comm: evaluate(model, comm, split(0, 11), 10,
                                                              chunk=3))[0]
    for result in two:
        np.testing.assert_array_equal(result.confusion, one.confusion)
        assert result.loss == pytest.approx(one.loss, rel=1e-12)
