"""The fused SoftmaxCrossEntropy and the chained Softmax + CrossEntropy, against finite
differences."""

import contextlib
import warnings

import numpy as np
import pytest

from ddptrain.nn.layers import Softmax
from ddptrain.nn.losses import CrossEntropy, SoftmaxCrossEntropy, log_softmax, softmax
from helpers import numerical_grad, one_hot, rel_error

TOL = 1e-7
B, C = 6, 5
LABEL_KINDS = ["labels", "one_hot", "soft"]


def make_targets(kind, batch=B, classes=C, seed=0, dtype=np.float64):
    """Integer labels (B,), one-hot rows (B, C), or soft labels: rows of a Dirichlet (B, C)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=batch)
    if kind == "labels":
        return labels
    if kind == "one_hot":
        return one_hot(labels, classes, dtype=dtype)
    return rng.dirichlet(np.ones(classes), size=batch).astype(dtype)


def as_distribution(targets, classes=C):
    return one_hot(targets, classes, dtype=np.float64) if targets.ndim == 1 else targets


def make_logits(batch=B, classes=C, seed=1, scale=2.0):
    return np.random.default_rng(seed).standard_normal((batch, classes)) * scale


@contextlib.contextmanager
def no_floating_point_trouble():
    """Fail on overflow, 0/0, log(0) and any warning; underflow of exp(-2000) to 0 is fine."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
            yield


# ---------------------------------------------------------------- fused loss: gradients

@pytest.mark.parametrize("kind", LABEL_KINDS)
@pytest.mark.parametrize("normaliser", [B, 3 * B])
def test_fused_logit_grad_matches_finite_differences(kind, normaliser):
    z, y = make_logits(), make_targets(kind)
    loss = SoftmaxCrossEntropy()
    loss.forward(z, y, normaliser)
    analytic = loss.backward().copy()
    numeric = numerical_grad(lambda z_: loss.forward(z_, y, normaliser), z.copy())
    assert rel_error(analytic, numeric) < TOL


@pytest.mark.parametrize("kind", LABEL_KINDS)
def test_fused_backward_is_softmax_minus_targets_over_the_normaliser(kind):
    z, y = make_logits(), make_targets(kind)
    loss = SoftmaxCrossEntropy()
    loss.forward(z, y, 3 * B)
    np.testing.assert_allclose(loss.backward(), (softmax(z) - as_distribution(y)) / (3 * B),
                               rtol=1e-13, atol=1e-17)


@pytest.mark.parametrize("kind", LABEL_KINDS)
def test_fused_loss_and_grad_scale_as_one_over_the_normaliser(kind):
    z, y = make_logits(), make_targets(kind)
    loss = SoftmaxCrossEntropy()
    loss_b = loss.forward(z, y, B)
    grad_b = loss.backward().copy()
    loss_3b = loss.forward(z, y, 3 * B)
    grad_3b = loss.backward().copy()
    assert loss_3b == pytest.approx(loss_b / 3, rel=1e-14)
    assert rel_error(grad_3b, grad_b / 3) < 1e-14


@pytest.mark.parametrize("kind", ["one_hot", "soft"])
@pytest.mark.parametrize("normaliser", [B, 3 * B])
def test_target_grad_matches_finite_differences_in_the_soft_labels(kind, normaliser):
    z, y = make_logits(), make_targets(kind)
    loss = SoftmaxCrossEntropy()
    loss.forward(z, y, normaliser)
    analytic = loss.target_grad().copy()
    numeric = numerical_grad(lambda y_: loss.forward(z, y_, normaliser), y.copy())
    assert rel_error(analytic, numeric) < TOL


@pytest.mark.parametrize("kind", LABEL_KINDS)
def test_target_grad_is_minus_log_softmax_over_the_normaliser(kind):
    z, y = make_logits(), make_targets(kind)
    loss = SoftmaxCrossEntropy()
    loss.forward(z, y, 3 * B)
    np.testing.assert_allclose(loss.target_grad(), -log_softmax(z) / (3 * B), rtol=1e-14)
    assert np.all(loss.target_grad() > 0)        # -log p > 0 whenever p < 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_integer_labels_and_one_hot_rows_give_the_same_loss_and_grads(dtype):
    z = make_logits().astype(dtype)
    labels = make_targets("labels")
    loss = SoftmaxCrossEntropy()
    loss_labels = loss.forward(z, labels, 2 * B)
    grad_labels, target_grad_labels = loss.backward().copy(), loss.target_grad().copy()
    loss_one_hot = loss.forward(z, one_hot(labels, C, dtype=dtype), 2 * B)
    assert loss_one_hot == pytest.approx(loss_labels, rel=1e-14)
    np.testing.assert_array_equal(loss.backward(), grad_labels)
    np.testing.assert_array_equal(loss.target_grad(), target_grad_labels)


