"""--profile STEPS: a timeline of the steps on every rank, as one Chrome trace in the run folder.

What it promises: one process per rank, the parts of a step as nested spans, exactly STEPS steps
after the first, the ranks on one time axis (a late rank shows as the others' wait for it), no
change to what is trained, nothing left wrapped afterwards, the timelines of earlier attempts kept,
and `ddptrain info RUN_DIR` summarising the share of the step per phase per rank.
"""

import errno
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

import ddptrain
from ddptrain import cli, commands
from ddptrain.distributed.clocks import Offset, clock_offsets
from ddptrain.errors import EXIT_USAGE, UserError
from ddptrain.nn.model import Sequential
from ddptrain.run import rank0
from ddptrain.training.trace import build_trace, format_phases, phase_shares
from ddptrain.training.trainer import Callback
from helpers import final_params, in_process, on_simulated_ranks, run

BN_MODEL = "64-16-bn-10"   # fits the 8x8 images of small_data; BatchNorm adds its collectives
# 240 rows in global batches of 32: 8 steps an epoch, so a window of steps 1 to 10 holds the end
# of the first epoch (its evaluation and checkpoint)
OPTIONS = dict(epochs=2, batch_size=32, threads=1, quiet=True)


def profiled(small_data, run_dir, model=BN_MODEL, **options):
    """Train on 2 simulated ranks with ``options`` (profile=10 unless given); the trace."""
    ddptrain.train(model, data=small_data, run_dir=str(run_dir), simulate_ranks=2,
                   **{"profile": 10, **OPTIONS, **options})
    return json.loads((run_dir / "timeline.json").read_text())


def spans(trace, rank=None):
    return [e for e in trace["traceEvents"]
            if e["ph"] == "X" and (rank is None or e["pid"] == rank)]


def steps_of(trace, rank):
    return [e["args"]["step"] for e in spans(trace, rank) if e["cat"] == "step"]


@pytest.fixture(scope="module")
def trace(small_data, tmp_path_factory):
    return profiled(small_data, tmp_path_factory.mktemp("profiled") / "run")


# ---------------------------------------------------------------- the file


def test_the_timeline_is_a_chrome_trace_with_one_named_process_per_rank(trace):
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"]
             if e["ph"] == "M" and e["name"] == "process_name"}
    assert sorted(names) == [0, 1]
    assert names[0].startswith("rank 0 (") and names[1].startswith("rank 1 (")
    for event in spans(trace):
        assert {"name", "cat", "ts", "dur", "pid", "tid"} <= set(event)
        assert event["dur"] >= 0 and event["ts"] >= 0 and event["tid"] == 0
    assert trace["displayTimeUnit"] == "ms"


def test_exactly_the_steps_asked_for_are_recorded_starting_after_the_first(trace):
    """Step 0 (work arrays allocated, caches cold) is not profiled; steps 1 to 10 are, on every
    rank."""
    assert steps_of(trace, 0) == steps_of(trace, 1) == list(range(1, 11))
    assert trace["otherData"]["steps"] == [1, 10]


def test_every_part_of_a_step_has_its_span(trace):
    names = {e["name"] for e in spans(trace, 0)}
    assert {"gather", "forward", "forward linear1", "forward batchnorm1", "forward linear2",
            "loss", "loss gradient", "backward", "backward linear2", "backward batchnorm1",
            "backward linear1", "batchnorm1 allreduce", "exchange", "totals", "update",
            "publish", "evaluation", "checkpoint"} <= names
    assert any(name.startswith("wait for rank") for name in {e["name"] for e in spans(trace)})
    # two BatchNorm collectives a step: the statistics forward, the two sums backward
    assert sum(e["name"] == "batchnorm1 allreduce" for e in spans(trace, 0)) == 2 * 10


def test_spans_nest_within_their_step_and_within_each_other(trace):
    for rank in (0, 1):
        events = sorted(spans(trace, rank), key=lambda e: (e["ts"], -e["dur"]))
        stack = []
        for event in events:
            end = event["ts"] + event["dur"]
            while stack and stack[-1][1] <= event["ts"] + 1e-6:
                stack.pop()
            if event["cat"] == "step":
                assert not stack, f"step {event['args']['step']} inside another span"
            else:
                assert stack, f"{event['name']} outside every step"
                assert end <= stack[-1][1] + 2e-3, f"{event['name']} overlaps its parent"
                assert event["args"]["step"] == stack[0][2]
            stack.append((event["ts"], end, event["args"]["step"]))


