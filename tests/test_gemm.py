"""The library of the matrix products (``--gemm``): numpy's BLAS, or Intel's MKL where it is
installed.

MKL multiplies as numpy does, to rounding, in every layout the layers hand it, and the same bits
wherever the arrays sit in memory; ``auto`` takes it on Intel's CPUs only; a run with it trains, on
P ranks, what one process trains. The test extra installs MKL on x86-64 Linux; elsewhere the MKL
tests cannot run.
"""

import subprocess
import sys

import numpy as np
import pytest

import ddptrain
import helpers
from ddptrain import cli
from ddptrain.backends import blas, denormals, gemm, mkl as mkl_library
from ddptrain.errors import UserError
from ddptrain.optim.optimizers import SGD
from helpers import final_params, model_spec, relative_error

needs_mkl = pytest.mark.skipif(mkl_library.mkl_installed() is None,
                               reason="MKL is not installed (the test extra installs it on "
                                      "x86-64 Linux only)")


@pytest.fixture
def mkl():
    """The process's MKL, loaded."""
    return mkl_library.load()


def no_numpy_fallback(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("np.matmul was called: MKL did not take this product")
    monkeypatch.setattr(np, "matmul", refuse)


def operands(rng, dtype):
    """(a, b, out) in the layouts the layers use: C-ordered, ``.T`` views, column slices of wider
    arrays."""
    a, b = rng.standard_normal((7, 5)).astype(dtype), rng.standard_normal((5, 6)).astype(dtype)
    wide_a = rng.standard_normal((7, 9)).astype(dtype)
    wide_out = np.zeros((7, 10), dtype)
    return {
        "C @ C": (a, b, np.empty((7, 6), dtype)),
        "A.T @ C": (np.ascontiguousarray(a.T).T, b, np.empty((7, 6), dtype)),
        "C @ B.T": (a, np.ascontiguousarray(b.T).T, np.empty((7, 6), dtype)),
        "A.T @ B.T": (np.ascontiguousarray(a.T).T, np.ascontiguousarray(b.T).T,
                      np.empty((7, 6), dtype)),
        "columns of a wider array": (wide_a[:, 2:7], b, np.empty((7, 6), dtype)),
        "into columns of a wider array": (a, b, wide_out[:, 1:7]),
        "one row @ C (a bias gradient)": (a[:1], b, np.empty((1, 6), dtype)),
        "one row @ B.T": (a[2:3], np.ascontiguousarray(b.T).T, np.empty((1, 6), dtype)),
        "a column's transpose @ C": (np.ascontiguousarray(a.T)[:, 4:5].T, b,
                                     np.empty((1, 6), dtype)),
    }


@needs_mkl
@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-5), (np.float64, 1e-13)])
@pytest.mark.parametrize("layout", list(operands(np.random.default_rng(0), np.float32)))
def test_mkl_multiplies_as_numpy_does_in_every_layout_the_layers_use(
        mkl, monkeypatch, dtype, rtol, layout):
    a, b, out = operands(np.random.default_rng(0), dtype)[layout]
    expected = np.matmul(a, b)
    no_numpy_fallback(monkeypatch)
    result = mkl.matmul(a, b, out=out)
    assert result is out
    np.testing.assert_allclose(out, expected, rtol=rtol, atol=rtol)


@needs_mkl
@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-5), (np.float64, 1e-13)])
def test_mkl_s_dot_product_is_numpy_s_to_rounding(mkl, dtype, rtol):
    """The squared norm of the gradient, each step (the finite check and clipping)."""
    x = np.random.default_rng(4).standard_normal(100_003).astype(dtype)
    squares = mkl.dot(x, x)
    assert type(squares) is dtype
    np.testing.assert_allclose(squares, np.dot(x.astype(np.float64), x.astype(np.float64)),
                               rtol=rtol)
    # strided: numpy's
    np.testing.assert_array_equal(mkl.dot(x[::2], x[::2]), np.dot(x[::2], x[::2]))
    x[7] = np.nan
    assert np.isnan(mkl.dot(x, x))


@needs_mkl
def test_layouts_cblas_cannot_read_are_multiplied_by_numpy(mkl):
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((6, 8)), rng.standard_normal((4, 5))
    cases = [(a[:, ::2], b, None),                                   # every other column: no ld
             (a[:, :4].astype(np.int64), b.astype(np.int64), None),  # integers
             (a[:, :4].astype(np.float32), b, None),                 # mixed types
             (np.stack([a[:, :4]] * 2), b, None)]                    # a stack of matrices
    for x, y, out in cases:
        np.testing.assert_array_equal(mkl.matmul(x, y, out=out), np.matmul(x, y))
    square = rng.standard_normal((5, 5))
    overlapping = square.copy()
    np.testing.assert_allclose(mkl.matmul(overlapping, square, out=overlapping), square @ square)


