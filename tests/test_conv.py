"""Convolution and pooling: finite differences, small cases worked by hand, ties, buffers reused."""

import tracemalloc

import numpy as np
import pytest

from ddptrain.nn.conv import Conv2d
from ddptrain.nn.layer import ShapeError
from ddptrain.nn.layers import Flatten, Linear, ReLU
from ddptrain.nn.model import Sequential
from ddptrain.nn.normalization import BatchNorm
from ddptrain.nn.pooling import AvgPool2d, MaxPool2d
from helpers import numerical_grad, rel_error

TOL = 1e-7


def built(layer, seed=0):
    """``layer`` inside a float64 model (so it has parameters), biases made non-zero."""
    Sequential([layer], dtype=np.float64, seed=seed)
    if "bias" in layer.params:
        bias_rng = np.random.default_rng(seed + 1)
        layer.params["bias"][...] = bias_rng.standard_normal(layer.params["bias"].shape)
    return layer


def gradients(layer, x, seed=3):
    """Analytic gradients of ``sum(g * layer(x))`` and their finite-difference counterparts."""
    g = np.random.default_rng(seed).standard_normal(layer.forward(x).shape)
    dx = layer.backward(g).copy()
    analytic = {"x": dx, **{name: grad.copy() for name, grad in layer.grads.items()}}

    def loss(_):   # reads x and the parameters in place, as numerical_grad perturbs them
        return np.sum(g * layer.forward(x))

    numeric = {"x": numerical_grad(loss, x),
               **{name: numerical_grad(loss, p) for name, p in layer.params.items()}}
    return analytic, numeric


@pytest.fixture(params=["wide rows", "channels last"])
def layout(request, monkeypatch):
    """Each of the two ways a Conv2d computes, whichever its shape would pick: wide rows (conv.py)
    or channels last (conv_channels_last.py)."""
    from ddptrain.nn import conv_channels_last
    use = request.param == "channels last"
    monkeypatch.setattr(conv_channels_last, "pays", lambda layer: use)
    return request.param


CONV_CASES = [
    # in, out, kernel, stride, padding, height, width
    (1, 3, 3, 1, 0, 6, 6),
    (2, 3, 3, 1, 1, 5, 7),      # "same" padding, a non-square image
    (3, 2, 5, 1, 2, 6, 5),
    (2, 4, 3, 2, 0, 7, 7),      # stride 2: no wide rows
    (2, 3, 3, 2, 1, 8, 6),
    (1, 2, 2, 3, 1, 7, 8),      # stride larger than the kernel: pixels no window sees
    (3, 2, 1, 1, 0, 4, 4),      # 1x1
    (2, 2, 4, 1, 3, 3, 3),      # padding larger than the image's half
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", CONV_CASES,
                         ids=lambda c: "in{}-out{}-k{}-s{}-p{}-{}x{}".format(*c))
def test_conv2d_gradients_match_finite_differences(case, bias, layout):
    c_in, c_out, k, stride, pad, height, width = case
    layer = built(Conv2d(c_in, c_out, k, stride=stride, padding=pad, bias=bias))
    x = np.random.default_rng(1).standard_normal((3, c_in, height, width))
    analytic, numeric = gradients(layer, x)
    expected = {"x", "weight", "bias"} if bias else {"x", "weight"}
    assert analytic.keys() == numeric.keys() == expected
    for name in analytic:
        assert rel_error(analytic[name], numeric[name]) < TOL, name


def reference_conv(x, weight, bias, stride, pad):
    """The definition, loop by loop: what Conv2d's matrix products must equal."""
    n, _, height, width = x.shape
    f, _, k, _ = weight.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out_h, out_w = (height + 2 * pad - k) // stride + 1, (width + 2 * pad - k) // stride + 1
    out = np.empty((n, f, out_h, out_w))
    for r in range(out_h):
        for s in range(out_w):
            window = xp[:, :, r * stride:r * stride + k, s * stride:s * stride + k]
            out[:, :, r, s] = np.einsum("nchw,fchw->nf", window, weight) + bias
    return out


@pytest.mark.parametrize("case", CONV_CASES,
                         ids=lambda c: "in{}-out{}-k{}-s{}-p{}-{}x{}".format(*c))