def test_a_layer_span_lies_inside_the_pass_it_belongs_to(trace):
    events = spans(trace, 1)
    passes = [e for e in events if e["name"] in ("forward", "backward")]
    for layer in (e for e in events if e["name"].startswith(("forward ", "backward "))):
        kind = layer["name"].split()[0]
        assert any(p["name"] == kind and p["ts"] <= layer["ts"]
                   and layer["ts"] + layer["dur"] <= p["ts"] + p["dur"] + 2e-3 for p in passes
                   if p["args"]["step"] == layer["args"]["step"]), layer


def test_the_file_states_its_clocks_and_what_recording_cost(trace):
    about = trace["otherData"]
    assert about["ranks"] == 2 and len(about["hosts"]) == 2
    assert len(about["clock"]["offset_us"]) == 2 and about["clock"]["uncertainty_us_max"] >= 0
    assert 0 < about["overhead"]["per_span_us"] < 100
    assert about["overhead"]["spans_per_step"] > 20
    assert about["config"]["profile"] == 10 and about["model"] == BN_MODEL


# ---------------------------------------------------------------- what it changes: nothing


@pytest.mark.parametrize("options", [{}, {"overlap_allreduce": True}, {"shard_optimizer": True},
                                     {"exchange": "allreduce"}],
                         ids=["shared-memory", "overlap", "sharded", "allreduce"])
def test_a_profiled_run_trains_bitwise_the_parameters_of_one_without(small_data, tmp_path,
                                                                     options):
    models = []
    for profile in (0, 6):
        model = Sequential.from_spec(BN_MODEL, seed=3)
        ddptrain.train(model, data=small_data, run_dir=str(tmp_path / f"run{profile}"),
                       simulate_ranks=2, profile=profile, **OPTIONS, **options)
        models.append(model)
    np.testing.assert_array_equal(models[0].params, models[1].params)
    np.testing.assert_array_equal(models[0].buffers, models[1].buffers)
    assert (tmp_path / "run6" / "timeline.json").is_file()
    assert not (tmp_path / "run0" / "timeline.json").exists()


def test_nothing_stays_wrapped_after_the_window(small_data, tmp_path):
    model = Sequential.from_spec(BN_MODEL)
    ddptrain.train(model, data=small_data, run_dir=str(tmp_path / "run"), simulate_ranks=2,
                   profile=3, **OPTIONS)
    assert_nothing_wrapped(model)


def assert_nothing_wrapped(model):
    """The model's passes and layers are their classes' again; BatchNorm sums with what the run
    handed the model."""
    assert not {"forward", "backward"} & set(vars(model))
    for layer in model.layers:
        assert not {"forward", "backward"} & set(vars(layer)), layer.name
        if "sum_over_ranks" in vars(layer):
            assert layer.sum_over_ranks == model.sum_over_ranks, layer.name


def test_a_run_that_fails_inside_the_window_leaves_nothing_wrapped(small_data, tmp_path):
    class Failing(Callback):
        def on_step_start(self, trainer):
            if trainer.position.step == 3:
                raise RuntimeError("injected")

    model = Sequential.from_spec(BN_MODEL)
    with pytest.raises(RuntimeError, match="injected"):
        ddptrain.train(model, data=small_data, run_dir=str(tmp_path / "run"), profile=5,
                       callbacks=[Failing()], **OPTIONS)
    assert_nothing_wrapped(model)
    assert not (tmp_path / "run" / "timeline.json").exists()


def test_a_callback_that_every_simulated_rank_shares_is_left_as_it_was(small_data, tmp_path):
    class Counting(Callback):
        calls = 0

        def on_step_end(self, trainer, end):
            type(self).calls += 1

    counting = Counting()
    ddptrain.train(BN_MODEL, data=small_data, run_dir=str(tmp_path / "run"), simulate_ranks=2,
                   profile=3, callbacks=[counting], **OPTIONS)
    assert vars(counting) == {} and Counting.calls == 2 * 16   # each rank's 16 steps, once each


# ---------------------------------------------------------------- the ranks on one time axis


