"""A whole model with the fused loss against finite differences, its flat buffers, and
additivity."""

import numpy as np
import pytest

from ddptrain.errors import UserError
from ddptrain.nn import BatchNorm, Dropout, Sequential
from ddptrain.nn.layer import Layer, ShapeError
from ddptrain.nn.layers import Flatten, Linear, ReLU, Softmax
from ddptrain.nn.losses import SoftmaxCrossEntropy
from ddptrain.nn.spec import Token, parse_spec
from helpers import numerical_grad, rel_error

SPEC = "20-16-12-5"
PARAM_NAMES = ["linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias", "linear3.weight",
               "linear3.bias"]


def make_batch(batch=8, seed=0, kind="labels"):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 20))
    if kind == "labels":
        y = rng.integers(0, 5, size=batch)
    else:
        y = rng.dirichlet(np.ones(5), size=batch)
    return x, y


def make_model(seed=0):
    model = Sequential.from_spec(SPEC, dtype=np.float64, seed=seed)
    # Non-zero biases, so that their gradients and the ReLU masks are generic.
    rng = np.random.default_rng(seed + 100)
    for name, array in model.named_params():
        if name.endswith("bias"):
            array[...] = 0.1 * rng.standard_normal(array.shape)
    return model


def loss_and_grads(model, x, y, normaliser, need_input_grad=False):
    """The loss, a copy of the flat gradient, and (optionally) a copy of the input gradient."""
    loss = SoftmaxCrossEntropy()
    value = loss.forward(model.forward(x), y, normaliser)
    dx = model.backward(loss.backward(), need_input_grad=need_input_grad)
    return value, model.grads.copy(), None if dx is None else dx.copy()


def loss_only(model, x, y, normaliser):
    return SoftmaxCrossEntropy().forward(model.forward(x), y, normaliser)


# ---------------------------------------------------------------- gradients

@pytest.mark.parametrize("kind", ["labels", "soft"])
@pytest.mark.parametrize("name", PARAM_NAMES)
def test_every_parameter_grad_matches_finite_differences(name, kind):
    """Perturbing the per-layer view perturbs the flat buffer the model computes with."""
    model = make_model()
    x, y = make_batch(kind=kind)
    normaliser = 3 * len(x)
    loss_and_grads(model, x, y, normaliser)
    analytic = dict(model.named_grads())[name].copy()
    numeric = numerical_grad(lambda _: loss_only(model, x, y, normaliser),
                             dict(model.named_params())[name])
    assert rel_error(analytic, numeric) < 1e-6


def test_flat_grad_matches_finite_differences_in_the_flat_params():
    model = make_model(seed=1)
    x, y = make_batch(seed=1)
    _, analytic, _ = loss_and_grads(model, x, y, len(x))
    numeric = numerical_grad(lambda _: loss_only(model, x, y, len(x)), model.params)
    assert rel_error(analytic, numeric) < 1e-6


def test_input_grad_matches_finite_differences():
    model = make_model()
    x, y = make_batch()
    _, _, dx = loss_and_grads(model, x, y, len(x), need_input_grad=True)
    numeric = numerical_grad(lambda x_: loss_only(model, x_, y, len(x)), x.copy())
    assert rel_error(dx, numeric) < 1e-6


def test_backward_returns_no_input_grad_by_default_and_the_same_param_grads():
    model = make_model()
    x, y = make_batch()
    _, grads_without, dx = loss_and_grads(model, x, y, len(x))
    _, grads_with, _ = loss_and_grads(model, x, y, len(x), need_input_grad=True)
    assert dx is None
    np.testing.assert_array_equal(grads_without, grads_with)


def test_backward_overwrites_the_grads_rather_than_accumulating():
    model = make_model()
    x, y = make_batch()
    _, first, _ = loss_and_grads(model, x, y, len(x))
    _, second, _ = loss_and_grads(model, x, y, len(x))
    np.testing.assert_array_equal(first, second)


# ---------------------------------------------------------------- flat buffers and spec

def test_from_spec_builds_flatten_then_linear_relu_layers_ending_in_logits():
    model = Sequential.from_spec(SPEC, dtype=np.float64)
    assert [type(layer) for layer in model.layers] == [Flatten, Linear, ReLU, Linear, ReLU, Linear]
    assert [name for name, _ in model.named_params()] == PARAM_NAMES
    assert model.output_shape((20,)) == model.output_shape((4, 5)) == (5,)
    assert model.summary() == SPEC
    assert model.params.size == 20 * 16 + 16 + 16 * 12 + 12 + 12 * 5 + 5