def test_conv2d_forward_equals_the_definition(case, layout):
    c_in, c_out, k, stride, pad, height, width = case
    layer = built(Conv2d(c_in, c_out, k, stride=stride, padding=pad))
    x = np.random.default_rng(2).standard_normal((4, c_in, height, width))
    expected = reference_conv(x, layer.params["weight"], layer.params["bias"], stride, pad)
    assert rel_error(layer.forward(x), expected) < 1e-12


def test_a_small_convolution_worked_by_hand():
    layer = built(Conv2d(1, 1, 2, padding=0))
    layer.params["weight"][...] = [[[[1, 2], [3, 4]]]]
    layer.params["bias"][...] = 10
    x = np.arange(9, dtype=np.float64).reshape(1, 1, 3, 3)   # 0 1 2 / 3 4 5 / 6 7 8
    # top left window 0 1 / 3 4: 0*1 + 1*2 + 3*3 + 4*4 = 27, plus the bias
    np.testing.assert_array_equal(layer.forward(x), [[[[37, 47], [67, 77]]]])
    dx = layer.backward(np.ones((1, 1, 2, 2)))
    # every pixel gets the weights of the windows it is in: the corner only w[0,0], the centre all
    # four
    np.testing.assert_array_equal(dx, [[[[1, 3, 2], [4, 10, 6], [3, 7, 4]]]])
    # sums of the windows' pixels
    np.testing.assert_array_equal(layer.grads["weight"], [[[[8, 12], [20, 24]]]])
    np.testing.assert_array_equal(layer.grads["bias"], [4])


def test_padding_adds_zeros_around_the_image():
    layer = built(Conv2d(1, 1, 3, padding=1, bias=False))
    layer.params["weight"][...] = 1
    out = layer.forward(np.ones((1, 1, 3, 3)))
    # neighbours inside the image
    np.testing.assert_array_equal(out, [[[[4, 6, 4], [6, 9, 6], [4, 6, 4]]]])


# ---------------------------------------------------------------- pooling

POOL_CASES = [
    # kernel, stride, height, width
    (1, None, 3, 4),      # 1x1: the identity
    (2, None, 6, 6),
    (2, None, 7, 5),      # sizes that do not divide: the last row/column is left out
    (3, 2, 7, 7),         # overlapping windows
    (3, None, 9, 6),
    (2, 3, 8, 8),         # gaps between windows
]


@pytest.mark.parametrize("kind", [MaxPool2d, AvgPool2d])
@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: "k{}-s{}-{}x{}".format(*c))
def test_pooling_input_gradient_matches_finite_differences(kind, case):
    k, stride, height, width = case
    layer = built(kind(k, stride=stride))
    # Distinct values, at least 1e-3 apart, so that no finite-difference step changes which value is
    # the maximum.
    values = np.random.default_rng(4).permutation(2 * 3 * height * width) * 1e-3
    x = values.reshape(2, 3, height, width)
    analytic, numeric = gradients(layer, x)
    assert rel_error(analytic["x"], numeric["x"]) < TOL


def test_pooling_by_hand():
    x = np.array([[1, 2, 5, 6], [3, 4, 7, 9], [0, 0, 1, 1], [0, -1, 1, 2]],
                 dtype=np.float64).reshape(1, 1, 4, 4)
    maxpool, avgpool = built(MaxPool2d(2)), built(AvgPool2d(2))
    np.testing.assert_array_equal(maxpool.forward(x), [[[[4, 9], [0, 2]]]])
    np.testing.assert_array_equal(avgpool.forward(x), [[[[2.5, 6.75], [-0.25, 1.25]]]])
    dx = maxpool.backward(np.array([[[[1.0, 2.0], [3.0, 4.0]]]]))
    np.testing.assert_array_equal(dx[0, 0],
                                  [[0, 0, 0, 0], [0, 1, 0, 2], [3, 0, 0, 0], [0, 0, 0, 4]])
    dx = avgpool.backward(np.array([[[[4.0, 8.0], [0.0, 4.0]]]]))
    np.testing.assert_array_equal(dx[0, 0],
                                  [[1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 1, 1], [0, 0, 1, 1]])