CNN_MODEL = "conv4k3-bn-maxpool2-flatten-10"   # convolutions: one process trains on row threads


def test_each_row_thread_has_a_track_of_its_own_and_the_summary_stays_the_steps_thread(
        small_data, tmp_path):
    """One process with 2 row threads: thread 1's replica shows the same layers as thread 0, in
    thread 1's track and inside the steps; the share of the step is thread 0's alone; nothing of
    a replica stays wrapped after the window."""
    replicas_after = []

    class LookAfterTheWindow(Callback):
        def on_step_start(self, trainer):
            if trainer.position.step == 6:
                replicas_after.extend(model for model, _ in trainer.train_step.thread_replicas)

    ddptrain.train(CNN_MODEL, data=small_data, run_dir=str(tmp_path / "run"), profile=4,
                   callbacks=[LookAfterTheWindow()], **{**OPTIONS, "threads": 2})
    trace = json.loads((tmp_path / "run" / "timeline.json").read_text())
    threads = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"]
               if e["ph"] == "M" and e["name"] == "thread_name"}
    assert threads == {0: "training", 1: "row thread 1"}
    passes = {0: set(), 1: set()}
    for event in spans(trace, 0):
        if event["cat"] in ("forward", "backward", "loss"):
            passes[event["tid"]].add(event["name"])
    assert "forward conv2d1" in passes[0] and "backward batchnorm1" in passes[0]
    assert passes[1] == passes[0]
    steps = [e for e in spans(trace, 0) if e["cat"] == "step"]
    for event in (e for e in spans(trace, 0) if e["tid"] == 1):
        assert any(step["ts"] <= event["ts"] and event["ts"] + event["dur"]
                   <= step["ts"] + step["dur"] + 2e-3 for step in steps), event
    # the threads' BatchNorm sums: once forward, once backward, a step
    assert sum(e["name"] == "batchnorm allreduce" for e in spans(trace, 0)) == 2 * 4
    steps_thread = {**trace, "traceEvents": [e for e in trace["traceEvents"] if e.get("tid") != 1]}
    assert phase_shares(trace) == phase_shares(steps_thread)
    assert trace["otherData"]["threads"] == 2
    assert ("steps 1 to 4 on 1 rank(s) x 2 threads (the shares below: thread 0's)"
            in "\n".join(commands.run_lines(tmp_path / "run")))
    assert len(replicas_after) == 1
    assert_nothing_wrapped(replicas_after[0])


def test_a_rank_that_arrives_late_shows_as_the_others_waiting_for_it(small_data, tmp_path):
    """Rank 1 sleeps 20 ms before each step: rank 0 waits about that long for it in the step's
    first collective, and rank 1 waits for nobody."""
    class LateRankOne(Callback):
        def on_step_start(self, trainer):
            if trainer.comm.rank == 1:
                time.sleep(0.02)

    trace = profiled(small_data, tmp_path / "run", callbacks=[LateRankOne()], profile=5)
    waited = {rank: sum(e["dur"] for e in spans(trace, rank) if e["cat"] == "wait") / 1e3
              for rank in (0, 1)}
    assert waited[0] > 5 * 15 and waited[1] < 5 * 5, waited   # ms over 5 steps
    first_waits = [e for e in spans(trace, 0) if e["cat"] == "wait"]
    assert all(e["name"] == "wait for rank 1" for e in first_waits)
    shares = phase_shares(trace)
    assert shares[0][2]["wait"] > 0.5 * shares[0][1]


def test_clock_offsets_measure_a_clock_that_runs_ahead_within_their_stated_uncertainty():
    ahead = 5_000_000_000   # rank 2's clock reads 5 s more than the others'

    def measure(comm):
        clock = (lambda: time.perf_counter_ns() + ahead) if comm.rank == 2 else time.perf_counter_ns
        return clock_offsets(comm, clock)

    offsets = on_simulated_ranks(3, measure)[0]
    assert offsets[0] == Offset(0, 0)
    for rank, expected in ((1, 0), (2, ahead)):
        assert abs(offsets[rank].offset - expected) <= offsets[rank].uncertainty
        assert offsets[rank].uncertainty < 50_000_000


