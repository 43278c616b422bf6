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
