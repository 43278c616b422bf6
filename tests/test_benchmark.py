"""scripts/benchmark.py, read through the file its --json option writes.

Most tests share one run (a module fixture): the tests' small data set and
tiny models, one round of two repetitions at global batch 128 (the batch size
of the MLP's targets, which --quick's batch 32 would leave out), no
time-to-accuracy runs. Nothing is timed for real: the tests check what the
JSON holds and that its ratios and verdicts follow from the rates it holds,
never how fast anything ran. Where PyTorch is not installed the runs pass
--no-torch and the tests expect no PyTorch rows.
"""

import importlib
import importlib.metadata
import importlib.util
import json
import math
import operator
import platform
import statistics
import subprocess
import sys

import numpy as np
import pytest

import fakehosts
import helpers
from helpers import model_spec

pytestmark = pytest.mark.slow   # every test here starts processes

sys.path.insert(0, str(helpers.ROOT / "scripts"))   # the benchmark's package: scripts/bench/
environment = importlib.import_module("bench.environment")

HAS_TORCH = importlib.util.find_spec("torch") is not None
BATCH = 128
CNN_MODEL = "conv4k3p1-bn-maxpool2-flatten-10"
HEADER_FLAGS = {"avx2", "fma", "avx512f"}
# The PyTorch row each ddptrain row is compared with ('vs PyTorch').
PYTORCH_PARTNER = {"ddp1": "torch1", "ddp1n": "torch1", "ddpP": "torchP", "ddpPn": "torchP",
                   "ddpPbn": "torchPbn", "ddpPbnl": "torchPbn", "cnn1": "tcnn1", "cnnP": "tcnnP"}


def run_benchmark(folder, *options):
    """Run the benchmark's command with ``options``; its JSON output (parsed) and its stdout."""
    out = folder / "bench.json"
    argv = [sys.executable, "scripts/benchmark.py", *map(str, options), "--json", str(out)]
    if not HAS_TORCH:
        argv.append("--no-torch")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=helpers.ROOT,
                          env=helpers.clean_env(), check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.fixture(scope="module")
def tiny_run(small_data, tmp_path_factory):
    return run_benchmark(tmp_path_factory.mktemp("benchmark"), "--data", small_data,
                         "--model", model_spec(), "--cnn-model", CNN_MODEL, "--rounds", 1,
                         "--repeats", 2, "--samples", 256, "--cnn-samples", 256,
                         "--batch-sizes", BATCH, "--no-tta")


def median_rate(rows, name):
    return statistics.median(rows[name]["rates"])


def runs_of(rows, key):
    return rows[f"{key}@{BATCH}"]["runs"]


def expected_row_keys(header):
    keys = {"ddp1", "ddpP", "ddpP0", "ddpPa", "ddpPz", "ddpPbn", "ddpPbnl", "cnn1", "cnnP", "ddpPo",
            "ddpPs", "ddp1r", "ddpPr", "cnn1r", "cnnPr"}
    if header["gemm"]["library"] == "mkl":   # then numpy's own BLAS is measured beside it
        keys |= {"ddp1n", "ddpPn"}
    if HAS_TORCH:
        keys |= {"torch1", "torchP", "torchPbn", "tcnn1", "tcnnP"}
    if fakehosts.why_unavailable() is None:   # as root: the rows across 2 fake hosts
        keys |= {"hosts", "hostso"}
    return keys


def test_the_benchmark_json_holds_every_row_with_positive_finite_rates_and_their_summary(tiny_run):
    result, _ = tiny_run
    header, rows = result["header"], result["rows"]
    assert set(rows) == {f"{key}@{BATCH}" for key in expected_row_keys(header)}
    for name, row in rows.items():
        rates = row["rates"]
        assert len(rates) == header["rounds"] * header["repeats"] == 2, name
        assert all(math.isfinite(rate) and rate > 0 for rate in rates), (name, rates)
        assert row["summary"] == {"median": statistics.median(rates), "min": min(rates),
                                  "max": max(rates), "all": rates}, name
        assert len(row["runs"]) == header["rounds"], name