def test_max_pooling_ties_send_the_gradient_to_the_first_maximum_of_the_window():
    # Every window ties; the bottom left window's maximum sits twice in its second row.
    x = np.array([[7, 7, 1, 1], [7, 7, 1, 1], [0, 0, 3, 5], [2, 2, 5, 5]],
                 dtype=np.float64).reshape(1, 1, 4, 4)
    layer = built(MaxPool2d(2))
    layer.forward(x)
    dx = layer.backward(np.ones((1, 1, 2, 2)))
    np.testing.assert_array_equal(dx[0, 0],
                                  [[1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0]])
    layer.forward(x)
    np.testing.assert_array_equal(layer.backward(np.ones((1, 1, 2, 2))), dx)   # and every time


def test_overlapping_max_pooling_adds_the_gradients_of_a_pixel_shared_by_windows():
    x = np.zeros((1, 1, 3, 3))
    x[0, 0, 1, 1] = 1   # the maximum of all four 2x2 windows of stride 1
    layer = built(MaxPool2d(2, stride=1))
    layer.forward(x)
    np.testing.assert_array_equal(layer.backward(np.ones((1, 1, 2, 2)))[0, 0],
                                  [[0, 0, 0], [0, 4, 0], [0, 0, 0]])


# ---------------------------------------------------------------- shapes and buffers

def test_shapes_that_do_not_fit_name_the_layer_and_the_shape():
    with pytest.raises(ShapeError,
                       match=r"conv2d1 \(Conv2d 3->8 3x3\) takes images of 3 channel\(s\).*not "
                             r"1x28x28"):
        Sequential([Conv2d(3, 8, 3)]).output_shape((1, 28, 28))
    with pytest.raises(ShapeError, match=r"at least 5 x 5 pixels, not 1x4x4"):
        Sequential([Conv2d(1, 8, 5)]).output_shape((1, 4, 4))
    with pytest.raises(ShapeError,
                       match=r"maxpool2d2 \(MaxPool2d 2x2\) needs images of at least 2 x 2.*not "
                             r"8x1x1"):
        Sequential([MaxPool2d(2), MaxPool2d(2)]).output_shape((8, 3, 3))


def assert_model_matches_finite_differences(model, x, g):
    """The model's parameter and input gradients for the loss ``sum(g * model(x))`` against
    finite differences."""
    model.forward(x)
    dx = model.backward(g, need_input_grad=True).copy()
    grads = model.grads.copy()
    loss = lambda _: np.sum(g * model.forward(x))   # noqa: E731
    assert rel_error(grads, numerical_grad(loss, model.params)) < 1e-6
    assert rel_error(dx, numerical_grad(loss, x)) < 1e-6


def test_a_small_cnn_end_to_end_matches_finite_differences():
    model = Sequential([Conv2d(1, 3, 3, padding=1, bias=False), BatchNorm(3), ReLU(), MaxPool2d(2),
                        Conv2d(3, 4, 3, stride=2), ReLU(), AvgPool2d(1), Flatten(), Linear(4, 5)],
                       dtype=np.float64, seed=5)
    assert model.output_shape((1, 6, 6)) == (5,)
    x = np.random.default_rng(6).standard_normal((4, 1, 6, 6))
    g = np.random.default_rng(7).standard_normal((4, 5))
    assert_model_matches_finite_differences(model, x, g)


@pytest.mark.parametrize("make",
                         [lambda: Conv2d(2, 4, 3, padding=1), lambda: MaxPool2d(2),
                          lambda: AvgPool2d(2)], ids=["conv", "maxpool", "avgpool"])
def test_work_arrays_are_reused_from_step_to_step(make, layout):
    layer = built(make())
    x = np.random.default_rng(0).standard_normal((8, 2, 8, 8))
    out = layer.forward(x)
    dx = layer.backward(np.ones_like(out))
    # a smaller batch (the last of an epoch) fits in the same memory
    again_out = layer.forward(x[:5])
    again_dx = layer.backward(np.ones_like(again_out))
    assert np.shares_memory(out, again_out) and np.shares_memory(dx, again_dx)


