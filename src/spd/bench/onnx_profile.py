"""Where ONNX Runtime spends its time in a graph: its own profiler, summed per operator type.

`spd bench --backend onnx` reports the top operator types of SPD's encoder and decoder graphs (the
deployment page's profile tables come from it). ORT's profiler records one event per node run with
the node's op type and its duration in microseconds; the first run (allocations, kernel choices) is
left out, and each op type's time is its sum over the remaining runs, divided by their number.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path


def op_type_times(ort, graph: Path, options, feeds: dict, runs: int = 5) -> dict[str, float]:
    """{op type: ms per run}, largest first, for `graph` run `runs` times on `feeds` after one warm-up
    run, with `options` (profiling is switched on in them for this session, its file in a temporary
    folder, and off again afterwards)."""
    return _sum_by_op_type(node_events(ort, graph, options, feeds, runs), runs)


def node_events(ort, graph: Path, options, feeds: dict, runs: int = 5) -> list[dict]:
    """ORT's profiler events of every node run in `runs` runs of `graph` after one warm-up run: each
    with the node's op type, duration (us) and input / output shapes in `args` (control-flow nodes
    left out: their time is their subgraphs' nodes, which have events of their own)."""
    with tempfile.TemporaryDirectory() as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        try:
            session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
            for _ in range(runs + 1):
                session.run(None, feeds)
            events = json.loads(Path(session.end_profiling()).read_text())
        finally:
            options.enable_profiling = False
    return _after_warm_up(events)


CONTROL_FLOW = ("If", "Loop", "Scan")


def _after_warm_up(events: list[dict]) -> list[dict]:
    """Node kernel events after the first `model_run` event, control-flow nodes left out."""
    model_runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    warm_end = model_runs[0]["ts"] + model_runs[0]["dur"] if model_runs else 0
    return [event for event in events
            if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time")
            and event["ts"] >= warm_end and event["args"]["op_name"] not in CONTROL_FLOW]


def _sum_by_op_type(events: list[dict], runs: int) -> dict[str, float]:
    """Node events summed per op type, in ms per run."""
    totals: dict[str, float] = defaultdict(float)
    for event in events:
        totals[event["args"]["op_name"]] += event["dur"] / 1000.0 / runs
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def top_ops(times: dict[str, float], n: int = 6) -> list[list]:
    """[[op type, ms per run, share of the graph's node time], ...] for the n largest."""
    total = sum(times.values()) or 1.0
    return [[op, round(ms, 2), round(ms / total, 3)] for op, ms in list(times.items())[:n]]


def format_profile(profile: dict) -> list[str]:
    """One line per profiled graph: its node time and top op types with their shares."""
    lines = []
    for graph, entry in profile.items():
        ops = ", ".join(f"{op} {share:.0%}" for op, _, share in entry["top"])
        lines.append(f"  ORT profile {graph}: node time {entry['node_ms']:.1f} ms; {ops}")
    return lines