def test_the_json_ratios_to_pytorch_are_the_ratios_of_the_median_rates_it_holds(tiny_run):
    rows = tiny_run[0]["rows"]
    for name, row in rows.items():
        partner = f"{PYTORCH_PARTNER.get(name.split('@')[0])}@{BATCH}"
        if partner not in rows:
            assert row["vs_pytorch"] is None, name
            continue
        assert row["vs_pytorch"]["row"] == partner, name
        assert row["vs_pytorch"]["ratio"] == pytest.approx(
            median_rate(rows, name) / median_rate(rows, partner), rel=1e-12), name
    assert HAS_TORCH == any(row["vs_pytorch"] for row in rows.values())


def test_each_rows_share_of_the_gemm_limit_is_its_median_rate_times_its_flops_over_the_limit(
        tiny_run):
    result, _ = tiny_run
    gemm = result["gemm"]
    for measured in gemm["rounds"]:
        flops = [measured[what]["flops"] for what in ("all_threads", "one_core", "ranks")]
        assert all(math.isfinite(f) and f > 0 for f in flops), measured
        at_once, alone = measured["ranks"]["flops"], measured["all_threads"]["flops"]
        assert measured["limit"] == max(at_once, alone)
    assert gemm["limit_flops"] == statistics.median(r["limit"] for r in gemm["rounds"])
    models = {"ddpPbn": "64-16-bn-10", "ddpPbnl": "64-16-bn-10", "torchPbn": "64-16-bn-10",
              "cnn1": CNN_MODEL, "cnnP": CNN_MODEL, "tcnn1": CNN_MODEL, "tcnnP": CNN_MODEL,
              "cnn1r": CNN_MODEL, "cnnPr": CNN_MODEL}
    for name, row in result["rows"].items():
        assert row["model"] == models.get(name.split("@")[0], model_spec()), name
        assert row["flops_per_sample"] > 0, name
        assert row["of_gemm_limit"] == pytest.approx(
            row["summary"]["median"] * row["flops_per_sample"] / gemm["limit_flops"], rel=1e-12)


def test_every_verdict_in_the_json_follows_from_the_figures_it_holds_and_is_printed(tiny_run):
    result, out = tiny_run
    rows, verdicts = result["rows"], result["targets"]
    holds = {">=": operator.ge, "<=": operator.le, "<": operator.lt}
    for verdict in verdicts:
        met = holds[verdict["compare"]](verdict["value"], verdict["need"])
        assert verdict["met"] == met, verdict
        if "pytorch" in verdict["rows"]:   # the best ddptrain row's median over the best PyTorch's
            ours = max(median_rate(rows, name) for name in verdict["rows"]["ddptrain"])
            theirs = max(median_rate(rows, name) for name in verdict["rows"]["pytorch"])
            assert verdict["value"] == pytest.approx(ours / theirs, rel=1e-12), verdict
        if "default" in verdict["rows"]:   # --reproducible's median over the default's
            (mine,), (default,) = verdict["rows"]["ddptrain"], verdict["rows"]["default"]
            assert verdict["value"] == pytest.approx(
                median_rate(rows, mine) / median_rate(rows, default), rel=1e-12), verdict
        status = "MET " if verdict["met"] else "MISSED"
        assert f"  [{status}] {verdict['target']}: {verdict['shown']}\n" in out
    share = next(v for v in verdicts if v["target"].startswith("element-wise share of a step"))
    profile = runs_of(rows, "ddp1")[0]["profile_ms"]
    products = sum(ms for name, ms in profile.items()
                   if name.startswith("matrix products") or "Allreduce" in name)
    assert share["value"] == pytest.approx(1 - products / sum(profile.values()), rel=1e-12)
    with_pytorch = [("mlp", f"1 process >= 1.0x PyTorch 1 process at batch {BATCH}"),
                    ("mlp", f"best launch >= 1.1x PyTorch's best at batch {BATCH}"),
                    ("mlp", f"2 ranks >= 2x PyTorch DDP at batch {BATCH}"),
                    ("cnn", f"{CNN_MODEL}: ddptrain 1 process >= 1.0x PyTorch 1 process at "
                            f"batch {BATCH}"),
                    ("cnn", f"{CNN_MODEL}: ddptrain 2 ranks >= 2x PyTorch DDP at batch {BATCH}"),
                    ("cnn", f"{CNN_MODEL}: ddptrain's best launch >= 1.2x PyTorch's best at batch "
                            f"{BATCH}")]
    cnn_share = next(v for v in verdicts if v["target"] == f"{CNN_MODEL}: ddptrain's best launch "
                     f">= 35% of the GEMM limit at batch {BATCH}")
    assert cnn_share["value"] == max(rows[f"{key}@{BATCH}"]["of_gemm_limit"]
                                     for key in ("cnn1", "cnnP"))
    reproducible = {("reproducible", f"{what}, batch {BATCH}: --reproducible >= 0.75x the default")
                    for what in ("MLP, 1 process", "MLP, 2 ranks", "CNN, 1 process",
                                 "CNN, 2 ranks")}
    assert {(v["group"], v["target"]) for v in verdicts} == {("mlp", share["target"]),
                                                               ("cnn", cnn_share["target"])} | (
        set(with_pytorch) if HAS_TORCH else set()) | reproducible


