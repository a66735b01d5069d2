"""Before / after timing of SPD's exported decoder on ONNX Runtime: the decoder graphs of several
export folders (e.g. written at two commits) timed alternately in one process, on the same encoder
output and queries, so that a shared machine's drift falls on all of them alike.

    git checkout OLD && python scripts/onnx_decoder_ab.py --export /tmp/before
    git checkout NEW && python scripts/onnx_decoder_ab.py --export /tmp/after
    python scripts/onnx_decoder_ab.py /tmp/before /tmp/after [--k 1,256,1024,4096] [--nodes 4096]

`--export` writes random-weight v15 at 480x640 (seed 0, the model `spd bench` times). The timing
prints the median decode ms per folder and K, and the largest difference of the folders' depths
relative to the first folder's largest depth; `--nodes K` adds ONNX Runtime's profile of each folder's
decoder at that K, its slowest nodes with their shapes. Two intra-op threads, the bench's session options.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

from spd.cli.args import k_list


def export_random_v15(folder: str) -> None:
    import torch

    import spd
    from spd.export.onnx_export import export_onnx

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = spd.build_model("v15", warn_random_encoder=False).eval()
        export_onnx(model, folder, 480, 640, any_scale=True)


def decoder_feeds(ort, folder: Path, ks: list[int]) -> dict[int, dict]:
    from spd.export.runtime import session_options

    encoder = ort.InferenceSession(str(folder / "encoder.onnx"), session_options(ort, 2), providers=["CPUExecutionProvider"])
    image = np.random.RandomState(0).rand(1, 3, 480, 640).astype(np.float32)
    table, keys, values = encoder.run(None, {"image": image})
    feeds = {}
    for k in ks:
        queries = (np.random.RandomState(1).rand(1, k, 2) * [639, 479]).astype(np.float32)
        feeds[k] = {"table": table, "global_keys": keys, "global_values": values, "queries": queries,
                    "mask": np.ones((1, k), bool)}
    return feeds


def slowest_nodes(ort, graph: Path, feed: dict, count: int = 12, runs: int = 3) -> list[str]:
    """ORT's profile of `graph` on `feed` after a warm-up run: the `count` slowest nodes, ms per run."""
    from spd.bench.onnx_profile import CONTROL_FLOW
    from spd.export.runtime import session_options

    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(ort, 2)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        for _ in range(runs + 1):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    first = min((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    times, shapes = defaultdict(float), {}
    for event in events:
        if (event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= first["ts"] + first["dur"]
                and event["args"]["op_name"] not in CONTROL_FLOW):  # an If's time is its subgraph's nodes
            name = event["name"].removesuffix("_kernel_time")
            times[(name, event["args"]["op_name"])] += event["dur"] / 1000 / runs
            shapes[name] = event["args"].get("input_type_shape")
    ranked = sorted(times.items(), key=lambda item: -item[1])[:count]
    return [f"{ms:8.2f} ms  {op:16s} {name[:48]:48s} {json.dumps(shapes[name])[:110]}" for (name, op), ms in ranked]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", help="export folders to time, the first the reference")
    parser.add_argument("--export", help="write random-weight v15 at 480x640 here and stop")
    parser.add_argument("--k", type=k_list, default=k_list("1,256,1024,4096"), help="comma-separated query counts")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per folder and K (median)")
    parser.add_argument("--nodes", type=int, help="also print each folder's slowest decoder nodes at this K")
    args = parser.parse_args()
    if args.export:
        export_random_v15(args.export)
        return
    if not args.folders:
        parser.error("give export folders to time, or --export FOLDER")
    import onnxruntime as ort

    from spd.export.runtime import session_options

    folders = [Path(f) for f in args.folders]
    missing = [str(folder) for folder in folders
               if not ((folder / "encoder.onnx").is_file() and (folder / "decoder.onnx").is_file())]
    if missing:
        parser.error(f"not export folders (no encoder.onnx / decoder.onnx): {', '.join(missing)}")
    ks = list(args.k)
    feeds = decoder_feeds(ort, folders[0], ks)
    sessions = [ort.InferenceSession(str(f / "decoder.onnx"), session_options(ort, 2), providers=["CPUExecutionProvider"])
                for f in folders]
    print("decode ms (median of %d, folders alternating): K, %s" % (args.repeat, ", ".join(map(str, folders))))
    for k, feed in feeds.items():
        depths = [session.run(None, feed)[0] for session in sessions]  # also the warm-up run
        times = [[] for _ in sessions]
        for _ in range(args.repeat):
            for session, samples in zip(sessions, times):
                start = time.perf_counter()
                session.run(None, feed)
                samples.append(1000 * (time.perf_counter() - start))
        difference = max(float(np.abs(d - depths[0]).max()) for d in depths) / float(np.abs(depths[0]).max())
        print(f"{k:6d} " + " ".join(f"{statistics.median(t):9.1f}" for t in times) + f"   depths differ by {difference:.1e}")
    if args.nodes:
        node_feed = decoder_feeds(ort, folders[0], [args.nodes])[args.nodes]
        for folder in folders:
            print(f"{folder}: slowest decoder nodes at K={args.nodes}")
            print("\n".join(slowest_nodes(ort, folder / "decoder.onnx", node_feed)))


if __name__ == "__main__":
    main()
