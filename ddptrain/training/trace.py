"""The timeline as a Chrome trace (the Trace Event Format that Perfetto and ``chrome://tracing``
open), and its summary: each rank's share of the step per phase.

``build_trace`` takes what every rank recorded (``profiler.py``) and puts it
on rank 0's time axis: each rank's clock readings are corrected by its
offset from rank 0's clock, measured at both ends of the window and
interpolated in between (``distributed/clocks.py``). Every span is a
complete event (``"ph": "X"``, ``ts`` and ``dur`` in microseconds) of the
process of its rank (``pid``: the rank) and of the thread that ran it
(``tid`` 0: the one that runs the step; with row threads, ``tid`` T: the
layers of row thread T's replica, which run beside thread 0's).

A collective cannot end on any rank before the last rank has entered it, so
the time a rank spends in one before the last rank arrives is time spent
waiting for that rank: each collective of a step (the gradient exchange, the
step's totals, BatchNorm's sums) gets a ``wait for rank R`` event inside it,
from this rank's arrival to the last rank's (or to its end, if sooner). It
is derived from the aligned clocks, within their uncertainty, and costs no
extra collective.
"""

from __future__ import annotations

import json

from ddptrain.distributed.clocks import Offset
from ddptrain.errors import UserError
from ddptrain.files import open_regular

# The phases of the summary, in the order of a step; "other" is a step's time outside every span.
PHASES = ("gather", "forward", "loss", "backward", "batchnorm", "exchange", "totals", "wait",
          "update", "callbacks", "evaluation", "checkpoint", "other")
MAX_TIMELINE_BYTES = 2 ** 31   # a larger file is not a timeline of at most MAX_PROFILE_STEPS steps


def _aligner(opened, closed, clock_at):
    """Rank 0's time, in ns, of a reading of this rank's clock: offsets ``opened`` and ``closed``
    (``clocks.Offset``) measured at this rank's readings ``clock_at``, interpolated in between."""
    start, span = clock_at[0], max(clock_at[1] - clock_at[0], 1)
    drift = closed.offset - opened.offset

    def aligned(t):
        return t - opened.offset - drift * (t - start) // span
    return aligned


def _event(name, category, rank, start, stop, thread=0, **args):
    ts = round(start / 1000, 3)   # start and stop rounded alike: nested events stay nested
    return {"name": name, "cat": category, "ph": "X", "ts": ts,
            "dur": round(round(stop / 1000, 3) - ts, 3), "pid": rank, "tid": thread, "args": args}


def _thread_name(rank, thread):
    return {"name": "thread_name", "ph": "M", "pid": rank, "tid": thread,
            "args": {"name": "training" if thread == 0 else f"row thread {thread}"}}


def build_trace(ranks, opened, closed, about=None):
    """The trace of ``ranks`` (each rank's record: host, spans, steps, clock readings, span cost)
    with rank 0's clock offsets ``opened`` and ``closed``; ``about``: the run's description."""
    hosts = [rank["host"] for rank in ranks]
    one_host = len(set(hosts)) == 1
    events, collectives, aligners = [], {}, []
    for r, rank in enumerate(ranks):
        if one_host and all(abs(o.offset) <= o.uncertainty for o in (opened[r], closed[r])):
            opened[r] = closed[r] = Offset(0, 0)   # one host, one clock
        aligners.append(_aligner(opened[r], closed[r], rank["clock"]))
    # time 0: the first moment of the window on any rank
    origin = min(aligned(min([rank["clock"][0]] + [start for _, start, *_ in rank["steps"]]))
                 for aligned, rank in zip(aligners, ranks))
    for r, (rank, aligned) in enumerate(zip(ranks, aligners)):
        events += [{"name": "process_name", "ph": "M", "pid": r,
                    "args": {"name": f"rank {r} ({rank['host']})"}},
                   {"name": "process_sort_index", "ph": "M", "pid": r, "args": {"sort_index": r}}]
        spans = rank["spans"]
        events += [_thread_name(r, thread)
                   for thread in sorted({0} | {span[5] for span in spans})]
        for step, start, stop, first, end in rank["steps"]:
            events.append(_event(f"step {step}", "step", r, aligned(start) - origin,
                                 aligned(stop) - origin, step=step))
            mine = []
            for name, category, a, b, collective, thread in spans[first:end]:
                event = _event(name, category, r, aligned(a) - origin, aligned(b) - origin,
                               thread, step=step)
                events.append(event)
                if collective:
                    mine.append(event)
            collectives[(step, r)] = sorted(mine, key=lambda event: event["ts"])
    events += _waits(collectives, len(ranks))
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": _about(ranks, opened, closed, about)}