def test_the_json_header_names_the_cpu_the_libraries_and_the_settings_of_the_run(tiny_run):
    result, out = tiny_run
    header = result["header"]
    assert header["cpu"] and f"machine: {header['cpu']}" in out
    assert set(header["cpu_flags"]) == HEADER_FLAGS & environment.cpu_flags()
    assert header["cores"] >= 1 and header["memory_gib"] > 0
    assert header["python"] == platform.python_version() and header["numpy"] == np.__version__
    if HAS_TORCH:
        assert header["pytorch"] == importlib.metadata.version("torch")
        assert header["pytorch_rows"] == "run"
    else:
        assert header["pytorch"] is None and header["pytorch_rows"] == "skipped (not installed)"
    assert header["gemm"]["asked"] == "auto" and header["gemm"]["library"] in ("numpy", "mkl")
    assert header["gemm"]["description"]
    assert header["isa"] == "native" and header["isa_environment"] == {}
    assert (header["model"], header["batch_sizes"], header["ranks"]) == (model_spec(), [BATCH], 2)
    assert header["thread_budget"] == header["cores"]
    # Each side says which libraries it ran with.
    assert all(r["blas"] for r in result["gemm"]["rounds"][0].values() if isinstance(r, dict))
    for run in runs_of(result["rows"], "ddpP"):   # the MPI library's own description, the BLAS's
        assert run["library"].strip() and run["vector_code"], run
        assert not run["blas"].startswith("unknown BLAS"), run["blas"]
    if HAS_TORCH:
        for run in runs_of(result["rows"], "torchP"):
            assert run["library"] == f"torch {header['pytorch']} DDP gloo"


def test_the_ddptrain_rows_report_their_exchange_profile_memory_and_end_to_end_times(tiny_run):
    rows = tiny_run[0]["rows"]
    # Two ranks on one host exchange the gradient through shared memory unless told otherwise.
    assert "gradient exchange (shared memory)" in runs_of(rows, "ddpP")[0]["profile_ms"]
    assert "gradient Allreduce" in runs_of(rows, "ddpPa")[0]["profile_ms"]
    for name, row in rows.items():
        for run in row["runs"]:
            assert all(0 <= share < 1 for share in run.get("allreduce_fraction", [])), name
            assert all(mib > 0 for mib in run["max_rss_mib"]), name
    # Sharded (through node memory or ZeRO-1), each of 2 ranks keeps half the momentum.
    whole = max(runs_of(rows, "ddpPa")[0]["optimizer_bytes"])
    for sharded in ("ddpP", "ddpPz"):
        half = max(runs_of(rows, sharded)[0]["optimizer_bytes"])
        assert half == pytest.approx(whole / 2, rel=0.01), sharded
    # BN with global statistics makes Allreduces of its own; with local statistics, none.
    assert all(share > 0 for share in runs_of(rows, "ddpPbn")[0]["batchnorm_allreduce_fraction"])
    assert all(share == 0 for share in runs_of(rows, "ddpPbnl")[0]["batchnorm_allreduce_fraction"])
    end_to_end = runs_of(rows, "ddpP")[0]
    assert end_to_end["n_train"] == 240 and end_to_end["load_seconds"] >= 0
    assert end_to_end["eval_seconds"] > 0 and end_to_end["checkpoint_seconds"] > 0
    assert runs_of(rows, "cnn1")[0]["n_params"] == 694   # conv 36 (no bias before BN), BN 8, 650