def test_a_smaller_batch_after_a_larger_one_gives_the_same_values(layout):
    layer = built(Conv2d(2, 3, 3, padding=1))
    x = np.random.default_rng(8).standard_normal((6, 2, 5, 5))
    layer.forward(x)
    layer.backward(np.ones((6, 3, 5, 5)))
    small = layer.forward(x[:2]).copy()
    small_dx = layer.backward(np.ones((2, 3, 5, 5))).copy()
    fresh = built(Conv2d(2, 3, 3, padding=1))
    np.testing.assert_array_equal(small, fresh.forward(x[:2]))
    np.testing.assert_array_equal(small_dx, fresh.backward(np.ones((2, 3, 5, 5))))


def test_a_cnn_training_step_allocates_no_activation_sized_array_once_warm():
    from ddptrain.nn.losses import SoftmaxCrossEntropy
    from ddptrain.optim.optimizers import SGD
    model = Sequential.from_spec("cnn", input_shape=(28, 28))
    loss, optimizer = SoftmaxCrossEntropy(), SGD(momentum=0.9)
    x = np.random.default_rng(0).random((512, 1, 28, 28), dtype=np.float32)
    y = np.random.default_rng(1).integers(0, 10, 512)

    def step():
        loss.forward(model.forward(x), y, len(x))
        model.backward(loss.backward())
        optimizer.step(model.params, model.grads, 0.01)

    step()
    step()
    tracemalloc.start()
    try:
        step()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the second convolution's: 4 MiB (the first's is 19 MiB)
    smallest_conv_output = 512 * 32 * 8 * 8 * 4
    # What a step allocates are per-channel (and per sample and channel) vectors and numpy's own
    # iteration buffers: a few hundred kilobytes, not one convolution's output or work array.
    assert peak < smallest_conv_output / 4, f"a step allocated {peak:,} bytes at its peak"


# ---------------------------------------------------------------- pooling block by block


def pooled(layer, x, g):
    out = layer.forward(x).copy()
    return out, layer.backward(g).copy()


