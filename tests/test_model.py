"""A whole model with the fused loss against finite differences, its flat buffers, and additivity."""

import numpy as np
import pytest

from ddptrain.errors import UserError
from ddptrain.losses import SoftmaxCrossEntropy
from ddptrain.nn import Linear, ReLU, Sequential, parse_spec
from gradcheck import numerical_grad, rel_error

SPEC = "20-16-12-5"
PARAM_NAMES = ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]


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
    numeric = numerical_grad(lambda _: loss_only(model, x, y, normaliser), dict(model.named_params())[name])
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

def test_from_spec_builds_linear_relu_layers_ending_in_logits():
    model = Sequential.from_spec(SPEC, dtype=np.float64)
    assert [type(layer) for layer in model.layers] == [Linear, ReLU, Linear, ReLU, Linear]
    assert [name for name, _ in model.named_params()] == PARAM_NAMES
    assert (model.n_inputs, model.n_outputs, model.spec) == (20, 5, SPEC)
    assert model.params.size == 20 * 16 + 16 + 16 * 12 + 12 + 12 * 5 + 5


def test_named_params_are_views_laid_out_in_order_in_the_flat_params():
    model = make_model()
    np.testing.assert_array_equal(np.concatenate([a.ravel() for _, a in model.named_params()]), model.params)
    for _, array in model.named_params():
        assert np.shares_memory(array, model.params)
    weight = dict(model.named_params())["2.weight"]
    weight[3, 4] = 123.0
    assert np.count_nonzero(model.params == 123.0) == 1


def test_named_grads_are_views_into_the_flat_grads():
    model = make_model()
    for _, array in model.named_grads():
        assert np.shares_memory(array, model.grads)
    dict(model.named_grads())["4.bias"][2] = -7.0
    assert np.count_nonzero(model.grads == -7.0) == 1


def test_writing_the_flat_params_changes_the_model_output():
    model = make_model()
    x, _ = make_batch()
    before = model.forward(x).copy()
    model.params *= 2
    assert not np.allclose(model.forward(x), before)


@pytest.mark.parametrize("spec", ["784", "a-b", "784-0-10", "784--10", "", "784-10-"])
def test_a_malformed_spec_is_a_user_error(spec):
    with pytest.raises(UserError):
        parse_spec(spec)


def test_parse_spec_reads_layer_sizes():
    assert parse_spec("784-512-256-10") == [784, 512, 256, 10]


# ---------------------------------------------------------------- additivity (data parallelism)

PIECES = [5, 1, 10]   # an uneven split of a batch of 16


def test_summing_piece_grads_normalised_by_the_global_batch_gives_the_full_batch_grad():
    """What each rank computes with ``normaliser=N`` sums (Allreduce) to the global mean gradient."""
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