def test_the_printed_table_shows_each_row_of_the_json_with_its_median_and_ratio(tiny_run):
    result, out = tiny_run
    for name, row in result["rows"].items():
        line = next(line for line in out.splitlines()
                    if line.startswith(f"{BATCH:>12}  {row['label']:<38} "))
        assert f"{row['summary']['median']:,.0f} (" in line, (name, line)
        if row["vs_pytorch"]:
            assert f"{row['vs_pytorch']['ratio']:.2f}x" in line, (name, line)


def test_without_pytorch_the_json_has_only_ddptrain_rows_and_its_header_says_why(tmp_path):
    result, out = run_benchmark(tmp_path, "--quick", "--no-torch", "--data", "random", "--no-bn",
                                "--no-cnn", "--no-hosts")
    header = result["header"]
    assert header["pytorch"] is None
    why = "--no-torch" if HAS_TORCH else "not installed"
    assert header["pytorch_rows"] == f"skipped ({why})"
    assert {name.split("@")[0] for name in result["rows"]} == {"ddp1", "ddpP", "ddpP0", "ddpPa",
                                                               "ddpPz", "ddpPo", "ddp1r",
                                                               "ddpPr"} | (
        {"ddp1n", "ddpPn"} if header["gemm"]["library"] == "mkl" else set())
    assert all(row["vs_pytorch"] is None for row in result["rows"].values())
    assert "(the PyTorch comparisons need PyTorch: pip install torch==2.13.0)" in out


def test_the_streamed_row_trains_a_run_s_epochs_from_windows_against_its_twin_in_memory(tmp_path):
    chunked = helpers.make_chunked_dataset(tmp_path / "chunked.h5", chunk_rows=4)
    result, out = run_benchmark(tmp_path, "--quick", "--data", chunked, "--model", model_spec(),
                                "--no-bn", "--no-cnn", "--no-hosts", "--no-torch",
                                "--stream-memory", "7K", "--read-file-mib", "0.1")
    row = result["rows"]["ddpPs@32"]
    run = row["runs"][0]
    assert run["data_line"].startswith("data: streamed (--data-memory): each rank holds 2 windows "
                                       "of 1 block(s) of 4 rows")
    assert run["stream_waited"] >= 0 and len(run["memory_rates"]) == len(run["rates"]) == 2
    ratio = statistics.median(row["rates"]) / statistics.median(run["memory_rates"])
    assert f"streamed shards, 2 ranks, batch 32: {ratio:.2f}x the step rate" in out
    reads = result["stream_reads"]
    # the file the reads measure: the data's training rows repeated to --read-file-mib
    assert reads["file"] == "4 copies of the training rows of chunked.h5"   # of 30 KiB
    assert reads["file_bytes"] > 0.1 * 2 ** 20
    assert reads["file_bytes"] > 0 and all(rate > 0 for key in ("disk_mib_s", "load_mib_s",
                                                                "stream_mib_s")
                                           for rate in reads[key])
    disk, stream = next(v for v in result["targets"] if v["group"] == "stream"
                        and "disk" in v["target"]), statistics.median(reads["stream_mib_s"])
    assert disk["value"] == pytest.approx(stream / statistics.median(reads["disk_mib_s"]))


@pytest.mark.skipif("avx2" not in environment.cpu_flags(),
                    reason="--isa avx2 needs an x86-64 CPU with AVX2")
