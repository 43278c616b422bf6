"""blas.axpby: y = a * x + b * y in one pass of the BLAS numpy loaded, numpy's results up to one
rounding."""

import numpy as np
import pytest

from ddptrain.backends import blas

SIZES = [1, 7, 1000, 535_818]   # the last: the default MLP's parameters


def numpy_axpby(alpha, x, beta, y):
    dtype = y.dtype.type
    return x * dtype(alpha) + y * dtype(beta)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("alpha, beta", [(1.0, 0.9), (-0.0137, 1.0), (0.5, 0.25)])
def test_axpby_is_numpys_up_to_the_rounding_of_one_operation(dtype, size, alpha, beta):
    rng = np.random.default_rng(size)
    x, y = rng.standard_normal(size).astype(dtype), rng.standard_normal(size).astype(dtype)
    expected = numpy_axpby(alpha, x, beta, y)
    blas.axpby(alpha, x, beta, y)
    # A fused multiply-add rounds once where numpy rounds three times: within two units in the last
    # place of the larger term, whatever cancellation leaves.
    terms = np.maximum(np.abs(x * dtype(alpha)), np.abs(y * dtype(beta)))
    assert np.all(np.abs(y - expected) <= 2 * np.spacing(terms))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_an_elements_value_does_not_depend_on_where_the_array_starts(dtype):
    """What a rank's slice of the parameters (--shard-optimizer) gets is what the whole array
    gets."""
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal(100_003).astype(dtype), rng.standard_normal(100_003).astype(dtype)
    whole, pieces = y.copy(), y.copy()
    blas.axpby(-0.01, x, 1.0, whole)
    for start, stop in ((0, 5), (5, 33_334), (33_334, 100_003)):
        blas.axpby(-0.01, x[start:stop], 1.0, pieces[start:stop])
    np.testing.assert_array_equal(pieces, whole)


def test_without_a_blas_symbol_numpy_gives_its_own_results(monkeypatch):
    monkeypatch.setattr(blas, "_found", {})
    assert not blas.available(np.float32)
    rng = np.random.default_rng(2)
    x, y = (rng.standard_normal(1000).astype(np.float32) for _ in range(2))
    expected = y * np.float32(0.9) + x
    blas.axpby(1.0, x, 0.9, y)
    np.testing.assert_array_equal(y, expected)


def test_numpys_blas_is_found_where_numpy_brings_openblas():
    from threadpoolctl import threadpool_info
    if not any(lib.get("internal_api") == "openblas" for lib in threadpool_info()):
        pytest.skip("numpy here is not built with OpenBLAS")
    assert blas.available(np.float32) and blas.available(np.float64)


@pytest.mark.parametrize("x, y",
                         [(np.zeros(3), np.zeros(4)), (np.zeros(3, np.float32), np.zeros(3)),
                          (np.zeros((4, 2))[:, 0], np.zeros(4))])
def test_axpby_refuses_arrays_it_cannot_run_on(x, y):
    with pytest.raises(ValueError,
                       match="axpby needs two contiguous arrays of the same shape and type"):
        blas.axpby(1.0, x, 1.0, y)


# ----------------------------------------------------------- the same bits in any slice (the probe)

def fake_kernel(rounds_otherwise):
    """A stand-in for a BLAS's C ``axpby`` (``function(n, alpha, x, 1, beta, y, 1)``, pointers as
    integers) that computes ``alpha * x + beta * y`` in float64 and rounds it once, except for the
    elements where ``rounds_otherwise(index, address)``, which get numpy's three roundings."""
    import ctypes

    def function(n, alpha, x_address, _, beta, y_address, __):
        x = np.ctypeslib.as_array((ctypes.c_float * n).from_address(x_address))
        y = np.ctypeslib.as_array((ctypes.c_float * n).from_address(y_address))
        fused = (np.float64(alpha) * x + np.float64(beta) * y).astype(np.float32)
        separate = x * np.float32(alpha) + y * np.float32(beta)
        otherwise = rounds_otherwise(np.arange(n), y_address + 4 * np.arange(n))
        y[...] = np.where(otherwise, separate, fused)

    return {np.dtype(np.float32): function}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpys_arithmetic_gives_the_same_bits_in_any_slice(dtype):
    assert blas.same_bits_in_any_slice(dtype, functions={})


@pytest.mark.parametrize("kernel, same", [
    (fake_kernel(lambda index, address: np.zeros(index.shape, bool)), True),
    # a tail after a vector loop of 16 elements
    (fake_kernel(lambda index, address: index >= index.size // 16 * 16), False),
    # a head peeled off until the stores are aligned to 64 bytes
    (fake_kernel(lambda index, address: address < -(-(address[0]) // 64) * 64), False),
])
def test_a_kernel_that_rounds_an_element_by_where_it_sits_is_found_out(kernel, same):
    assert blas.same_bits_in_any_slice(np.float32, functions=kernel) is same


@pytest.mark.parametrize("verdict", [True, False])
def test_reproducible_updates_keep_the_blas_only_where_it_gives_the_same_bits_in_any_slice(
        monkeypatch, verdict):
    from ddptrain.backends import gemm
    monkeypatch.setattr(blas, "same_bits_in_any_slice", lambda dtype, functions=None: verdict)
    backend = gemm.with_updates_anywhere(gemm.NUMPY, np.float32)
    assert (backend.axpby is blas.axpby) is verdict
    if not verdict:   # numpy's own arithmetic
        rng = np.random.default_rng(3)
        x, y = (rng.standard_normal(1000).astype(np.float32) for _ in range(2))
        expected = numpy_axpby(-0.5, x, 0.9, y)
        backend.axpby(-0.5, x, 0.9, y)
        np.testing.assert_array_equal(y, expected)