def test_images_go_through_flatten_and_give_what_their_flat_rows_give():
    model = make_model()
    x, _ = make_batch()
    flat_logits = model.forward(x).copy()
    np.testing.assert_array_equal(model.forward(x.reshape(len(x), 4, 5)), flat_logits)


def test_a_batch_of_no_rows_passes_forward_and_backward():
    """A rank may hold none of a short last batch; it still takes part in the step."""
    model = make_model()
    loss = SoftmaxCrossEntropy()
    logits = model.forward(np.zeros((0, 4, 5)))
    assert logits.shape == (0, 5) and loss.forward(logits, np.zeros(0, dtype=np.int64),
                                                   normaliser=8) == 0.0
    model.backward(loss.backward())
    assert not model.grads.any()


@pytest.mark.parametrize("sample_shape, message", [
    ((21,), r"linear1 \(Linear 20->16\) takes 20 features per sample, not 21"),
    ((3, 3), r"linear1 \(Linear 20->16\) takes 20 features per sample, not 9"),
])
def test_a_sample_shape_that_does_not_fit_names_the_layer(sample_shape, message):
    with pytest.raises(ShapeError, match=message):
        Sequential.from_spec(SPEC).output_shape(sample_shape)


# ---------------------------------------------------------------- names, descriptions, buffers,
# modes