@pytest.mark.parametrize("kind", [MaxPool2d, AvgPool2d])
@pytest.mark.parametrize("case", [(2, 8, 8), (3, 9, 7)], ids=["2x2-8x8", "3x3-9x7-cropped"])
def test_pooling_block_by_block_gives_the_values_and_gradients_of_one_pass(kind, case):
    """Blocks of one sample and of three (the last block shorter) against one block of all 7."""
    k, height, width = case
    rng = np.random.default_rng(9)
    x = rng.standard_normal((7, 3, height, width))
    g = rng.standard_normal((7, 3, height // k, width // k))
    whole = pooled(built(kind(k)), x, g)
    for samples in (1, 3):
        layer = built(kind(k))
        layer.BLOCK_VALUES = samples * x[0].size
        assert len(layer._blocks(len(x), x[0].size)) == -(-7 // samples)
        for got, expected in zip(pooled(layer, x, g), whole):
            np.testing.assert_array_equal(got, expected)


def test_max_pooling_ties_go_to_the_first_maximum_in_every_block():
    """The tied windows of the tie test, as three samples pooled one block each."""
    x = np.array([[7, 7, 1, 1], [7, 7, 1, 1], [0, 0, 3, 5], [2, 2, 5, 5]],
                 dtype=np.float64).reshape(1, 1, 4, 4)
    layer = built(MaxPool2d(2))
    layer.BLOCK_VALUES = 1
    layer.forward(np.concatenate([x, x + 1, x * 2]))
    dx = layer.backward(np.ones((3, 1, 2, 2)))
    first = [[1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0]]
    np.testing.assert_array_equal(dx[:, 0], [first] * 3)


def test_max_pooling_block_by_block_matches_finite_differences():
    layer = built(MaxPool2d(2))
    layer.BLOCK_VALUES = 2 * 3 * 6 * 6    # blocks of two samples, the last of one
    x = (np.random.default_rng(10).permutation(5 * 3 * 6 * 6) * 1e-3).reshape(5, 3, 6, 6)
    analytic, numeric = gradients(layer, x)
    assert rel_error(analytic["x"], numeric["x"]) < TOL


def test_a_relu_after_max_pooling_works_in_place_and_keeps_the_gradients():
    """Max pooling never reads its output or its returned gradient again: the ReLU after it
    overwrites both, and the model's gradients still match finite differences."""
    model = Sequential([Conv2d(1, 2, 3, bias=False), BatchNorm(2), MaxPool2d(2), ReLU(),
                        Conv2d(2, 2, 3), Flatten(), Linear(2, 3)], dtype=np.float64, seed=11)
    assert model.layers[3].in_place
    x = np.random.default_rng(12).standard_normal((3, 1, 8, 8))
    g = np.random.default_rng(13).standard_normal((3, 3))
    assert_model_matches_finite_differences(model, x, g)


def test_a_pooling_writes_its_input_gradient_over_its_input_only_where_nothing_reads_it_again():
    model = Sequential([MaxPool2d(2), Conv2d(1, 2, 3), AvgPool2d(2), ReLU(), MaxPool2d(2),
                        Flatten(), Linear(2, 3)], dtype=np.float64, seed=14)
    assert [layer.grad_over_input for layer in model.layers if hasattr(layer, "grad_over_input")] \
        == [False,    # the first layer: its input is the caller's data
            True,     # after a convolution
            False]    # after a ReLU, whose backward reads its output
    x = np.random.default_rng(15).standard_normal((3, 1, 14, 14))
    data = x.copy()
    model.forward(x)
    model.backward(np.ones((3, 3)), need_input_grad=True)
    np.testing.assert_array_equal(x, data)


@pytest.mark.parametrize("pool", [MaxPool2d, AvgPool2d])
def test_an_input_gradient_written_over_the_input_changes_no_gradient(pool):
    x = np.random.default_rng(16).standard_normal((5, 1, 13, 13))   # 11 x 11: a cropped pixel
    g = np.random.default_rng(17).standard_normal((5, 3))
    results = []
    for over_input in (True, False):
        model = Sequential([Conv2d(1, 4, 3, bias=False), BatchNorm(4), pool(2), ReLU(),
                            Conv2d(4, 2, 3), pool(2), Flatten(), Linear(2, 3)],
                           dtype=np.float64, seed=18)
        pools = [model.layers[2], model.layers[5]]
        assert all(layer.grad_over_input for layer in pools)
        for layer in pools:
            layer.grad_over_input = over_input
        model.forward(x)
        dx = model.backward(g, need_input_grad=True).copy()
        results.append((dx, model.grads.copy()))
    for over_input, apart in zip(*results):
        np.testing.assert_array_equal(over_input, apart)


# ---------------------------------------------------------------- backward by shifted rows


SHIFT_CASES = [(2, 3, 3, 1, 5, 7), (3, 4, 5, 0, 9, 8), (2, 2, 4, 3, 3, 3), (1, 3, 3, 0, 6, 6)]


@pytest.mark.parametrize("need_input_grad", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", SHIFT_CASES, ids=lambda c: "in{}-out{}-k{}-p{}-{}x{}".format(*c))
def test_backward_by_shifted_rows_equals_im2col_and_col2im(case, bias, need_input_grad,
                                                          monkeypatch):
    """The same gradients both ways, over blocks of two samples (the last of one)."""
    from ddptrain.nn import conv as conv_module
    c_in, c_out, k, pad, height, width = case
    x = np.random.default_rng(14).standard_normal((5, c_in, height, width))
    passes = {}
    for shifted in (True, False):
        monkeypatch.setattr(conv_module, "shifts_pay", lambda layer, need, use=shifted: use)
        layer = built(Conv2d(c_in, c_out, k, padding=pad, bias=bias))
        per_sample = (c_in * k * k + bias) * (height + 2 * pad) * (height + 2 * pad) * 8
        layer.CHUNK_BYTES = 2 * per_sample
        passes[shifted] = one_pass(layer, x, need_input_grad, seed=15)
    assert len(layer._chunks(5, layer._geometry_now)[0]) > 1
    assert_same_pass(passes[True], passes[False], need_input_grad)


def one_pass(layer, x, need_input_grad, seed):
    """``layer``'s output, input gradient (None without) and parameter gradients, for ``x`` and a
    random output gradient drawn from ``seed``."""
    out = layer.forward(x).copy()
    g = np.random.default_rng(seed).standard_normal(out.shape)
    dx = layer.backward(g, need_input_grad=need_input_grad)
    return (out, None if dx is None else dx.copy(),
            {name: grad.copy() for name, grad in layer.grads.items()})


def assert_same_pass(first, second, need_input_grad):
    """Two ``one_pass`` results agree to rounding (sums taken in another order)."""
    (out_a, dx_a, grads_a), (out_b, dx_b, grads_b) = first, second
    assert rel_error(out_a, out_b) < 1e-12
    assert (dx_a is None) == (dx_b is None) == (not need_input_grad)
    if need_input_grad:
        assert rel_error(dx_a, dx_b) < 1e-12
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert rel_error(grads_a[name], grads_b[name]) < 1e-12, name


def test_the_shifted_backward_is_taken_where_it_copies_less():
    from ddptrain.nn.conv_shifts import shifts_pay
    assert shifts_pay(Conv2d(16, 32, 5), need_input_grad=True)        # the cnn's second conv
    assert not shifts_pay(Conv2d(1, 16, 5), need_input_grad=False)    # its first: one channel
    assert not shifts_pay(Conv2d(16, 32, 5, stride=2), need_input_grad=True)   # no wide rows
    assert not shifts_pay(Conv2d(8, 8, 1), need_input_grad=True)      # 1x1: nothing to shift


# ---------------------------------------------------------------- channels last


LAST_CASES = [(16, 4, 5, 1, 0, 9, 9), (2, 3, 3, 1, 1, 5, 7), (3, 2, 3, 2, 1, 8, 6),
              (4, 3, 1, 1, 0, 4, 4), (2, 2, 4, 1, 3, 3, 3)]


@pytest.mark.parametrize("need_input_grad", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", LAST_CASES,
                         ids=lambda c: "in{}-out{}-k{}-s{}-p{}-{}x{}".format(*c))
def test_channels_last_equals_wide_rows_over_blocks(case, bias, need_input_grad, monkeypatch):
    """The same output and gradients both ways, in blocks of one sample (backward reuses the last
    block's cols and rebuilds the others); the input gradient by shifted rows (stride 1) or by
    channels-last col2im (stride 2, 1x1)."""
    from ddptrain.nn import conv_channels_last
    c_in, c_out, k, stride, pad, height, width = case
    x = np.random.default_rng(16).standard_normal((5, c_in, height, width))
    passes = {}
    for last in (True, False):
        monkeypatch.setattr(conv_channels_last, "pays", lambda layer, use=last: use)
        layer = built(Conv2d(c_in, c_out, k, stride=stride, padding=pad, bias=bias))
        layer.CHUNK_BYTES = 1   # a sample a block
        passes[last] = one_pass(layer, x, need_input_grad, seed=17)
    assert_same_pass(passes[True], passes[False], need_input_grad)


def test_channels_last_is_taken_where_a_window_row_is_a_long_run():
    from ddptrain.nn.conv_channels_last import pays
    assert pays(Conv2d(16, 32, 5))          # the cnn's second conv: runs of 80
    assert pays(Conv2d(6, 16, 5))           # lenet5's second: 30
    assert not pays(Conv2d(1, 16, 5))       # a first conv: runs of 5
    assert not pays(Conv2d(3, 8, 3))        # RGB, 3x3: 9


@pytest.mark.parametrize("make", [lambda: MaxPool2d(2), lambda: MaxPool2d(3, stride=2),
                                  lambda: AvgPool2d(2), lambda: AvgPool2d(2, stride=1)],
                         ids=["max", "max-overlapping", "avg", "avg-overlapping"])
def test_pooling_an_empty_batch_gives_empty_arrays(make):
    """A rank may hold no row of an epoch's short last batch: it still runs every layer."""
    layer = built(make())
    out = layer.forward(np.zeros((0, 2, 7, 7)))
    assert out.shape[0] == 0 and layer.backward(np.zeros(out.shape)).shape == (0, 2, 7, 7)


@pytest.mark.parametrize("case", [(1, 4, 5, 1, 0), (16, 4, 5, 1, 0), (2, 3, 3, 2, 1)],
                         ids=["one-channel", "channels-last", "stride-2"])
def test_a_convolution_of_an_empty_batch_gives_empty_arrays_and_zero_gradients(case):
    """A rank with no row of a step, or of an evaluation's last pass, runs the layer all the same:
    an empty output, no input gradient, zero weight gradients; the next batch is unaffected."""
    c_in, c_out, k, stride, pad = case
    layer = built(Conv2d(c_in, c_out, k, stride=stride, padding=pad))
    x = np.random.default_rng(18).standard_normal((2, c_in, 9, 9))
    full = layer.forward(x).copy()
    layer.backward(np.ones_like(full))
    out = layer.forward(np.zeros((0, c_in, 9, 9)))
    assert out.shape == (0, *full.shape[1:])
    assert layer.backward(np.zeros(out.shape)).shape == (0, c_in, 9, 9)
    assert all(not grad.any() for grad in layer.grads.values())
    np.testing.assert_array_equal(layer.forward(x), full)


# ---------------------------------------------------------------- groups of rows (--reproducible)


def test_in_groups_of_rows_a_group_of_a_few_blocks_worth_of_samples_is_one_product():
    """A group is small (a batch of 512 in 24 groups: 21 rows), so its blocks may be larger than
    CHUNK_BYTES: fewer, larger calls (Conv2d.GROUP_CHUNK_BYTES). No block spans two groups."""
    layer = built(Conv2d(3, 4, 3, padding=1))
    per_sample = layer.CHUNK_BYTES // 10   # 10 samples a block on a thread's rows
    chunks, _ = layer._sample_blocks(42, per_sample)
    assert len(chunks) == 5
    layer.row_groups = [(0, 21), (21, 42)]
    chunks, largest = layer._sample_blocks(42, per_sample)
    assert chunks == [(0, 21), (21, 21)] and largest == 21
    layer.row_groups = [(0, 2), (2, 40)]
    assert layer._sample_blocks(40, per_sample)[0] == [(0, 2), (2, 19), (21, 19)]


@pytest.mark.parametrize("path", ["wide rows", "shifted rows", "channels last"])
@pytest.mark.parametrize("block_samples", [1, 2, 8])
def test_in_groups_of_rows_each_group_gets_the_bits_of_the_layer_on_its_rows_alone(
        path, block_samples, monkeypatch):
    """--reproducible's groups (training/groups.py): told the groups, a convolution runs on all of
    them at once, yet every block of samples lies in one group and each group's weight gradient is
    its own sum: the output, input gradient and gradients of each group are bitwise those of the
    layer on that group's rows alone (blocks within a group included)."""
    from ddptrain.nn import conv as conv_module, conv_channels_last
    monkeypatch.setattr(conv_channels_last, "pays", lambda layer: path == "channels last")
    monkeypatch.setattr(conv_module, "shifts_pay", lambda layer, need: path == "shifted rows")
    x = np.random.default_rng(20).standard_normal((7, 3, 6, 6))
    g = np.random.default_rng(21).standard_normal((7, 4, 6, 6))
    groups = [(0, 2), (2, 3), (3, 7)]

    def layer():
        made = built(Conv2d(3, 4, 3, padding=1))
        # blocks of block_samples samples (cols of 8 x 8 per sample), in groups and alone
        made.CHUNK_BYTES = made.GROUP_CHUNK_BYTES = block_samples * (3 * 9 + 1) * 8 * 8 * 8
        return made

    grouped = layer()
    grouped.row_groups = groups
    grouped.group_grads = {name: np.full((len(groups), *grad.shape), np.nan)
                           for name, grad in grouped.grads.items()}
    out, dx = grouped.forward(x).copy(), grouped.backward(g).copy()
    for k, (start, stop) in enumerate(groups):
        alone = layer()
        np.testing.assert_array_equal(out[start:stop], alone.forward(x[start:stop]))
        np.testing.assert_array_equal(dx[start:stop], alone.backward(g[start:stop]))
        for name, grad in alone.grads.items():
            np.testing.assert_array_equal(grouped.group_grads[name][k], grad)