def test_the_trace_puts_a_rank_whose_clock_runs_ahead_on_rank_0s_time_axis():
    """Two ranks run the same step at the same moment; rank 1's clock reads 7 s more, and drifts
    2 us over the window. Aligned, their spans coincide."""
    ahead, drift = 7_000_000_000, 2_000

    def record(shift, host):
        return {"host": host, "clock": (1_000 + shift, 101_000 + shift), "span_cost_ns": 300,
                "spans": [("exchange", "exchange", 40_000 + shift, 60_000 + shift, True, 0)],
                "steps": [(1, 10_000 + shift, 90_000 + shift, 0, 1)]}

    trace = build_trace([record(0, "a"), record(ahead, "b")], [Offset(0, 0), Offset(ahead, 100)],
                        [Offset(0, 0), Offset(ahead + drift, 100)])
    steps = {e["pid"]: e for e in spans(trace) if e["cat"] == "step"}
    assert steps[0]["ts"] == pytest.approx(9.0) and steps[1]["ts"] == pytest.approx(9.0 - 0.18)
    assert trace["otherData"]["clock"]["drift_us"] == [0, 2.0]
    assert trace["otherData"]["clock"]["uncertainty_us"] == [0, 0.1]


# ---------------------------------------------------------------- the summary


def test_the_summary_gives_each_phase_its_own_time_as_a_share_of_the_step():
    """A 100 us step: forward 10..40 holding a 10 us BatchNorm sum, which holds a 4 us wait."""
    def x(name, cat, ts, dur):
        return {"name": name, "cat": cat, "ph": "X", "ts": ts, "dur": dur, "pid": 0, "tid": 0}

    trace = {"traceEvents": [x("step 1", "step", 0, 100), x("forward", "forward", 10, 30),
                             x("bn1 allreduce", "batchnorm", 20, 10), x("wait", "wait", 20, 4)]}
    steps, seconds, phases = phase_shares(trace)[0]
    assert steps == 1 and seconds == pytest.approx(100e-6)
    assert phases["forward"] == pytest.approx(20e-6) and phases["batchnorm"] == pytest.approx(6e-6)
    assert phases["wait"] == pytest.approx(4e-6) and phases["other"] == pytest.approx(70e-6)
    assert format_phases(trace) == ["  share of the step    rank 0",
                                    "  forward               20.0%",
                                    "  batchnorm              6.0%",
                                    "  wait                   4.0%",
                                    "  other                 70.0%",
                                    "  ms per step            0.10"]


def test_info_prints_what_the_run_folder_holds_and_the_share_of_the_step_per_rank(small_data,
                                                                                 tmp_path):
    profiled(small_data, tmp_path / "run")
    lines = commands.run_lines(tmp_path / "run")
    text = "\n".join(lines)
    assert f"model {BN_MODEL}" in text and "newest step-00000016.h5" in text
    assert "2 epochs: test accuracy" in text and "steps 1 to 10 on 2 rank(s)," in text
    table = lines[lines.index(next(line for line in lines if "share of the step" in line)):]
    assert table[0].split()[-2:] == ["rank", "1"]
    rows = {line.split()[0]: line.split()[1:] for line in table[1:-1]}
    assert {"forward", "backward", "batchnorm", "exchange", "update", "checkpoint"} <= set(rows)
    for rank in (0, 1):
        assert sum(float(row[rank].rstrip("%")) for row in rows.values()) == pytest.approx(100,
                                                                                         abs=0.5)


def test_info_of_a_run_without_a_timeline_says_how_to_record_one(small_data, tmp_path):
    ddptrain.train(BN_MODEL, data=small_data, run_dir=str(tmp_path / "run"), **OPTIONS)
    lines = commands.run_lines(tmp_path / "run")
    assert lines[-1] == "timeline     none (train with --profile STEPS to record one)"


def test_info_of_a_folder_without_a_run_says_so(tmp_path):
    with pytest.raises(UserError, match="no config.json: not a ddptrain run folder"):
        commands.run_lines(tmp_path)


# ---------------------------------------------------------------- windows and attempts


def test_a_run_shorter_than_the_window_writes_the_steps_it_ran(small_data, tmp_path):
    trace = profiled(small_data, tmp_path / "run", profile=100)
    assert steps_of(trace, 0) == list(range(1, 16))   # 16 steps: all but the first