class Scale(Layer):
    """A layer with a buffer (a running maximum) and a mode, as batch normalisation will have."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def config(self):
        return {"n": self.n}

    def param_shapes(self):
        return {"gain": (self.n,)}

    def buffer_shapes(self):
        return {"running_max": (self.n,), "calls": (1,)}

    def init_params(self, rng):
        self.params["gain"][...] = 1

    def init_buffers(self):
        self.buffers["running_max"][...] = -1

    def forward(self, x):
        if self.training:
            np.maximum(self.buffers["running_max"], x.max(axis=0), out=self.buffers["running_max"])
            self.buffers["calls"] += 1
        self._x = x
        return x * self.params["gain"]

    def backward(self, dout, need_input_grad=True):
        self.grads["gain"][...] = (dout * self._x).sum(axis=0)
        return dout * self.params["gain"]


def test_names_are_type_and_number_so_inserting_a_layer_of_another_type_renames_nothing():
    plain = Sequential([Linear(4, 3), ReLU(), Linear(3, 2)])
    inserted = Sequential([Linear(4, 3), Scale(3), ReLU(), Linear(3, 2)])
    assert [n for n, _ in plain.named_params()] == ["linear1.weight", "linear1.bias",
                                                    "linear2.weight", "linear2.bias"]
    assert [n for n, _ in inserted.named_params()] == ["linear1.weight", "linear1.bias",
                                                       "scale1.gain", "linear2.weight",
                                                       "linear2.bias"]
    assert [layer.name for layer in Sequential([named_linear("encoder"),
                                                ReLU()]).layers] == ["encoder", "relu1"]


def named_linear(name):
    layer = Linear(4, 3)
    layer.name = name
    return layer


def test_a_repeated_layer_name_is_refused():
    with pytest.raises(ValueError, match="'encoder' is repeated"):
        Sequential([named_linear("encoder"), named_linear("encoder")])


def test_a_model_is_rebuilt_from_its_description_with_the_same_names_and_shapes():
    model = Sequential([Flatten(), Linear(6, 5, init="glorot"), Scale(5), ReLU(), Linear(5, 2)],
                       seed=3)
    description = model.describe()
    assert description[2] == {"name": "scale1", "type": "Scale", "args": {"n": 5}}
    again = Sequential.from_description(description, seed=3)
    assert again.describe() == description
    assert [(n, a.shape) for n, a in again.named_params()] == [(n, a.shape) for n,
                                                               a in model.named_params()]
    np.testing.assert_array_equal(again.params, model.params)


def test_a_description_of_an_unknown_layer_type_is_a_user_error():
    with pytest.raises(UserError, match="unknown layer type 'Conv9d'"):
        Sequential.from_description([{"name": "c", "type": "Conv9d", "args": {}}])
    with pytest.raises(UserError, match=r"layer 'linear1' \(Linear\) cannot be built"):
        Sequential.from_description([{"name": "linear1", "type": "Linear", "args": {"n_in": 3}}])


def test_buffers_live_in_one_flat_array_and_load_with_the_parameters():
    model = Sequential([Linear(4, 3), Scale(3), Linear(3, 2)], dtype=np.float64)
    assert [n for n, _ in model.named_buffers()] == ["scale1.running_max", "scale1.calls"]
    assert model.buffers.size == 4 and all(np.shares_memory(a, model.buffers) for _,
                                           a in model.named_buffers())
    np.testing.assert_array_equal(model.buffers, [-1, -1, -1, 0])
    other = Sequential([Linear(4, 3), Scale(3), Linear(3, 2)], dtype=np.float64, seed=9)
    other.forward(np.ones((2, 4)))
    model.load_state(dict(other.named_params()), dict(other.named_buffers()))
    np.testing.assert_array_equal(model.params, other.params)
    np.testing.assert_array_equal(model.buffers, other.buffers)


def test_eval_mode_reaches_every_layer_and_train_mode_restores_it():
    model = Sequential([Linear(4, 3), Scale(3), Linear(3, 2)], dtype=np.float64)
    model.eval()
    model.forward(np.ones((2, 4)))
    assert not model.training and model.buffers[-1] == 0         # no buffer update in evaluation
    model.train()
    model.forward(np.ones((2, 4)))
    assert model.training and model.buffers[-1] == 1


# ---------------------------------------------------------------- when a ReLU may work in place

class ReadsItsOutput(Layer):
    """Like Softmax: its backward reads the output it returned, so nothing may overwrite it."""

    def forward(self, x):
        self._out = x * 2
        return self._out

    def backward(self, dout, need_input_grad=True):
        return dout * (self._out > 0)


def test_relus_work_in_place_only_between_layers_that_never_read_those_arrays_again():
    model = Sequential([Flatten(), Linear(4, 3), ReLU(), Linear(3, 3), ReLU(), Softmax(), ReLU(),
                        ReadsItsOutput(), ReLU(), Linear(3, 2), ReLU()])
    in_place = {layer.name: layer.in_place for layer in model.layers if isinstance(layer, ReLU)}
    assert in_place == {"relu1": True,    # between two Linear layers
                        "relu2": False,   # the Softmax after it: no scratch input gradient declared
                        "relu3": False,   # the Softmax before it reads its output in its backward
                        "relu4": False,   # so does the layer before this one
                        "relu5": False}   # the last layer: its gradient is the loss's


def test_batchnorms_centre_in_place_only_the_output_of_a_layer_that_never_reads_it_again():
    model = Sequential([BatchNorm(4), Linear(4, 3, bias=False), BatchNorm(3), ReLU(), BatchNorm(3),
                        Linear(3, 3), ReadsItsOutput(), BatchNorm(3), Linear(3, 2)])
    in_place = {layer.name: layer.in_place for layer in model.layers
                if isinstance(layer, BatchNorm)}
    assert in_place == {"batchnorm1": False,   # the first layer: its input is the caller's data
                        "batchnorm2": True,    # after a Linear layer
                        "batchnorm3": False,   # after a ReLU, whose backward reads its output
                        "batchnorm4": False}   # so does the layer before this one


def test_a_batchnorm_centring_in_place_changes_no_output_gradient_or_running_statistic():
    x, y = make_batch(batch=16)
    results = []
    for in_place in (True, False):
        model = Sequential.from_spec("20-16-bn-12-bn-5", dtype=np.float64, seed=3)
        norms = [layer for layer in model.layers if isinstance(layer, BatchNorm)]
        assert all(layer.in_place for layer in norms)
        for layer in norms:
            layer.in_place = in_place
        value, grads, dx = loss_and_grads(model, x, y, len(x), need_input_grad=True)
        results.append((value, grads, dx, *(layer.buffers[name].copy() for layer in norms
                                            for name in ("running_mean", "running_var"))))
    for centred_in_place, centred_apart in zip(*results):
        np.testing.assert_array_equal(centred_in_place, centred_apart)


def test_an_in_place_relu_changes_no_gradient():
    x, y = make_batch()
    grads = []
    for in_place in (True, False):
        model = make_model()
        for layer in model.layers:
            if isinstance(layer, ReLU):
                assert layer.in_place
                layer.in_place = in_place
        loss_and_grads(model, x, y, len(x))
        grads.append(model.grads.copy())
    np.testing.assert_array_equal(grads[0], grads[1])


def test_a_relu_first_in_the_model_never_overwrites_the_data():
    model = Sequential([ReLU(), Linear(4, 2)], dtype=np.float64)
    x = np.array([[-1.0, 2.0, -3.0, 4.0]])
    model.forward(x)
    np.testing.assert_array_equal(x, [[-1.0, 2.0, -3.0, 4.0]])


def test_named_params_are_views_laid_out_in_order_in_the_flat_params():
    model = make_model()
    np.testing.assert_array_equal(np.concatenate([a.ravel() for _, a in model.named_params()]),
                                  model.params)
    for _, array in model.named_params():
        assert np.shares_memory(array, model.params)
    weight = dict(model.named_params())["linear2.weight"]
    weight[3, 4] = 123.0
    assert np.count_nonzero(model.params == 123.0) == 1


def test_named_grads_are_views_into_the_flat_grads():
    model = make_model()
    for _, array in model.named_grads():
        assert np.shares_memory(array, model.grads)
    dict(model.named_grads())["linear3.bias"][2] = -7.0
    assert np.count_nonzero(model.grads == -7.0) == 1


def test_writing_the_flat_params_changes_the_model_output():
    model = make_model()
    x, _ = make_batch()
    before = model.forward(x).copy()
    model.params *= 2
    assert not np.allclose(model.forward(x), before)


NOT_A_TOKEN = "is not a layer size, conv<F>k<K>, maxpool<K>, avgpool<K>, flatten, 'bn' or 'drop<p>'"
BN_PLACE = "must follow a layer size or a convolution directly"


@pytest.mark.parametrize("spec, problem", [
    ("784", "it needs at least an input and an output size"),
    ("a-b", f"'a' (token 1) {NOT_A_TOKEN}"),
    ("784-0-10", "layer sizes must be positive, not '0' (token 2)"),
    ("784--10", f"'' (token 2) {NOT_A_TOKEN}"),
    ("", f"'' (token 1) {NOT_A_TOKEN}"),
    ("784-10-", f"'' (token 3) {NOT_A_TOKEN}"),
    ("784-6_4-10", f"'6_4' (token 2) {NOT_A_TOKEN}"),
    ("784- 64-10", f"' 64' (token 2) {NOT_A_TOKEN}"),
    ("784-+64-10", f"'+64' (token 2) {NOT_A_TOKEN}"),
    ("bn-784-10", f"'bn' (token 1) {BN_PLACE}"),
    ("784-bn-10", "the input size cannot take 'bn' or 'drop<p>'"),
    ("784-64-bn-bn-10", f"'bn' (token 4) {BN_PLACE}"),
    ("784-64-drop0.1-bn-10", f"'bn' (token 4) {BN_PLACE}"),
    ("784-64-drop0.1-drop0.2-10",
     "'drop0.2' (token 4) must follow a layer size or a convolution (or its 'bn')"),
    ("784-drop0.1-10", "the input size cannot take 'bn' or 'drop<p>'"),
    ("784-64-drop1.0-10", "'drop1.0' (token 3) is not a dropout probability in [0, 1)"),
    ("784-64-drop-0.1-10", "'drop' (token 3) is not a dropout probability in [0, 1)"),
    ("784-64-dropout-10", "'dropout' (token 3) is not a dropout probability in [0, 1)"),
    ("784-64-10-bn", "it must end with the output size (the number of classes), not 'bn'"),
    ("784-64-10-drop0.5",
     "it must end with the output size (the number of classes), not 'drop0.5'"),
    # convolutional networks
    ("784-conv8k3-10", "an MLP (it starts with its input size) holds only layer sizes"),
    ("conv0k3-flatten-10", "'conv0k3' (token 1): filters, kernel size and stride must be positive"),
    ("conv8k0-flatten-10", "'conv8k0' (token 1): filters, kernel size and stride must be positive"),
    ("conv8k3s0-flatten-10",
     "'conv8k3s0' (token 1): filters, kernel size and stride must be positive"),
    ("conv8k3p-flatten-10", f"'conv8k3p' (token 1) {NOT_A_TOKEN}"),
    ("conv8k3p1s2-flatten-10", f"'conv8k3p1s2' (token 1) {NOT_A_TOKEN}"),   # stride before padding
    ("maxpool0-flatten-10", "'maxpool0' (token 1): kernel size and stride must be positive"),
    ("conv8k3-maxpool2s0-flatten-10",
     "'maxpool2s0' (token 2): kernel size and stride must be positive"),
    ("conv8k3-10",
     "a CNN needs one 'flatten' between its last convolution or pooling and its first layer size"),
    ("conv8k3-flatten-flatten-10", "a CNN needs one 'flatten'"),
    ("conv8k3-flatten", "it must end with the output size (the number of classes), not 'flatten'"),
    ("flatten-10",
     "it must start with the input size (an MLP) or a convolution or pooling (a CNN)"),
    ("conv8k3-maxpool2-bn-flatten-10", f"'bn' (token 3) {BN_PLACE}"),
    ("conv8k3-flatten-10-maxpool2-10", "after 'flatten' come only layer sizes"),
    ("Cnn", f"'Cnn' (token 1) {NOT_A_TOKEN}"),
])
def test_a_malformed_spec_is_one_line_naming_what_is_wrong(spec, problem):
    with pytest.raises(UserError) as raised:
        parse_spec(spec)
    message = str(raised.value)
    assert message.startswith(f"--model {spec!r}: {problem}") and "\n" not in message
    assert "expected tokens joined by '-'" in message


def test_parse_spec_reads_sizes_batch_normalisation_and_dropout():
    assert parse_spec("784-512-256-10").tokens == (Token("size", 784), Token("size", 512),
                                                   Token("size", 256), Token("size", 10))
    parsed = parse_spec("784-512-bn-drop0.20-256-drop.5-10")
    assert parsed.tokens == (Token("size", 784), Token("size", 512, batchnorm=True, dropout=0.2),
                             Token("size", 256, dropout=0.5), Token("size", 10))
    assert str(parsed) == "784-512-bn-drop0.2-256-drop0.5-10"      # the canonical spelling


def test_bn_goes_after_its_linear_layer_before_the_relu_and_drop_after_the_relu():
    model = Sequential.from_spec("20-16-bn-drop0.3-12-bn-5")
    assert [layer.label() for layer in model.layers] == [
        "Flatten", "Linear 20->16", "BatchNorm 16", "ReLU", "Dropout 0.3", "Linear 16->12",
        "BatchNorm 12", "ReLU", "Linear 12->5"]
    # no bias before a BatchNorm: the normalisation would cancel it
    assert [name for name, _ in model.named_params()] == [
        "linear1.weight", "batchnorm1.weight", "batchnorm1.bias", "linear2.weight",
        "batchnorm2.weight", "batchnorm2.bias", "linear3.weight", "linear3.bias"]
    assert [name for name, _ in model.named_buffers()] == [
        "batchnorm1.running_mean", "batchnorm1.running_var", "batchnorm2.running_mean",
        "batchnorm2.running_var"]
    assert isinstance(model.layers[2], BatchNorm) and isinstance(model.layers[4], Dropout)
    assert model.layers[3].in_place                          # between BatchNorm and Dropout: safe
    assert model.summary() == "20-16-bn-drop0.3-12-bn-5"


# ---------------------------------------------------------------- additivity (data parallelism)

PIECES = [5, 1, 10]   # an uneven split of a batch of 16


def test_summing_piece_grads_normalised_by_the_global_batch_gives_the_full_batch_grad():
    """What each rank computes with ``normaliser=N`` sums (Allreduce) to the global mean
    gradient."""
    model = make_model()
    x, y = make_batch(batch=sum(PIECES), seed=3)
    full_loss, full_grad, _ = loss_and_grads(model, x, y, len(x))
    bounds = np.cumsum([0] + PIECES)
    summed_grad = np.zeros_like(full_grad)
    summed_loss = 0.0
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        loss, grad, _ = loss_and_grads(model, x[lo:hi], y[lo:hi], len(x))
        summed_grad += grad
        summed_loss += loss
    assert rel_error(summed_grad, full_grad) < 1e-12
    assert summed_loss == pytest.approx(full_loss, rel=1e-12)


def test_the_mean_of_local_mean_grads_over_uneven_pieces_is_not_the_full_batch_grad():
    """Averaging per-rank means over-weights the rows of small pieces."""
    model = make_model()
    x, y = make_batch(batch=sum(PIECES), seed=3)
    _, full_grad, _ = loss_and_grads(model, x, y, len(x))
    bounds = np.cumsum([0] + PIECES)
    local_means = [loss_and_grads(model, x[lo:hi], y[lo:hi], hi - lo)[1]
                   for lo, hi in zip(bounds[:-1], bounds[1:])]
    assert rel_error(np.mean(local_means, axis=0), full_grad) > 0.05