@needs_mkl
def test_a_leading_dimension_beyond_a_c_int_goes_to_numpy(mkl, monkeypatch):
    """MKL's LP64 interface takes sizes and strides as C ints: 2**31 would wrap around."""
    rows = np.zeros((2, 1))
    # never read
    tall = np.lib.stride_tricks.as_strided(rows, shape=(2, 1), strides=(2 ** 31 * 8, 8))
    monkeypatch.setattr(np, "matmul", lambda *args, **kwargs: "numpy's")
    assert mkl.matmul(tall, np.ones((1, 3))) == "numpy's"


@needs_mkl
def test_mkl_gives_the_same_bits_wherever_the_operands_sit_in_memory(mkl):
    """Reproducible mode: MKL's default may round differently with the arrays' alignment, and numpy
    aligns an array only to 16 bytes."""
    rng = np.random.default_rng(2)
    a = rng.standard_normal((64, 300)).astype(np.float32)
    b = rng.standard_normal((300, 100)).astype(np.float32)
    reference = mkl.matmul(a, b)
    buffer = np.empty(a.size + 64, np.float32)
    for offset in range(1, 16):
        moved = buffer[offset:offset + a.size].reshape(a.shape)
        moved[...] = a
        np.testing.assert_array_equal(mkl.matmul(moved, b), reference)


@needs_mkl
def test_with_mkl_the_sgd_update_runs_in_mkl_too(mkl, monkeypatch):
    """One pool of threads for a step: the update's axpby is MKL's where MKL multiplies, numpy's
    BLAS's otherwise."""
    backend = gemm.backend(gemm.choose("mkl"))
    called = []
    original = mkl.axpby[np.dtype(np.float32)]
    monkeypatch.setitem(mkl.axpby, np.dtype(np.float32),
                        lambda *args: called.append(original(*args)))
    rng = np.random.default_rng(3)
    params, grads = (rng.standard_normal(1000).astype(np.float32) for _ in range(2))
    expected_velocity = grads.copy()
    expected = params - np.float32(0.1) * expected_velocity
    SGD(momentum=0.9, backend=backend).step(params, grads, 0.1)
    # MKL fuses the multiply and the add
    np.testing.assert_allclose(params, expected, rtol=1e-6, atol=1e-7)
    # the first step copies the gradient into the velocity: one axpby, MKL's
    assert len(called) == 1
    SGD(momentum=0.9, backend=gemm.NUMPY).step(params, grads, 0.1)
    assert len(called) == 1   # numpy's backend: not MKL's


