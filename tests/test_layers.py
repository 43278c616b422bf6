"""Each layer's backward against finite differences, Softmax's cost, and Linear's init."""

import math
import tracemalloc

import numpy as np
import pytest

from ddptrain.nn.layers import Linear, ReLU, Softmax
from ddptrain.nn.model import Sequential
from helpers import numerical_grad, rel_error

TOL = 1e-7   # central differences in float64 agree to ~1e-9 here


def make_linear(n_in, n_out, seed=0, init="he"):
    """A float64 Linear layer with random weights and (non-zero) random biases."""
    layer = Linear(n_in, n_out, init=init)
    Sequential([layer], dtype=np.float64, seed=seed)
    layer.params["bias"][...] = np.random.default_rng(seed + 1).standard_normal(n_out)
    return layer


# ---------------------------------------------------------------- Linear

@pytest.fixture
def linear_case():
    rng = np.random.default_rng(42)
    layer = make_linear(7, 5)
    x = rng.standard_normal((4, 7))
    g = rng.standard_normal((4, 5))        # upstream gradient: loss = sum(g * layer(x))
    layer.forward(x)
    dx = layer.backward(g).copy()
    return layer, x, g, dx


def test_linear_weight_grad_matches_finite_differences(linear_case):
    layer, x, g, _ = linear_case
    numeric = numerical_grad(lambda _: np.sum(g * layer.forward(x)), layer.params["weight"])
    assert rel_error(layer.grads["weight"], numeric) < TOL


def test_linear_bias_grad_matches_finite_differences(linear_case):
    layer, x, g, _ = linear_case
    numeric = numerical_grad(lambda _: np.sum(g * layer.forward(x)), layer.params["bias"])
    assert rel_error(layer.grads["bias"], numeric) < TOL


def test_linear_input_grad_matches_finite_differences(linear_case):
    layer, x, g, dx = linear_case
    numeric = numerical_grad(lambda x_: np.sum(g * layer.forward(x_)), x.copy())
    assert rel_error(dx, numeric) < TOL


def test_linear_backward_skips_the_input_grad_on_request():
    layer = make_linear(3, 2)
    layer.forward(np.ones((2, 3)))
    assert layer.backward(np.ones((2, 2)), need_input_grad=False) is None
    np.testing.assert_array_equal(layer.grads["bias"], [2.0, 2.0])


def test_linear_rejects_an_unknown_init():
    with pytest.raises(ValueError):
        Linear(3, 2, init="xavier")


# ---------------------------------------------------------------- Linear init

def test_he_init_has_std_sqrt_2_over_n_in_and_zero_bias():
    layer = Linear(1000, 400, init="he")
    Sequential([layer], dtype=np.float64, seed=0)
    w = layer.params["weight"]
    assert abs(w.std() / math.sqrt(2 / 1000) - 1) < 0.01
    assert abs(w.mean()) < 0.01 * math.sqrt(2 / 1000)
    assert not layer.params["bias"].any()


def test_glorot_init_is_uniform_within_sqrt_6_over_fan_sum():
    layer = Linear(600, 400, init="glorot")
    Sequential([layer], dtype=np.float64, seed=0)
    w = layer.params["weight"]
    limit = math.sqrt(6 / (600 + 400))
    assert np.abs(w).max() <= limit
    assert np.abs(w).max() > 0.999 * limit                    # fills the interval
    assert abs(w.std() / (limit / math.sqrt(3)) - 1) < 0.01   # std of U(-a, a)
    assert not layer.params["bias"].any()


def test_same_seed_gives_the_same_initial_parameters():
    a = Sequential.from_spec("30-20-10", seed=7)
    b = Sequential.from_spec("30-20-10", seed=7)
    np.testing.assert_array_equal(a.params, b.params)


def test_different_seeds_give_different_initial_parameters():
    a = Sequential.from_spec("30-20-10", seed=7)
    b = Sequential.from_spec("30-20-10", seed=8)
    for (name, wa), (_, wb) in zip(a.named_params(), b.named_params()):
        if name.endswith("weight"):                 # biases start at zero for every seed
            assert not np.any(wa == wb), name


def test_float32_and_float64_models_from_one_seed_agree_to_float32_rounding():
    m32 = Sequential.from_spec("30-20-10", dtype=np.float32, seed=3)
    m64 = Sequential.from_spec("30-20-10", dtype=np.float64, seed=3)
    assert m32.params.dtype == np.float32 and m64.params.dtype == np.float64
    np.testing.assert_array_equal(m32.params, m64.params.astype(np.float32))


# ---------------------------------------------------------------- ReLU

def test_relu_input_grad_matches_finite_differences_away_from_the_kink():
    rng = np.random.default_rng(1)
    x = rng.choice([-1.0, 1.0], size=(6, 5)) * rng.uniform(0.1, 2.0, size=(6, 5))
    g = rng.standard_normal((6, 5))
    layer = ReLU()
    layer.forward(x)
    dx = layer.backward(g).copy()
    numeric = numerical_grad(lambda x_: np.sum(g * layer.forward(x_)), x.copy())
    assert rel_error(dx, numeric) < TOL
    np.testing.assert_array_equal(dx, np.where(x > 0, g, 0.0))


# ---------------------------------------------------------------- Softmax

def test_softmax_forward_rows_are_distributions_even_for_huge_inputs():
    x = np.array([[1000.0, -1000.0, 0.0], [1e4, 1e4, -1e4]])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        s = Softmax().forward(x)
    np.testing.assert_allclose(s, [[1, 0, 0], [0.5, 0.5, 0]], atol=0)


def test_softmax_input_grad_matches_finite_differences():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 4)) * 3
    g = rng.standard_normal((5, 4))
    layer = Softmax()
    layer.forward(x)
    dx = layer.backward(g).copy()
    numeric = numerical_grad(lambda x_: np.sum(g * layer.forward(x_)), x.copy())
    assert rel_error(dx, numeric) < TOL


def test_softmax_backward_is_the_per_row_jacobian_vector_product():
    """Row i of dx is ``(diag(s_i) - s_i s_i^T) g_i``: rows do not mix."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 5)) * 2
    g = rng.standard_normal((6, 5))
    layer = Softmax()
    s = layer.forward(x).copy()
    dx = layer.backward(g)
    expected = np.stack([(np.diag(si) - np.outer(si, si)) @ gi for si, gi in zip(s, g)])
    np.testing.assert_allclose(dx, expected, rtol=1e-12, atol=1e-15)


def test_softmax_backward_on_a_large_batch_needs_memory_linear_in_the_batch():
    """A (B, B) identity or a (B, C, C) Jacobian would need 3.2 GB or 16 MB here; O(B*C) is 1.6
    MB."""
    batch, classes = 20000, 10
    rng = np.random.default_rng(4)
    x = rng.standard_normal((batch, classes))
    g = rng.standard_normal((batch, classes))
    layer = Softmax()
    s = layer.forward(x).copy()
    tracemalloc.start()
    try:
        dx = layer.backward(g)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * x.nbytes
    expected = s * (g - np.sum(g * s, axis=1, keepdims=True))
    np.testing.assert_allclose(dx, expected, rtol=1e-12, atol=1e-15)
