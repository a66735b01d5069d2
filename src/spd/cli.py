"""The `spd` command line. Each sub-command lives in a small `_cmd_*` function."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from spd.allocator import tune_cpu_allocator
from spd.errors import SPDError, UserInputError


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
    if height < 32 or width < 32:
        raise argparse.ArgumentTypeError(f"size must be at least 32x32, got {text!r}")
    return height, width


def _int_at_least(minimum: int, text: str) -> int:
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(1, text)


def _non_negative_int(text: str) -> int:
    return _int_at_least(0, text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _k_list(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(_positive_int(k) for k in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be positive integers separated by commas, got {text!r}") from None
    return ks


def _device(text: str) -> str:
    """cpu, cuda or cuda:N, and present on this machine."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (use cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r} (use cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available on this machine (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def _cmd_synth(args: argparse.Namespace) -> int:
    from spd.data.synthetic import generate
    from spd.intrinsics import read_intrinsics

    intrinsics = read_intrinsics(args.intrinsics) if args.intrinsics else None
    out = generate(args.out, args.n_train, args.n_test, args.size, args.holes, args.seed, args.workers, sparse=args.sparse,
                   intrinsics=intrinsics)
    print(f"wrote {args.n_train} train + {args.n_test} test frames to {out} "
          f"(lists: {out / 'train_files.txt'}, {out / 'test_files.txt'}; descriptions: {out / 'dense.yaml'}"
          + (f", {out / 'sparse.yaml'} with {args.sparse} labels per image)" if args.sparse else ")"))
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from spd.data.check import check_dataset
    from spd.errors import DataLayoutError

    if args.dataset is not None:
        from spd.data.check import check_description

        if not Path(args.dataset).is_file():
            raise DataLayoutError(f"--dataset {args.dataset}: not found")
        report = check_description(args.dataset, args.min_depth, args.max_depth)
        print(report.summary())
        return 0 if report.ok else 1
    if args.root is None or args.filelist is None:
        raise UserInputError("give --dataset DESCRIPTION.yaml, or --root and --filelist (the NYU layout)")
    for flag, path in (("--filelist", args.filelist), ("--root", args.root)):
        if not Path(path).exists():  # an argument mistake, not a finding of the check
            raise DataLayoutError(f"{flag} {path}: not found")
    report = check_dataset(args.root, args.filelist, args.min_depth, args.max_depth)
    print(report.summary())
    return 0 if report.ok else 1


def _cmd_train(args: argparse.Namespace) -> int:
    from spd.engine.train import train
    from spd.errors import EXIT_PREEMPTED
    from spd.train_config import load_config

    from pathlib import Path

    from spd.errors import DataLayoutError

    from spd.data.described import is_description, read_description

    cfg = load_config(args.config, args.set)
    if is_description(args.data_root):
        read_description(args.data_root)  # before the run folder is touched
    elif not Path(args.data_root).is_dir():
        raise DataLayoutError(f"--data-root {args.data_root}: not a folder (or a dataset description .yaml)")
    if args.max_steps is not None:
        cfg.max_steps = args.max_steps
    if args.init_from is not None:
        cfg.init_from = args.init_from
    result = train(cfg, args.data_root, args.out, resume=args.resume, overwrite=args.overwrite)
    if result["stopped"] == "preempted":
        return EXIT_PREEMPTED  # saved; a scheduler may requeue the job with --resume
    if result["last_val"] is not None:
        print(f"step {result['step']}: val abs_rel {result['last_val']['abs_rel']:.4f} "
              f"(best {result['best_abs_rel']:.4f}); model folder: {args.out}/checkpoints/best")
    return 0