def _waits(collectives, size):
    """A ``wait for rank R`` event inside each collective of each step on each rank that entered it
    before the last rank did."""
    waits = []
    for step in sorted({step for step, _ in collectives}):
        per_rank = [collectives.get((step, r), []) for r in range(size)]
        if size < 2 or len({len(calls) for calls in per_rank}) != 1:
            continue   # the ranks did not record the same collectives: nothing to pair
        for calls in zip(*per_rank):
            last = max(range(size), key=lambda r: calls[r]["ts"])
            arrival = calls[last]["ts"]
            for r, call in enumerate(calls):
                end = min(arrival, round(call["ts"] + call["dur"], 3))
                if end > call["ts"]:
                    waits.append({"name": f"wait for rank {last}", "cat": "wait", "ph": "X",
                                  "ts": call["ts"], "dur": round(end - call["ts"], 3), "pid": r,
                                  "tid": 0, "args": {"step": step, "in": call["name"]}})
    return waits


def _about(ranks, opened, closed, about):
    """The trace's ``otherData``: the run, the window, the clocks and what recording cost."""
    steps = [step for step, *_ in ranks[0]["steps"]]
    step_us = [(stop - start) / 1000 for rank in ranks for _, start, stop, *_ in rank["steps"]]
    spans_per_step = sum(len(rank["spans"]) for rank in ranks) / max(len(step_us), 1)
    span_us = max(rank["span_cost_ns"] for rank in ranks) / 1000
    uncertainty = [max(a.uncertainty, b.uncertainty) / 1000 for a, b in zip(opened, closed)]
    mean_step = sum(step_us) / max(len(step_us), 1)
    threads = max((len({0} | {span[5] for span in rank["spans"]}) for rank in ranks), default=1)
    return {
        **(about or {}),
        "ranks": len(ranks), "hosts": [rank["host"] for rank in ranks],
        "threads": threads,   # the most tracks a rank has (row threads)
        "steps": [steps[0], steps[-1]] if steps else [],
        "clock": {
            "source": "time.perf_counter_ns (CLOCK_MONOTONIC) on each rank",
            "alignment": "each rank's offset from rank 0's clock, bounded by a broadcast from rank "
                         "0 and an allgather back (8 rounds, intervals intersected) at both ends "
                         "of the window, interpolated in between; ranks on one host share one "
                         "clock (offset 0) when the measurement allows it",
            "offset_us": [round(o.offset / 1000, 3) for o in opened],
            "drift_us": [round((b.offset - a.offset) / 1000, 3) for a, b in zip(opened, closed)],
            "uncertainty_us": [round(u, 3) for u in uncertainty],
            "uncertainty_us_max": round(max(uncertainty), 3),
        },
        "waits": "derived: a rank's time in a collective before the last rank entered it, on the "
                 "aligned clocks (within their uncertainty); no collective was added",
        "overhead": {"per_span_us": round(span_us, 3), "spans_per_step": round(spans_per_step, 1),
                     "per_step_us": round(span_us * spans_per_step, 1),
                     "share_of_step": round(span_us * spans_per_step / mean_step, 5)
                     if mean_step else None},
    }


# ---------------------------------------------------------------- the summary


def read_trace(path):
    """The trace of a timeline file; a UserError naming it if it is not one."""
    with open_regular(path, "timeline", missing="no such file") as f:
        content = f.read(MAX_TIMELINE_BYTES + 1)
    try:
        trace = json.loads(content)
    except (ValueError, RecursionError):
        raise UserError(f"{path}: not a timeline (not JSON)") from None
    if not isinstance(trace, dict) or not isinstance(trace.get("traceEvents"), list):
        raise UserError(f"{path}: not a timeline (no traceEvents)")
    return trace


