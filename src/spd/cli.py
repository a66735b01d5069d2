"""The `spd` command line. Each sub-command lives in a small `_cmd_*` function."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_params(args: argparse.Namespace) -> int:
    from spd.build import build_model
    from spd.params import format_table, parameter_table

    table = parameter_table(build_model(args.preset, warn_random_encoder=False))
    print(json.dumps(table, indent=2) if args.json else format_table(table))
    return 0


def _parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 480x640 (HxW), got {text!r}") from None
    return height, width


def _cmd_synth(args: argparse.Namespace) -> int:
    from spd.data.synthetic import generate

    out = generate(args.out, args.n_train, args.n_test, args.size, args.holes, args.seed, args.workers)
    print(f"wrote {args.n_train} train + {args.n_test} test frames to {out} "
          f"(lists: {out / 'train_files.txt'}, {out / 'test_files.txt'})")
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from spd.data.check import check_dataset

    report = check_dataset(args.root, args.filelist, args.min_depth, args.max_depth)
    print(report.summary())
    return 0 if report.ok else 1


def _cmd_train(args: argparse.Namespace) -> int:
    from spd.engine.train import train
    from spd.train_config import load_config

    cfg = load_config(args.config, args.set)
    if args.max_steps is not None:
        cfg.max_steps = args.max_steps
    result = train(cfg, args.data_root, args.out, resume=args.resume)
    if result["last_val"] is not None:
        print(f"step {result['step']}: val abs_rel {result['last_val']['abs_rel']:.4f} "
              f"(best {result['best_abs_rel']:.4f}); model folder: {args.out}/checkpoints/best")
    return 0


def _load_any_model(spec: str, device: str):
    """A model folder / Hub id, `median:<metres>` (a constant predictor) or `baseline:<folder|random>`."""
    if spec.startswith("median:"):
        from spd.models.constant import ConstantDepth

        return ConstantDepth(float(spec.split(":", 1)[1]))
    if spec.startswith("baseline:"):
        from spd.models.baseline import load_baseline

        return load_baseline(spec.split(":", 1)[1], device=device)
    from spd.hub import load_model

    return load_model(spec, device)


def _cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from spd.data import NYUDepth, resolve_split_list
    from spd.engine.evaluate import evaluate
    from spd.metrics import format_metrics

    root = Path(args.data_root)
    filelist = resolve_split_list(root, args.filelist, "test")
    model = _load_any_model(args.model, args.device)
    dataset = NYUDepth(root / args.test_dir, filelist, split="test", num_queries=args.k if args.protocol == "sparse" else None,
                       seed=args.seed, eval_crop=args.crop, min_depth=args.min_depth, max_depth=args.max_depth)
    metrics, acc = evaluate(model, dataset, args.protocol, args.k, args.chunk, args.crop, args.seed,
                            args.min_depth, args.max_depth, args.device, limit=args.limit)
    print(f"{args.protocol} protocol, {acc.count} images ({acc.skipped} without valid GT), crop {args.crop}")
    print(format_metrics({Path(args.model).name or args.model: metrics}))
    if args.out:
        Path(args.out).write_text(json.dumps({"protocol": args.protocol, "k": args.k, "seed": args.seed, "crop": args.crop,
                                              "images": acc.count, "metrics": metrics}, indent=2))
    return 0


def _read_points(args: argparse.Namespace, height: int, width: int):
    import numpy as np

    if args.points:
        try:
            return np.array([[float(x) for x in pair.split(",")] for pair in args.points.split(";") if pair.strip()])
        except ValueError:
            raise SystemExit(f"--points must look like 'u,v;u,v', got {args.points!r}") from None
    if args.points_file:
        rows = []
        for number, line in enumerate(open(args.points_file).read().splitlines(), start=1):
            parts = [p.strip() for p in line.replace(";", ",").split(",") if p.strip()]
            if not parts:
                continue
            try:
                rows.append([float(parts[0]), float(parts[1])])
            except (ValueError, IndexError):
                if number == 1:
                    continue  # a header line such as "u,v"
                raise SystemExit(f"{args.points_file}: line {number} is not 'u,v': {line!r}") from None
        return np.array(rows).reshape(-1, 2)
    n = args.grid
    u = (np.arange(n) + 0.5) * width / n - 0.5
    v = (np.arange(n) + 0.5) * height / n - 0.5
    uu, vv = np.meshgrid(u, v)
    return np.stack([uu.ravel(), vv.ravel()], -1)


def _cmd_predict(args: argparse.Namespace) -> int:
    import csv
    from pathlib import Path

    import numpy as np

    from spd.predictor import Predictor, backproject, image_to_uint8

    rgb = image_to_uint8(args.image)
    points = _read_points(args, *rgb.shape[:2])
    predictor = Predictor(_load_any_model(args.model, args.device), args.device)
    depth = predictor.predict(rgb, points)
    xyz = None
    if args.intrinsics:
        intrinsics = [float(v) for v in args.intrinsics.split(",")]
        if len(intrinsics) != 4:
            raise SystemExit("--intrinsics needs fx,fy,cx,cy")
        xyz = backproject(points, depth, intrinsics)
    rows = [{"u": float(u), "v": float(v), "depth_m": float(d)} for (u, v), d in zip(points, depth)]
    if xyz is not None:
        for row, (x, y, z) in zip(rows, xyz):
            row.update(x_m=float(x), y_m=float(y), z_m=float(z))
    if args.out and args.out.endswith(".csv"):
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["u", "v", "depth_m"])
            writer.writeheader()
            writer.writerows(rows)
    elif args.out:
        Path(args.out).write_text(json.dumps({"image": str(args.image), "points": rows}, indent=2))
    else:
        for row in rows:
            print("  ".join(f"{k}={v:.3f}" for k, v in row.items()))
    if args.vis:
        from spd.vis import save_point_overlay

        save_point_overlay(args.vis, rgb, np.asarray(points), depth, title=f"SPD depth, {Path(args.image).name}")
    if args.out or args.vis:
        print(f"{len(rows)} points" + (f" -> {args.out}" if args.out else "") + (f", overlay -> {args.vis}" if args.vis else ""))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from spd.demo import run_demo

    run_demo(args.out, args.n_train, args.n_test, args.size, args.max_steps, args.seed)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from spd.bench import format_bench, run_bench, save_plot, write_json

    ks = tuple(int(k) for k in args.k.split(","))
    compile_ks = tuple(int(k) for k in args.compile_decode.split(",")) if args.compile_decode else ()
    result = run_bench(args.height, args.width, ks, args.device, tuple(args.dtype.split(",")), args.compile, args.repeat,
                       args.baseline_input, args.channels_last, compile_ks, not args.no_train_step)
    print(format_bench(result))
    if args.json:
        write_json(result, args.json)
    if args.plot:
        save_plot(result, args.plot)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spd",
        description="SPD: metric depth at the K pixels you ask for (encode the image once, decode only the queries).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("params", help="per-component parameter table beside the research plan's numbers")
    p.add_argument("--preset", default="v15", help="model preset: v15 or v15-tiny (default: v15)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_params)

    p = sub.add_parser(
        "train", help="train a model (one process, or many under torchrun)",
        description="Train SPD. Under `torchrun --nproc-per-node N spd train ...` it uses DDP (NCCL on GPUs, gloo on CPU).",
    )
    p.add_argument("--config", required=True, help="bundled config name (v15_nyu, v15_tiny_synth) or a YAML path")
    p.add_argument("--data-root", required=True, help="NYU root holding sync/ and official_splits/test/ (or `spd synth` output)")
    p.add_argument("--out", required=True, help="run folder: config.yaml, metrics.jsonl, tb/, checkpoints/{last,best}")
    p.add_argument("--max-steps", type=int, default=None, help="total optimiser steps (a resumed run stops at the same step)")
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoints/last if it exists")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, dotted keys: --set optim.lr=3e-4 --set model.use_ldrm=false")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a model on NYU-layout data (sparse or dense protocol)")
    p.add_argument("--model", required=True,
                   help="model folder or Hub id; also median:<metres> or baseline:<folder|random>")
    p.add_argument("--data-root", required=True,
                   help="dataset root, as for `spd train`: NYU's BTS layout or `spd synth` output")
    p.add_argument("--test-dir", default="official_splits/test",
                   help="test images under the root; the list's paths are relative to it (default official_splits/test)")
    p.add_argument("--filelist", default=None,
                   help="split list (default: <root>/test_files.txt as `spd synth` writes it, else the bundled Eigen test list)")
    p.add_argument("--protocol", choices=["sparse", "dense"], default="sparse",
                   help="sparse: K fixed-seed points per image; dense: every valid pixel of the crop (default sparse)")
    p.add_argument("--k", type=int, default=256, help="points per image for the sparse protocol (default 256)")
    p.add_argument("--chunk", type=int, default=256, help="queries per decode call for the dense protocol (default 256)")
    p.add_argument("--seed", type=int, default=0, help="point sampling / shuffling seed (default 0)")
    p.add_argument("--crop", choices=["eigen", "garg", "none"], default="eigen", help="evaluation crop (default eigen)")
    p.add_argument("--min-depth", type=float, default=1e-3, help="eval range lower bound [m] (default 1e-3)")
    p.add_argument("--max-depth", type=float, default=10.0, help="eval range upper bound [m] (default 10)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--out", default=None, help="write the metrics as JSON here")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("predict", help="depth at points of one image; print, save JSON/CSV, draw an overlay")
    p.add_argument("--model", required=True, help="model folder (config.json + model.safetensors) or Hub id")
    p.add_argument("--image", required=True, help="an RGB image file")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--points", help="pixel points 'u,v;u,v' (u = column, v = row, pixel centres at integers)")
    where.add_argument("--points-file", help="CSV of u,v per line (an optional header line is skipped)")
    where.add_argument("--grid", type=int, help="an N x N grid of points over the image")
    p.add_argument("--out", default=None, help="write results to .json or .csv (default: print them)")
    p.add_argument("--vis", default=None, help="write a PNG overlay: points coloured by depth with a colour bar")
    p.add_argument("--intrinsics", default=None, help="fx,fy,cx,cy in pixels: also output camera-frame X, Y, Z [m]")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("demo", help="end to end on synthetic data: data, training, evaluation, figures (CPU, minutes)")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--n-train", type=int, default=1000, help="synthetic training frames (default 1000)")
    p.add_argument("--n-test", type=int, default=50, help="synthetic test frames (default 50)")
    p.add_argument("--size", type=_parse_size, default=(120, 160), help="frame size HxW (default 120x160)")
    p.add_argument("--max-steps", type=int, default=None, help="training steps (default: the v15_tiny_synth config's)")
    p.add_argument("--seed", type=int, default=0, help="data and training seed (default 0)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("bench", help="time SPD (encode + decode K) against the dense DAv2-S baseline, one process")
    p.add_argument("--height", type=int, default=480, help="image height (default 480)")
    p.add_argument("--width", type=int, default=640, help="image width (default 640)")
    p.add_argument("--k", default="1,16,64,256,1024,4096", help="comma-separated query counts")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp32,bf16", "bf16,fp32"],
                   help="bf16 = autocast; two (fp32,bf16) time both in one run, with the ratio (default fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models' encoders")
    p.add_argument("--compile-decode", default=None, metavar="K,K",
                   help="also time SPD's decode compiled (fullgraph, one static graph per K; CUDA graphs on CUDA) at these K")
    p.add_argument("--no-train-step", action="store_true",
                   help="skip the training-step section (416x544, K=256: seconds and activation bytes per image)")
    p.add_argument("--channels-last", action="store_true", help="run the SPD encoder in channels-last memory format")
    p.add_argument("--repeat", type=int, default=7, help="timed runs per figure; the median is reported (default 7)")
    p.add_argument("--baseline-input", choices=["fair", "official"], default="fair",
                   help="fair: 476x644 for 480x640 (same pixel count); official: short side 518")
    p.add_argument("--json", default=None, help="write all figures as JSON here")
    p.add_argument("--plot", default=None, help="write a time-vs-K plot (PNG) here")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("synth", help="write a synthetic NYU-layout dataset (procedural rooms, exact depth)")
    p.add_argument("--out", required=True, help="output folder (sync/, official_splits/test/, *_files.txt)")
    p.add_argument("--n-train", type=int, required=True, help="training frames")
    p.add_argument("--n-test", type=int, required=True, help="test frames")
    p.add_argument("--size", type=_parse_size, default=(480, 640), help="HxW (default 480x640, NYU's size)")
    p.add_argument("--holes", action="store_true", help="add Kinect-like holes (depth 0) to the depth maps")
    p.add_argument("--seed", type=int, default=0, help="frame i depends only on (seed, split, i)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    p = data_sub.add_parser("check", help="validate every file of a split list and print a summary")
    p.add_argument("--root", required=True, help="folder the list's paths are relative to (e.g. nyu/sync)")
    p.add_argument("--filelist", required=True, help="split list: 'rgb depth focal' per line")
    p.add_argument("--min-depth", type=float, default=1e-3, help="valid depth > this (m)")
    p.add_argument("--max-depth", type=float, default=10.0, help="valid depth <= this (m)")
    p.set_defaults(func=_cmd_data_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
