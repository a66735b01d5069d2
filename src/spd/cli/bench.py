"""`spd bench`: SPD (encode + decode K) timed against the dense DAv2-S baseline in one process."""

from __future__ import annotations

import argparse

from spd.cli.args import add_device, check_output_file, k_list, positive_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="time SPD (encode + decode K) against the dense DAv2-S baseline, one process")
    p.add_argument("--height", type=positive_int, default=480, help="image height (default 480)")
    p.add_argument("--width", type=positive_int, default=640, help="image width (default 640)")
    p.add_argument("--k", type=k_list, default=(1, 16, 64, 256, 1024, 4096), help="comma-separated query counts")
    add_device(p)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp32,bf16", "bf16,fp32"],
                   help="bf16 = autocast; two (fp32,bf16) time both in one run, with the ratio (default fp32)")
    p.add_argument("--compile", action="store_true",
                   help="both models compiled end to end as Predictor(compile=True) runs them (fullgraph, one graph per "
                        "image size and K; CUDA graphs on CUDA)")
    p.add_argument("--batch", type=k_list, default=(1,), metavar="B,B",
                   help="images/s of both models at these batch sizes (B images encoded at once, the reference K (256) each; default 1)")
    p.add_argument("--train-batch", type=k_list, default=(1, 6), metavar="B,B",
                   help="batch sizes of the training-step section (default 1,6: the plan's batch is 6)")
    p.add_argument("--compile-decode", type=k_list, default=None, metavar="K,K",
                   help="also time SPD's decode compiled (fullgraph, one static graph per K; CUDA graphs on CUDA) at these K")
    p.add_argument("--no-train-step", action="store_true",
                   help="skip the training-step section (416x544, K=256: seconds and activation bytes per image)")
    p.add_argument("--train-step-only", action="store_true",
                   help="only the training-step section (SPD with and without activation checkpointing, DAv2-S)")
    p.add_argument("--repeat", type=positive_int, default=7, help="timed runs per figure; the median is reported (default 7)")
    p.add_argument("--baseline-input", choices=["fair", "official"], default="fair",
                   help="fair: 476x644 for 480x640 (same pixel count); official: short side 518")
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                   help="onnx: also export both models and time them on ONNX Runtime (CPU), beside the PyTorch rows")
    p.add_argument("--json", default=None, help="write all figures as JSON here")
    p.add_argument("--plot", default=None, help="write a time-vs-K plot (PNG) here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from spd.bench.inference import format_bench, run_bench, save_plot, write_json

    check_output_file(args.json, "--json")
    check_output_file(args.plot, "--plot")
    ks, compile_ks = args.k, args.compile_decode or ()
    if args.train_step_only:
        return _train_step_only(args)
    result = run_bench(args.height, args.width, ks, args.device, tuple(args.dtype.split(",")), args.compile, args.repeat,
                       args.baseline_input, compile_ks, not args.no_train_step, args.backend == "onnx", args.batch,
                       args.train_batch)
    print(format_bench(result))
    if args.json:
        write_json(result, args.json)
    if args.plot:
        save_plot(result, args.plot)
    return 0


def _train_step_only(args: argparse.Namespace) -> int:
    import torch

    from spd.bench.inference import write_json
    from spd.bench.machine import cpu_facts
    from spd.bench.train_step import format_training_step, training_step_sections

    dtypes = args.dtype.split(",")
    sections = training_step_sections(args.device, dtypes, args.train_batch, repeat=args.repeat)
    result = {"training_step": sections, "device": args.device, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "cpu": cpu_facts()}
    for section in sections:
        print(format_training_step(section["dtype"], section))
    if args.json:
        write_json(result, args.json)
    return 0