@pytest.mark.parametrize("kind", LABEL_KINDS)
def test_fused_loss_is_the_mean_of_minus_target_dot_log_softmax(kind):
    z, y = make_logits(), make_targets(kind)
    expected = -np.sum(as_distribution(y) * np.log(softmax(z))) / B
    assert SoftmaxCrossEntropy().forward(z, y, B) == pytest.approx(expected, rel=1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", LABEL_KINDS)
def test_fused_grad_rows_sum_to_zero_and_keep_the_logits_dtype(dtype, kind):
    z, y = make_logits().astype(dtype), make_targets(kind, dtype=dtype)
    loss = SoftmaxCrossEntropy()
    loss.forward(z, y, B)
    grad = loss.backward()
    assert grad.dtype == dtype
    np.testing.assert_allclose(grad.sum(axis=1), 0, atol=10 * np.finfo(dtype).eps)


@pytest.mark.parametrize("normaliser", [0, -1.0])
def test_a_non_positive_normaliser_is_refused(normaliser):
    z, y = make_logits(), make_targets("labels")
    with pytest.raises(ValueError):
        SoftmaxCrossEntropy().forward(z, y, normaliser)
    with pytest.raises(ValueError):
        CrossEntropy().forward(softmax(z), y, normaliser)


# ---------------------------------------------------------------- fused loss: stability

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("label, expected_loss, expected_grad", [
    (1, 2000.0, [[1.0, -1.0]]),
    (0, 0.0, [[0.0, 0.0]]),
])
def test_logits_of_plus_minus_1000_give_the_exact_loss_and_grad(dtype, label, expected_loss,
                                                                expected_grad):
    z = np.array([[1000.0, -1000.0]], dtype=dtype)
    loss = SoftmaxCrossEntropy()
    with no_floating_point_trouble():
        value = loss.forward(z, np.array([label]), 1)
        grad = loss.backward()
        target_grad = loss.target_grad()
    assert value == expected_loss
    np.testing.assert_array_equal(grad, expected_grad)
    np.testing.assert_array_equal(target_grad, [[0.0, 2000.0]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", LABEL_KINDS)
def test_logit_spreads_of_1e4_give_finite_exact_loss_and_grads(dtype, kind):
    z = (make_logits(scale=1.0) * 1e4).astype(dtype)
    y = make_targets(kind, dtype=dtype)
    loss = SoftmaxCrossEntropy()
    with no_floating_point_trouble():
        value = loss.forward(z, y, B)
        grad = loss.backward()
        target_grad = loss.target_grad()
    assert np.isfinite(value) and np.all(np.isfinite(grad)) and np.all(np.isfinite(target_grad))
    # With spreads this wide softmax is one-hot at the row maximum, so the loss
    # is exactly sum_i (max z_i - y_i . z_i) / B (up to dtype rounding of z).
    z64, y64 = z.astype(np.float64), as_distribution(y).astype(np.float64)
    expected = np.sum(z64.max(axis=1) - np.sum(y64 * z64, axis=1)) / B
    assert value == pytest.approx(expected, rel=10 * float(np.finfo(dtype).eps))
    p = one_hot(z.argmax(axis=1), C, dtype=np.float64)
    np.testing.assert_allclose(grad, (p - y64) / B, atol=10 * np.finfo(dtype).eps)


# ---------------------------------------------------------------- chained Softmax + CrossEntropy

@pytest.mark.parametrize("kind", ["one_hot", "soft"])
def test_cross_entropy_prob_grad_matches_finite_differences(kind):
    p, y = softmax(make_logits(scale=0.5)), make_targets(kind)   # p away from 0, where 1/p is stiff
    loss = CrossEntropy()
    loss.forward(p, y, 2 * B)
    analytic = loss.backward().copy()
    numeric = numerical_grad(lambda p_: loss.forward(p_, y, 2 * B), p.copy())
    assert rel_error(analytic, numeric) < TOL


def test_cross_entropy_with_labels_equals_cross_entropy_with_one_hot_rows():
    p, labels = softmax(make_logits()), make_targets("labels")
    loss = CrossEntropy()
    value_labels = loss.forward(p, labels, B)
    grad_labels = loss.backward()
    value_one_hot = loss.forward(p, one_hot(labels, C, dtype=np.float64), B)
    assert value_one_hot == pytest.approx(value_labels, rel=1e-14)
    np.testing.assert_array_equal(loss.backward(), grad_labels)


@pytest.mark.parametrize("kind", LABEL_KINDS)
@pytest.mark.parametrize("normaliser", [B, 3 * B])
def test_chained_softmax_and_cross_entropy_backward_equals_the_fused_backward(kind, normaliser):
    z, y = make_logits(), make_targets(kind)
    layer, chained = Softmax(), CrossEntropy()
    chained_loss = chained.forward(layer.forward(z), y, normaliser)
    chained_grad = layer.backward(chained.backward()).copy()
    fused = SoftmaxCrossEntropy()
    fused_loss = fused.forward(z, y, normaliser)
    fused_grad = fused.backward()
    assert chained_loss == pytest.approx(fused_loss, rel=1e-12)
    assert rel_error(chained_grad, fused_grad) < 1e-12