def mkl_code_path(**env):
    """MKL's code path as a fresh process sees it (MKL reads its environment once, when it
    loads)."""
    probe = ("from ddptrain.backends import gemm; "
             "print(gemm.backend(gemm.choose('mkl')).code_path())")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120, env={**helpers.clean_env(), **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


intel_only = pytest.mark.skipif(
    gemm.cpu_vendor() != "GenuineIntel",
    reason=f"MKL names its kernels' instruction set on Intel's CPUs only (on this "
           f"{gemm.cpu_vendor()} CPU it reports MKL_CBWR_AUTO, 'generic', limited or not), so "
           f"whether it obeys MKL_ENABLE_INSTRUCTIONS cannot be seen here")


@needs_mkl
@pytest.mark.slow
def test_mkl_names_the_instruction_set_of_its_kernels():
    """On an Intel CPU, the instruction set of the kernels MKL picked; elsewhere, that it picked no
    CPU-specific kernels (MKL_CBWR_AUTO, named 'generic')."""
    expected = (("AVX2", "AVX-512", "AVX-512 E1") if gemm.cpu_vendor() == "GenuineIntel"
                else ("generic",))
    assert mkl_code_path() in expected   # x86-64 CPUs of this decade


@needs_mkl
@intel_only
@pytest.mark.slow
def test_mkl_obeys_a_limit_on_the_instruction_set_of_its_kernels():
    """What the benchmark's --isa avx2 relies on: on a CPU with AVX-512,
    MKL_ENABLE_INSTRUCTIONS=AVX2 holds MKL to its AVX2 kernels, and the code path says so."""
    assert mkl_code_path(MKL_ENABLE_INSTRUCTIONS="AVX2") == "AVX2"


def test_auto_takes_mkl_on_intel_cpus_only_and_says_why_not(monkeypatch):
    monkeypatch.setattr(mkl_library, "mkl_installed", lambda: "2026.2.0")
    assert (gemm.choose("auto", vendor="GenuineIntel")
            == gemm.Choice("mkl", "MKL 2026.2.0 (an Intel CPU)"))
    amd = gemm.choose("auto", vendor="AuthenticAMD")
    assert amd.name == "numpy"
    assert "this CPU is AuthenticAMD's, not Intel's" in amd.description
    assert gemm.choose("mkl", vendor="AuthenticAMD").name == "mkl"     # asked for: anywhere
    assert gemm.choose("numpy", vendor="GenuineIntel").name == "numpy"
    monkeypatch.setattr(mkl_library, "mkl_installed", lambda: None)
    absent = gemm.choose("auto", vendor="GenuineIntel")
    assert absent.name == "numpy" and absent.description.endswith("(MKL is not installed)")


def test_mkl_asked_for_where_it_is_not_installed_is_refused_in_one_line(
        monkeypatch, small_data, tmp_path, capsys):
    monkeypatch.setattr(mkl_library, "mkl_installed", lambda: None)
    with pytest.raises(UserError, match=r"^--gemm mkl: MKL is not installed here \(ddptrain's mkl "
                                        r"extra: "):
        gemm.choose("mkl")
    status = cli.main(["--data", small_data, "--model", model_spec(), "--epochs", "1", "--gemm",
                       "mkl", "--run-dir", str(tmp_path / "run")])
    error = capsys.readouterr().err.strip().splitlines()
    assert status != 0
    assert error == ["ddptrain: error: --gemm mkl: MKL is not installed here (ddptrain's mkl "
                     "extra: pip install -e '.[mkl]' in its checkout installs the mkl and "
                     "intel-openmp wheels)"]
    assert not (tmp_path / "run" / "checkpoints").exists()


class RankZeroOfTwo:
    """Rank 0's view of a 2-rank world: each Allgather gets rank 1's next answer, in order (its
    verdict on the library asked for, None where it passed; then, for --gemm auto, its choice)."""
    size, rank = 2, 0

    def __init__(self, *rank1_answers):
        self.rank1_answers = list(rank1_answers)

    def allgather(self, mine):
        return [mine, self.rank1_answers.pop(0)]


def test_a_rank_that_cannot_multiply_with_the_library_asked_for_stops_every_rank_with_its_reason():
    """Every rank learns of it (an Allgather of the verdicts), so none goes on alone into a
    collective."""
    from ddptrain.run.preflight import configure_gemm

    no_mkl = ("UserError", "--gemm mkl: MKL is not installed here (ddptrain's mkl extra: ...)")
    with pytest.raises(UserError, match=r"^rank 1: --gemm mkl: MKL is not installed here "
                                        r"\(ddptrain's mkl extra: \.\.\.\)$") as refused:
        configure_gemm(RankZeroOfTwo(no_mkl), "numpy")
    assert refused.value.all_ranks   # met by every rank: printed once, no MPI abort


def test_auto_takes_mkl_only_if_every_rank_can_so_that_every_rank_multiplies_alike(monkeypatch):
    """Nodes differ (an Intel node, an AMD one): one library for all, and the start-up line says
    why."""
    from ddptrain.run.preflight import configure_gemm
    monkeypatch.setattr(mkl_library, "mkl_installed", lambda: "2026.2.0")
    monkeypatch.setattr(gemm, "cpu_vendor", lambda: "GenuineIntel")   # rank 0 alone would take MKL
    amd = gemm.Choice("numpy", "numpy's openblas (MKL is installed, but this CPU is "
                               "AuthenticAMD's, not Intel's)")
    choice = configure_gemm(RankZeroOfTwo(None, amd), "auto")
    assert choice.name == "numpy"
    assert choice.description == (f"numpy's {blas.library_name()} (MKL only if every rank can "
                                  f"take it, and rank 1 cannot: MKL is installed, but this CPU is "
                                  f"AuthenticAMD's, not Intel's)")


@needs_mkl
def test_auto_takes_mkl_where_every_rank_can(monkeypatch):
    from ddptrain.run.preflight import configure_gemm
    monkeypatch.setattr(gemm, "cpu_vendor", lambda: "GenuineIntel")
    intel = gemm.Choice("mkl", f"MKL {mkl_library.mkl_installed()} (an Intel CPU)")
    assert configure_gemm(RankZeroOfTwo(None, intel), "auto") == intel


def test_an_unknown_library_is_refused(small_data):
    with pytest.raises(UserError, match="--gemm must be one of auto, numpy, mkl, got 'cublas'"):
        gemm.choose("cublas")
    with pytest.raises(UserError, match="--gemm must be one of auto, numpy, mkl, got 'cublas'"):
        ddptrain.train(data=small_data, gemm="cublas", dry_run=True)


@pytest.mark.parametrize("library", ["numpy", pytest.param("mkl", marks=needs_mkl)])
def test_the_start_up_line_names_the_library_of_the_products(library, small_data, tmp_path, capsys):
    assert cli.main(["--data", small_data, "--model", model_spec(), "--epochs", "1", "--gemm",
                     library, "--run-dir", str(tmp_path), "--dry-run"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    if library == "mkl":
        assert f"; matrix products: MKL {mkl_library.mkl_installed()};" in first
        assert " mkl thread" in first   # the threads --threads sets are MKL's
    else:
        assert f"; matrix products: numpy's {blas.library_name()};" in first
    assert first.endswith("; denormals flushed to zero") or not denormals.supported()


@needs_mkl
@pytest.mark.parametrize("ranks", [2, 3])
def test_with_mkl_p_ranks_train_the_parameters_of_one_process(ranks, small_data, tmp_path):
    def train(run_dir, *options):
        status = cli.main(["--data", small_data, "--model", model_spec(), "--dtype", "float64",
                           "--batch-size", "29", "--epochs", "2", "--lr-schedule", "constant",
                           "--quiet", "--gemm", "mkl", "--run-dir", str(run_dir), *options])
        assert status == 0
        return final_params(run_dir)

    one = train(tmp_path / "one")
    several = train(tmp_path / "several", "--simulate-ranks", str(ranks))
    assert relative_error(several, one) < 1e-9


@needs_mkl
def test_a_seed_fixes_a_run_with_mkl(small_data, tmp_path):
    def train(run_dir, threads):
        assert cli.main(["--data", small_data, "--model", model_spec(), "--epochs", "2", "--quiet",
                         "--gemm", "mkl", "--threads", str(threads), "--run-dir",
                         str(run_dir)]) == 0
        return final_params(run_dir)

    np.testing.assert_array_equal(train(tmp_path / "a", 1), train(tmp_path / "b", 1))


@needs_mkl
def test_mkl_and_numpy_train_the_same_model_to_rounding(small_data, tmp_path):
    def train(run_dir, library):
        assert cli.main(["--data", small_data, "--model", model_spec(), "--dtype", "float64",
                         "--epochs", "1", "--lr-schedule", "constant", "--quiet", "--gemm", library,
                         "--run-dir", str(run_dir)]) == 0
        return final_params(run_dir)

    assert relative_error(train(tmp_path / "mkl", "mkl"), train(tmp_path / "numpy", "numpy")) < 1e-9


GNU_OPENMP = "libgomp.so.1"


@needs_mkl
@pytest.mark.slow
def test_mkl_is_refused_where_another_openmp_runtime_was_loaded_first():
    """PyTorch's wheels load GNU's libgomp: MKL's threads, started afterwards on Intel's runtime,
    would split their work by libgomp's thread numbers (all 0) and multiply wrongly. Asked for, MKL
    is refused in one line; auto takes numpy's BLAS and says why. In a fresh process, which loads
    libgomp first."""
    import ctypes.util

    import helpers
    if ctypes.util.find_library("gomp") is None:
        pytest.skip("GNU's OpenMP runtime (libgomp, which gcc brings) is not installed here")
    probe = (f"import ctypes; ctypes.CDLL({GNU_OPENMP!r}, mode=ctypes.RTLD_GLOBAL)\n"
             "from ddptrain.backends import gemm\n"
             "print(gemm.choose('auto', vendor='GenuineIntel').description)\n"
             "gemm.choose('mkl')\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120, env=helpers.clean_env())
    assert proc.returncode != 0
    assert ("(MKL is installed, but another OpenMP runtime is loaded in this process: "
            in proc.stdout)
    assert "libgomp" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "ddptrain.errors.UserError: --gemm mkl: another OpenMP runtime is loaded in this process (")