def _load_any_model(spec: str, device: str):
    """A model folder / Hub id, `median:<metres>` (a constant predictor) or `baseline:<folder|random>`."""
    if spec.startswith("median:"):
        from spd.models.constant import ConstantDepth

        try:
            depth = float(spec.split(":", 1)[1])
        except ValueError:
            depth = float("nan")
        if not (math.isfinite(depth) and depth > 0):
            raise UserInputError(f"--model {spec!r}: median:<metres> needs a positive depth in metres")
        return ConstantDepth(depth)
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

    from spd.data.described import DescribedDepth, is_description

    root = Path(args.data_root)
    queries = args.k if args.protocol == "sparse" else None
    if is_description(root):  # your own data: its `list`, no NYU crop
        filelist, args.crop = root, "none"
        dataset = DescribedDepth(root, "test", num_queries=queries, seed=args.seed, min_depth=args.min_depth,
                                 max_depth=args.max_depth)
    else:
        filelist = resolve_split_list(root, args.filelist, "test")
        dataset = NYUDepth(root / args.test_dir, filelist, split="test", num_queries=queries, seed=args.seed,
                           eval_crop=args.crop, min_depth=args.min_depth, max_depth=args.max_depth)
    model = _load_any_model(args.model, args.device)
    import torch

    from spd.models.precision import low_precision_copy

    device_type = torch.device(args.device).type
    autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    if args.dtype == "bf16":
        model = low_precision_copy(model)
    with autocast:
        metrics, acc = evaluate(model, dataset, args.protocol, args.k, args.chunk, args.crop, args.seed,
                                args.min_depth, args.max_depth, args.device, limit=args.limit)
    if not all(math.isfinite(v) for v in metrics.values()):
        raise UserInputError(f"non-finite metrics {metrics}: the model returned NaN or infinite depths; nothing written")
    print(f"{args.protocol} protocol, {acc.count} images ({acc.skipped} without valid GT), crop {args.crop}")
    print(format_metrics({args.model: metrics}))
    if args.out:
        provenance = {"model": args.model, "weights_sha256": _weights_sha256(args.model), "data_root": str(root),
                      "test_dir": args.test_dir, "filelist": str(filelist), "protocol": args.protocol, "k": args.k,
                      "seed": args.seed, "crop": args.crop, "min_depth": args.min_depth, "max_depth": args.max_depth}
        Path(args.out).write_text(json.dumps({**provenance, "images": acc.count, "metrics": metrics}, indent=2))
    return 0


def _weights_sha256(spec: str) -> str | None:
    """The SHA-256 of the evaluated weights file, when the model is a local folder."""
    from pathlib import Path

    from spd.models.folder import MODEL_FILE, file_sha256

    folder = Path(spec.split(":", 1)[1] if spec.startswith("baseline:") else spec)
    weights = folder / MODEL_FILE
    return file_sha256(weights) if weights.is_file() else None


def _read_points(args: argparse.Namespace, height: int, width: int):
    """The (K, 2) points of `spd predict` from --points, --points-file or --grid; UserInputError
    naming the problem (the values are checked against the image by the predictor)."""
    import numpy as np

    if args.points is not None:
        pairs = [pair for pair in args.points.split(";") if pair.strip()]
        if not pairs:
            raise UserInputError("--points: no points given (use 'u,v;u,v')")
        try:
            points = [[float(x) for x in pair.split(",")] for pair in pairs]
        except ValueError:
            raise UserInputError(f"--points must look like 'u,v;u,v', got {args.points!r}") from None
        if any(len(p) != 2 for p in points):
            raise UserInputError(f"--points must look like 'u,v;u,v' (two numbers per point), got {args.points!r}")
        return np.array(points)
    if args.points_file is not None:
        return _read_points_file(args.points_file)
    from spd.predictor import grid_points

    return grid_points(args.grid, height, width)


def _read_points_file(path: str):
    import numpy as np

    from spd.data.io import parse_number_rows

    try:
        lines = open(path).read().splitlines()
    except OSError as err:
        raise UserInputError(f"--points-file {path}: cannot read it ({err.strerror})") from None
    rows, bad = parse_number_rows(lines, 2)
    if bad is not None:
        raise UserInputError(f"{path}: line {bad} is not 'u,v': {lines[bad - 1]!r}")
    if not rows:
        raise UserInputError(f"{path}: no points in the file")
    return np.array(rows).reshape(-1, 2)