def test_a_resumed_run_writes_a_new_timeline_and_keeps_the_old_one(small_data, tmp_path):
    first = profiled(small_data, tmp_path / "run", epochs=1, profile=3)
    before = (tmp_path / "run" / "timeline.json").read_bytes()
    ddptrain.train(BN_MODEL, data=small_data, run_dir=str(tmp_path / "run"), simulate_ranks=2,
                   resume="auto", **{**OPTIONS, "profile": 3})
    assert (tmp_path / "run" / "timeline.json").read_bytes() == before
    second = json.loads((tmp_path / "run" / "timeline-2.json").read_text())
    assert steps_of(first, 0) == [1, 2, 3] and steps_of(second, 0) == [9, 10, 11]
    assert "earlier attempts' timelines: timeline.json" in "\n".join(
        commands.run_lines(tmp_path / "run"))


def test_a_timeline_that_cannot_be_written_is_a_warning_and_the_run_goes_on(small_data, tmp_path,
                                                                             monkeypatch, capsys):
    written = rank0.write_atomically

    def full_disk_for_timelines(path, content):
        if Path(path).name.startswith("timeline"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written(path, content)

    monkeypatch.setattr(rank0, "write_atomically", full_disk_for_timelines)
    result = ddptrain.train(BN_MODEL, data=small_data, run_dir=str(tmp_path / "run"), profile=3,
                            **OPTIONS)
    assert result.exit_status == 0 and result.epochs == 2
    assert "warning: could not write the timeline" in capsys.readouterr().err
    assert not list((tmp_path / "run").glob("*timeline*"))


# ---------------------------------------------------------------- the option


@pytest.mark.parametrize("options, message", [
    (["--profile", "-1"], "--profile must not be negative, got -1"),
    (["--profile", "10001"], "--profile must be at most 10,000 steps, got 10001"),
    (["--profile", "two"], "argument --profile: invalid int value: 'two'"),
])
def test_bad_profile_values_are_refused_in_one_line_by_a_dry_run(small_data, tmp_path, capsys,
                                                                 options, message):
    status, lines = in_process(["--data", small_data, "--run-dir", tmp_path / "run", *options,
                                "--dry-run"], capsys)
    assert status == EXIT_USAGE and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_the_profile_is_an_option_of_configuration_files_and_of_the_python_api(small_data,
                                                                              tmp_path):
    (tmp_path / "run.toml").write_text("profile = 4\n")
    assert cli.config_from_args(cli.parse(["--config", str(tmp_path / "run.toml")])).profile == 4
    (tmp_path / "bad.toml").write_text("profile = true\n")
    with pytest.raises(UserError, match="--profile must be int, got True"):
        cli.config_from_args(cli.parse(["--config", str(tmp_path / "bad.toml")]))
    with pytest.raises(UserError, match="--profile must be int, got '4'"):
        ddptrain.train(BN_MODEL, data=small_data, profile="4", dry_run=True)


# ---------------------------------------------------------------- under mpiexec


@pytest.mark.slow
def test_two_mpi_ranks_one_of_them_late_give_a_timeline_that_shows_the_wait(small_data,
                                                                            tmp_path):
    args = ["--data", small_data, "--model", BN_MODEL, "--epochs", "2", "--batch-size", "32",
            "--threads", "1", "--quiet"]
    late = run([*args, "--profile", "6", "--run-dir", tmp_path / "late"], ranks=2,
               faults="delay:seconds=0.02:rank=1")
    assert late.returncode == 0, late.stderr
    assert "timeline of steps 1 to 6 on 2 rank(s) written to" in late.stdout
    plain = run([*args, "--run-dir", tmp_path / "plain"], ranks=2)
    assert plain.returncode == 0, plain.stderr
    np.testing.assert_array_equal(final_params(tmp_path / "late"), final_params(tmp_path / "plain"))

    info = run(["info", tmp_path / "late"])
    assert info.returncode == 0, info.stderr
    rows = {line.split()[0]: line.split()[1:] for line in info.stdout.splitlines()
            if line.startswith("  ") and "%" in line}
    assert float(rows["wait"][0].rstrip("%")) > 50 > float(rows["wait"][1].rstrip("%"))
    trace = json.loads((tmp_path / "late" / "timeline.json").read_text())
    assert trace["otherData"]["hosts"][0] == trace["otherData"]["hosts"][1]
    assert steps_of(trace, 0) == steps_of(trace, 1) == list(range(1, 7))