def test_the_benchmark_can_hold_every_library_to_avx2_and_the_json_shows_the_code_each_side_ran(
        tmp_path):
    result, out = run_benchmark(tmp_path, "--quick", "--isa", "avx2", "--data", "random", "--no-bn",
                                "--no-cnn", "--no-hosts")
    header = result["header"]
    assert header["isa"] == "avx2"
    assert header["isa_environment"]["OPENBLAS_CORETYPE"] == "Haswell"
    assert header["isa_environment"]["ATEN_CPU_CAPABILITY"] == "avx2"
    # --quick's settings
    assert (header["rounds"], header["repeats"], header["samples"]) == (1, 2, 256)
    assert header["batch_sizes"] == [32]
    assert "targets of the MLP (on this CPU, its vector code limited to AVX2):" in out
    # What the workers report they ran, not what was asked: on an AVX-512 CPU each would say more
    # unlimited.
    for name, row in result["rows"].items():
        for run in row["runs"]:
            if name.startswith("torch"):
                assert run["vector_code"] == "ATen kernels AVX2", name
                continue
            parts = dict(part.rsplit(" ", 1) for part in run["vector_code"].split(", "))
            assert "512" not in parts["numpy's loops"] and parts["numpy's loops"] != "X86_V4", name
            assert parts["openblas kernel"] == "Haswell", name
            assert parts.get("MKL kernels", "AVX2") == "AVX2", name
    assert HAS_TORCH == ("torch1@32" in result["rows"])


def test_the_benchmark_help_says_how_to_get_pytorch():
    proc = subprocess.run([sys.executable, "scripts/benchmark.py", "--help"], capture_output=True,
                          text=True, timeout=60, cwd=helpers.ROOT, check=False)
    assert proc.returncode == 0
    assert "pip install torch==2.13.0" in proc.stdout


def test_the_pytorch_recipe_is_the_named_model_s_spec_and_training_defaults():
    recipe = importlib.import_module("bench.torch_recipe")
    from ddptrain.nn.spec import NAMED_MODELS
    spec, options = recipe.recipe("cnn-fast")
    named = NAMED_MODELS["cnn-fast"]
    assert spec == named.spec
    assert {name: getattr(options, name) for name in named.defaults} == named.defaults
    assert (options.epochs, options.batch_size, options.lr, options.warmup_epochs,
            options.nesterov) == (4, 128, 0.2, 1, True)


def test_a_recipe_s_time_to_accuracy_is_timed_on_both_sides_and_judged_from_the_medians(
        tmp_path):
    accuracy_runs = importlib.import_module("bench.accuracy_runs")
    targets = importlib.import_module("bench.targets")
    data = helpers.make_dataset(tmp_path / "images.h5", n_train=256, n_test=64, side=28)
    opts = type("Options", (), dict(no_recipe=False, no_tta=False, data=data, recipe="cnn-fast",
                                    recipe_target=5.0, recipe_seeds="0,1", threads=0, cores=2))
    recipe = accuracy_runs.recipe_runs(opts, 2, HAS_TORCH)
    sides = ("ddptrain", "pytorch", "pytorch_one") if HAS_TORCH else ("ddptrain",)
    for side in sides:
        runs = recipe[side]
        assert len(runs) == 2 and all(len(run["epochs"]) == 4 for run in runs)
        # 5% is reached at the first epoch's line, timed from the launch
        assert all(run["seconds_to_target"] == run["epochs"][0]["at_seconds"]
                   < run["total_seconds"] for run in runs)
        assert recipe[f"{side}_median_seconds"] == statistics.median(
            run["seconds_to_target"] for run in runs)
    assert "--model cnn-fast --seed 1 --quiet" in recipe["ddptrain"][1]["command"]
    verdicts = targets.recipe_verdicts(recipe)
    assert verdicts[0].value == recipe["ddptrain_median_seconds"]
    assert verdicts[0].met == (verdicts[0].value <= 60)
    if HAS_TORCH:
        assert "mpiexec" in recipe["pytorch"][0]["command"]
        assert "mpiexec" not in recipe["pytorch_one"][0]["command"]
        ours = recipe["ddptrain_median_seconds"]
        for verdict, side in zip(verdicts[1:], ("pytorch", "pytorch_one"), strict=True):
            theirs = recipe[f"{side}_median_seconds"]
            assert verdict.value == pytest.approx(ours / theirs)
            assert verdict.met == (ours <= theirs)
    else:
        assert recipe["pytorch"] is None and recipe["pytorch_one"] is None and len(verdicts) == 1