def _complete_events(trace):
    """The trace's complete events, per rank, each as ``(start, stop, category)``: those with a
    finite place on the time axis and a rank's pid, of the thread that runs the step (anything
    else in a file is left out: a row thread's spans overlap thread 0's, and the step's time is
    thread 0's)."""
    per_rank = {}
    for event in trace["traceEvents"]:
        if not (isinstance(event, dict) and event.get("ph") == "X" and event.get("tid", 0) == 0):
            continue
        ts, dur, pid = event.get("ts"), event.get("dur"), event.get("pid")
        if (type(pid) is int and pid >= 0 and isinstance(ts, (int, float))
                and isinstance(dur, (int, float)) and 0 <= dur < 1e12 and abs(ts) < 1e15):
            per_rank.setdefault(pid, []).append((ts, ts + dur, str(event.get("cat"))))
    return per_rank


def phase_shares(trace):
    """``{rank: (steps, seconds of steps, {phase: seconds})}``: each phase's own time (its spans'
    time less the time of the spans inside them), over the steps of the timeline."""
    summary = {}
    for rank, events in sorted(_complete_events(trace).items()):
        events.sort(key=lambda event: (event[0], -event[1]))
        phases, steps, total = dict.fromkeys(PHASES, 0.0), 0, 0.0
        stack = []   # [stop, category, own time] of the spans open at this point
        for start, stop, category in events + [(float("inf"), float("inf"), None)]:
            while stack and stack[-1][0] <= start:
                _close(stack, phases)
            if category is None:
                break
            if category == "step":
                steps, total = steps + 1, total + (stop - start)
            elif not stack:
                continue   # outside every step (not written by ddptrain)
            if stack:
                stack[-1][2] -= min(stop, stack[-1][0]) - start
            stack.append([stop, "other" if category == "step" else category, stop - start])
        summary[rank] = (steps, total / 1e6, {k: v / 1e6 for k, v in phases.items()})
    return summary


def _close(stack, phases):
    stop, category, own = stack.pop()
    if category in phases:
        phases[category] += max(own, 0.0)
    else:
        phases["other"] += max(own, 0.0)


def format_phases(trace, most_columns=8):
    """The share of the step per phase, a column per rank (or, beyond ``most_columns`` ranks, the
    least, the median and the most over the ranks, and which rank had the most), as lines of a
    table; phases no rank spent time in are left out."""
    summary = phase_shares(trace)
    if not summary or not any(steps for steps, _, _ in summary.values()):
        return ["  (no steps in the timeline)"]
    ranks = [rank for rank, (steps, _, _) in summary.items() if steps]
    share = {rank: {phase: 100 * seconds / summary[rank][1]
                    for phase, seconds in summary[rank][2].items()} for rank in ranks}
    per_step = {rank: 1000 * summary[rank][1] / summary[rank][0] for rank in ranks}
    shown = [phase for phase in PHASES if any(share[rank][phase] >= 0.05 for rank in ranks)]
    if len(ranks) <= most_columns:
        header = "".join(f"{f'rank {rank}':>10}" for rank in ranks)
        rows = [(phase, "".join(f"{share[rank][phase]:>9.1f}%" for rank in ranks))
                for phase in shown]
        rows.append(("ms per step", "".join(f"{per_step[rank]:>10.2f}" for rank in ranks)))
    else:
        header = f"{'least':>10}{'median':>10}{'most':>10}{'on rank':>10}"
        rows = [(phase, _spread({r: share[r][phase] for r in ranks}, 1, "%")) for phase in shown]
        rows.append(("ms per step", _spread(per_step, 2, " ")))
    return [f"  {'share of the step':<17}{header}"] + [f"  {name:<17}{cells}"
                                                       for name, cells in rows]


def _spread(values, decimals, unit):
    """The least, the median and the most of ``{rank: value}``, and the rank with the most."""
    ordered = sorted(values.values())
    return ("".join(f"{v:>9.{decimals}f}{unit}"
                    for v in (ordered[0], ordered[len(ordered) // 2], ordered[-1]))
            + f"{max(values, key=values.get):>10}")
