"""Where SPD's CPU time goes: torch.profiler's top ops (self time) of v15's encode and decode(K) at
480x640, fp32 and bf16 (autocast on the bf16 weight copy, as the predictor runs it), random weights,
in this process's threads. The speed page's per-CPU profile notes come from it.

Read shares, not milliseconds, off it: the profiler slows the largest ops (v15's first MLP layer,
19200 x 96 -> 384 with its GELU, reads 15.3 ms per call here against 10.3 ms timed without it on an
AMD EPYC Zen 4). `scripts/cpu_floor.py` times the encoder's linear layers without the profiler.

    .venv/bin/python scripts/profile_cpu.py [--k 256] [--rows 8]
"""

import argparse
import contextlib
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

import spd
from spd.models.precision import low_precision_copy


def top_ops(fn, runs: int, rows: int) -> str:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = spd.build_model("v15", warn_random_encoder=False).eval()
    image = torch.randn(1, 3, 480, 640)
    queries = torch.rand(1, args.k, 2) * torch.tensor([639.0, 479.0])
    for dtype in ("fp32", "bf16"):
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
        if dtype == "bf16":  # as the predictor, `spd eval` and `spd bench` run bf16: weights stored in bf16 once
            model = low_precision_copy(model)
        with torch.inference_mode(), autocast:
            for _ in range(2):  # warm-up: kernel choices
                features = model.encode(image)
                model.decode(features, queries, check_values=False)
            print(f"== {dtype} encode ({args.runs} runs)")
            print(top_ops(lambda: model.encode(image), args.runs, args.rows))
            print(f"== {dtype} decode(K={args.k}) ({args.runs} runs)")
            print(top_ops(lambda: model.decode(features, queries, check_values=False), args.runs, args.rows))


if __name__ == "__main__":
    main()