def _cmd_predict(args: argparse.Namespace) -> int:
    import csv
    from pathlib import Path

    import numpy as np

    from spd.predictor import Predictor, backproject, check_points, image_to_uint8

    from spd.intrinsics import read_intrinsics

    intrinsics = read_intrinsics(args.intrinsics) if args.intrinsics else None
    rgb = image_to_uint8(args.image)
    points = _read_points(args, *rgb.shape[:2])
    check_points(points, *rgb.shape[:2])  # before the model loads: a bad point costs nothing
    if args.backend == "onnx":
        if args.dtype != "fp32":
            raise UserInputError("--backend onnx runs the exported graphs' own dtype: drop --dtype")
        from spd.export.runtime import OnnxPredictor

        predictor = OnnxPredictor(args.model, resize=bool(args.max_side))  # --max-side 0: never resize
    else:
        predictor = Predictor(_load_any_model(args.model, args.device), args.device, dtype=args.dtype,
                              max_side=args.max_side or None)
    depth = predictor.predict(rgb, points, intrinsics)
    if not np.isfinite(depth).all():
        raise UserInputError(f"the model returned non-finite depths at {int((~np.isfinite(depth)).sum())} points; "
                             "nothing written (is the model folder trained?)")
    xyz = backproject(points, depth, intrinsics) if intrinsics is not None else None
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


def _cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from spd.export.onnx_export import export_onnx
    from spd.export.runtime import check_export
    from spd.models.spd import SPD

    if args.dtype != "fp32":
        raise UserInputError(f"--dtype {args.dtype}: only fp32 export is implemented so far")
    model = _load_any_model(args.model, "cpu")
    if not isinstance(model, SPD):
        raise UserInputError(f"{args.model}: only SPD model folders export (the baseline is timed by `spd bench --backend onnx`)")
    manifest = export_onnx(model, args.out, args.height, args.width, args.opset, source=str(args.model))
    error = check_export(model, Path(args.out))
    print(f"{args.out}: encoder.onnx + decoder.onnx (K dynamic) for {args.width}x{args.height} images, "
          f"{manifest.parent / manifest.name}; ONNX Runtime vs PyTorch on a random image, 1000 points: "
          f"max relative depth difference {error:.1e}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import socket

    try:
        import uvicorn

        from spd.serve.app import Limits, create_app
        from spd.serve.cache import FeatureCache
    except ImportError as err:
        raise UserInputError(f'spd serve needs the [serve] extra: pip install "spd[serve]" ({err.name} is missing)') from None
    with socket.socket() as probe:  # a taken port: one line now, not a uvicorn traceback later
        try:
            probe.bind((args.host, args.port))
        except OSError as err:
            raise UserInputError(f"cannot listen on {args.host}:{args.port} ({err.strerror})") from None
    predictor, info = _serving_predictor(args)
    cache = FeatureCache(int(args.cache_mb * 2**20), args.cache_ttl)
    app = create_app(predictor, str(args.model), info, cache, Limits(max_points=args.max_points))
    print(f"spd serve: {args.model} on http://{args.host}:{args.port}/ ({predictor.device}, {predictor.dtype}); "
          "no authentication: put it behind your reverse proxy to expose it")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _cmd_loadcheck(args: argparse.Namespace) -> int:
    from pathlib import Path

    from spd.serve.loadcheck import run_loadcheck

    serve_args = ["--dtype", args.dtype, "--backend", args.backend]
    result = run_loadcheck(args.model, args.clients, args.seconds, args.points, args.images, args.cache_mb,
                           serve_args=serve_args)
    print(result.format())
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2))
    return 0 if result.errors == 0 else 1


def _serving_predictor(args: argparse.Namespace):
    from spd.predictor import Predictor

    if args.backend == "onnx":
        from spd.export.runtime import OnnxPredictor

        predictor = OnnxPredictor(args.model)
        return predictor, {"backend": "onnx", **predictor.manifest["spd_config"]}
    model = _load_any_model(args.model, args.device)
    config = model.config.to_dict() if hasattr(model, "config") and hasattr(model.config, "to_dict") else {}
    return Predictor(model, args.device, dtype=args.dtype), {"backend": "torch", **config}


def _cmd_demo(args: argparse.Namespace) -> int:
    from spd.demo import run_demo

    run_demo(args.out, args.n_train, args.n_test, args.size, args.max_steps, args.seed)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from spd.bench import format_bench, run_bench, save_plot, write_json

    ks, compile_ks = args.k, args.compile_decode or ()
    result = run_bench(args.height, args.width, ks, args.device, tuple(args.dtype.split(",")), args.compile, args.repeat,
                       args.baseline_input, compile_ks, not args.no_train_step, args.backend == "onnx")
    print(format_bench(result))
    if args.json:
        write_json(result, args.json)
    if args.plot:
        save_plot(result, args.plot)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: `spd <command>: error: <message> (see --help)`, exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="spd",
        description="SPD: metric depth at the K pixels you ask for (encode the image once, decode only the queries).",
    )
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors (also SPD_DEBUG=1)")
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
    p.add_argument("--data-root", required=True,
                   help="NYU root holding sync/ and official_splits/test/ (or `spd synth` output), or a dataset "
                        "description .yaml (your own data: list + val_list)")
    p.add_argument("--out", required=True, help="run folder: config.yaml, metrics.jsonl, tb/, checkpoints/{last,best}")
    p.add_argument("--max-steps", type=_positive_int, default=None,
                   help="total optimiser steps (a resumed run stops at the same step)")
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoints/last if it exists")
    p.add_argument("--init-from", default=None, metavar="MODEL_DIR",
                   help="start from a saved SPD model's weights (fine-tuning: new optimiser and schedule; "
                        "the model config must match)")
    p.add_argument("--overwrite", action="store_true", help="start afresh in a folder that already holds a run (deletes it)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, dotted keys: --set optim.lr=3e-4 --set model.use_ldrm=false")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a model on NYU-layout data (sparse or dense protocol)")
    p.add_argument("--model", required=True,
                   help="model folder or Hub id; also median:<metres> or baseline:<folder|random>")
    p.add_argument("--data-root", required=True,
                   help="dataset root, as for `spd train`: NYU's BTS layout or `spd synth` output; or a dataset "
                        "description .yaml (its list is evaluated, no crop)")
    p.add_argument("--test-dir", default="official_splits/test",
                   help="test images under the root; the list's paths are relative to it (default official_splits/test)")
    p.add_argument("--filelist", default=None,
                   help="split list (default: <root>/test_files.txt as `spd synth` writes it, else the bundled Eigen test list)")
    p.add_argument("--protocol", choices=["sparse", "dense"], default="sparse",
                   help="sparse: K fixed-seed points per image; dense: every valid pixel of the crop (default sparse)")
    p.add_argument("--k", type=_positive_int, default=256, help="points per image for the sparse protocol (default 256)")
    p.add_argument("--chunk", type=_positive_int, default=256, help="queries per decode call, dense protocol (default 256)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="point sampling / shuffling seed (default 0)")
    p.add_argument("--crop", choices=["eigen", "garg", "none"], default="eigen", help="evaluation crop (default eigen)")
    p.add_argument("--min-depth", type=_positive_float, default=1e-3, help="eval range lower bound [m] (default 1e-3)")
    p.add_argument("--max-depth", type=_positive_float, default=10.0, help="eval range upper bound [m] (default 10)")
    p.add_argument("--limit", type=_positive_int, default=None, help="evaluate only the first N images")
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast inference (default fp32)")
    p.add_argument("--out", default=None, help="write the metrics as JSON here (with the model, weights checksum, data)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("predict", help="depth at points of one image; print, save JSON/CSV, draw an overlay")
    p.add_argument("--model", required=True, help="model folder (config.json + model.safetensors) or Hub id")
    p.add_argument("--image", required=True, help="an RGB image file")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--points", help="pixel points 'u,v;u,v' (u = column, v = row, pixel centres at integers)")
    where.add_argument("--points-file", help="CSV of u,v per line (an optional header line is skipped)")
    where.add_argument("--grid", type=_positive_int, help="an N x N grid of points over the image")
    p.add_argument("--out", default=None, help="write results to .json or .csv (default: print them)")
    p.add_argument("--vis", default=None, help="write a PNG overlay: points coloured by depth with a colour bar")
    p.add_argument("--intrinsics", default=None,
                   help="fx,fy,cx,cy in the image's pixels, or a file (.npy 3x3, .json, .txt): depth for this camera "
                        "(without it: the model's canonical camera, fx = its canonical_focal) and camera-frame X, Y, Z [m]")
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast inference (default fp32)")
    p.add_argument("--max-side", type=_non_negative_int, default=640,
                   help="resize images whose long side is larger to this before the model (points stay in your "
                        "pixels; default 640, the training frames' long side; 0 = never). With --backend onnx an "
                        "image is resized to the exported size when its aspect ratio matches; 0 = never)")
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                   help="torch: a model folder; onnx: an `spd export` folder on ONNX Runtime (default torch)")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("export", help="write encoder.onnx + decoder.onnx (K dynamic) + manifest.json, checked against PyTorch")
    p.add_argument("--model", required=True, help="SPD model folder or Hub id")
    p.add_argument("--out", required=True, help="export folder (created)")
    p.add_argument("--height", type=_positive_int, default=480, help="image height the graphs take (default 480)")
    p.add_argument("--width", type=_positive_int, default=640, help="image width the graphs take (default 640)")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="graph dtype (fp32; fp16 not implemented yet)")
    p.add_argument("--opset", type=_positive_int, default=None, help="ONNX opset (default: the exporter's, 18 or newer)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("serve", help="HTTP service: encode once, depth at many points; a click-for-depth page at /")
    p.add_argument("--model", required=True, help="model folder or Hub id (an `spd export` folder with --backend onnx)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_positive_int, default=8000, help="port (default 8000)")
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast inference (default fp32)")
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch", help="torch (default) or onnx (ONNX Runtime)")
    p.add_argument("--cache-mb", type=_positive_float, default=512.0,
                   help="encoded images kept for image_id reuse, in MB (LRU; default 512, ~25 MB per 480x640 image)")
    p.add_argument("--cache-ttl", type=_positive_float, default=600.0,
                   help="seconds an unused encoded image is kept (default 600)")
    p.add_argument("--max-points", type=_positive_int, default=65536, help="points per request (default 65536)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("loadcheck", help="N concurrent clients for T seconds against a local spd serve (cache full)")
    p.add_argument("--model", required=True, help="model folder for the server (as spd serve --model)")
    p.add_argument("--clients", type=_positive_int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--seconds", type=_positive_float, default=30.0, help="duration (default 30)")
    p.add_argument("--points", type=_positive_int, default=64, help="new random points per request (default 64)")
    p.add_argument("--images", type=_positive_int, default=3, help="images the clients query (default 3)")
    p.add_argument("--cache-mb", type=_positive_float, default=256.0, help="server cache bound, filled first (default 256)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="the server's dtype (default fp32)")
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch", help="the server's backend (default torch)")
    p.add_argument("--json", default=None, help="write the figures as JSON here")
    p.set_defaults(func=_cmd_loadcheck)

    p = sub.add_parser("demo", help="end to end on synthetic data: data, training, evaluation, figures (CPU, minutes)")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--n-train", type=_positive_int, default=1000, help="synthetic training frames (default 1000)")
    p.add_argument("--n-test", type=_positive_int, default=50, help="synthetic test frames (default 50)")
    p.add_argument("--size", type=_parse_size, default=(120, 160), help="frame size HxW (default 120x160)")
    p.add_argument("--max-steps", type=_positive_int, default=None, help="training steps (default: the v15_tiny_synth config's)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="data and training seed (default 0)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("bench", help="time SPD (encode + decode K) against the dense DAv2-S baseline, one process")
    p.add_argument("--height", type=_positive_int, default=480, help="image height (default 480)")
    p.add_argument("--width", type=_positive_int, default=640, help="image width (default 640)")
    p.add_argument("--k", type=_k_list, default=(1, 16, 64, 256, 1024, 4096), help="comma-separated query counts")
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp32,bf16", "bf16,fp32"],
                   help="bf16 = autocast; two (fp32,bf16) time both in one run, with the ratio (default fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models' encoders")
    p.add_argument("--compile-decode", type=_k_list, default=None, metavar="K,K",
                   help="also time SPD's decode compiled (fullgraph, one static graph per K; CUDA graphs on CUDA) at these K")
    p.add_argument("--no-train-step", action="store_true",
                   help="skip the training-step section (416x544, K=256: seconds and activation bytes per image)")
    p.add_argument("--repeat", type=_positive_int, default=7, help="timed runs per figure; the median is reported (default 7)")
    p.add_argument("--baseline-input", choices=["fair", "official"], default="fair",
                   help="fair: 476x644 for 480x640 (same pixel count); official: short side 518")
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                   help="onnx: also export both models and time them on ONNX Runtime (CPU), beside the PyTorch rows")
    p.add_argument("--json", default=None, help="write all figures as JSON here")
    p.add_argument("--plot", default=None, help="write a time-vs-K plot (PNG) here")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("synth", help="write a synthetic NYU-layout dataset (procedural rooms, exact depth)")
    p.add_argument("--out", required=True, help="output folder (sync/, official_splits/test/, *_files.txt)")
    p.add_argument("--n-train", type=_positive_int, required=True, help="training frames")
    p.add_argument("--n-test", type=_positive_int, required=True, help="test frames")
    p.add_argument("--size", type=_parse_size, default=(480, 640), help="HxW (default 480x640, NYU's size)")
    p.add_argument("--holes", action="store_true", help="add Kinect-like holes (depth 0) to the depth maps")
    p.add_argument("--sparse", type=_non_negative_int, default=0,
                   help="also write sparse.yaml: N point labels (u,v,depth_m CSV) per image (default 0: none)")
    p.add_argument("--intrinsics", default=None,
                   help="the camera: fx,fy,cx,cy in pixels of the written size, or a file as for `spd predict` "
                        "(default: NYU's, scaled to the width). The same --seed gives the same rooms and poses")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="frame i depends only on (seed, split, i)")
    p.add_argument("--workers", type=_positive_int, default=None, help="processes (default: all cores)")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    p = data_sub.add_parser("check", help="validate every file of a split list and print a summary")
    p.add_argument("--root", default=None, help="folder the list's paths are relative to (e.g. nyu/sync)")
    p.add_argument("--filelist", default=None, help="split list: 'rgb depth focal' per line")
    p.add_argument("--dataset", default=None, help="or a dataset description (.yaml): your own data, dense or sparse labels")
    p.add_argument("--min-depth", type=_positive_float, default=1e-3, help="valid depth > this (m)")
    p.add_argument("--max-depth", type=_positive_float, default=10.0, help="valid depth <= this (m)")
    p.set_defaults(func=_cmd_data_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one sub-command. The project's own errors (bad arguments, settings, data, checkpoints)
    end in one line `spd <command>: error: <message>` and their exit code (`spd.errors`); a bug keeps
    its traceback. `--debug` or SPD_DEBUG=1 shows the traceback of the project's errors too."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("SPD_DEBUG") == "1"
    command = args.command + (f" {args.data_command}" if getattr(args, "data_command", None) else "")

    def tuned_command() -> int:
        tune_cpu_allocator()  # freed memory kept for the next call (spd.allocator; SPD_MALLOC=default skips)
        return args.func(args)

    return run_reporting_errors(f"spd {command}", tuned_command, debug)


def run_reporting_errors(name: str, func, debug: bool = False) -> int:
    """`func()`'s exit code; the project's errors end in one line `<name>: error: <message>` and their
    exit code, Ctrl-C in `<name>: interrupted` and 130. A bug keeps its traceback."""
    try:
        return func()
    except SPDError as err:
        if debug:
            raise
        message = " ".join(str(err).split())  # one line, whatever the exception held
        print(f"{name}: error: {message}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:  # Ctrl-C: files are written atomically, so what finished is kept whole
        if debug:
            raise
        print(f"{name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
