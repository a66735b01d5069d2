"""`spd predict`: depth at points of one image; printed, saved as JSON / CSV, drawn as an overlay."""

from __future__ import annotations

import argparse
import csv
import json

from spd.cli.args import add_device, add_inference_dtype, check_output_file, check_output_suffix, non_negative_int, positive_int
from spd.cli.models import load_any_model
from spd.cli.points import read_points
from spd.errors import UserInputError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("predict", help="depth at points of one image; print, save JSON/CSV, draw an overlay")
    p.add_argument("--model", required=True, help="model folder (config.json + model.safetensors) or Hub id")
    p.add_argument("--image", required=True, help="an RGB image file")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--points", help="pixel points 'u,v;u,v' (u = column, v = row, pixel centres at integers)")
    where.add_argument("--points-file", help="CSV of u,v per line (an optional header line is skipped)")
    where.add_argument("--grid", type=positive_int, help="an N x N grid of points over the image")
    p.add_argument("--out", default=None, help="write results to .json or .csv (default: print them)")
    p.add_argument("--vis", default=None, help="write a PNG overlay: points coloured by depth with a colour bar")
    p.add_argument("--intrinsics", default=None,
                   help="fx,fy,cx,cy in the image's pixels, or a file (.npy 3x3, .json, .txt): depth for this camera "
                        "(without it: the model's canonical camera, fx = its canonical_focal) and camera-frame X, Y, Z [m]")
    add_device(p)
    add_inference_dtype(p)
    p.add_argument("--long-side", "--max-side", dest="long_side", type=non_negative_int, default=None,
                   help="resize every image to this long side before the model (points and intrinsics stay in your "
                        "pixels; default: the model's pixel scale, the long side of its training frames; 0 = never). "
                        "With --backend onnx an image is resized to the exported size when its aspect ratio "
                        "matches; 0 = never")
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                   help="torch: a model folder; onnx: an `spd export` folder on ONNX Runtime (default torch)")
    p.set_defaults(func=run)


def _predictor(args: argparse.Namespace):
    from spd.predictor import Predictor

    if args.backend == "onnx":
        if args.dtype != "fp32":
            raise UserInputError("--backend onnx runs the exported graphs' own dtype: drop --dtype")
        from spd.export.runtime import OnnxPredictor

        return OnnxPredictor(args.model, resize=args.long_side != 0)  # --long-side 0: never resize
    long_side = "model" if args.long_side is None else (args.long_side or None)
    return Predictor(load_any_model(args.model, args.device), args.device, dtype=args.dtype, long_side=long_side)


def say_provenance(predictor) -> None:
    """One warning when the model was trained only on synthetic rooms (its metres mean nothing on a
    real photo); nothing for other or unknown training data."""
    import warnings

    from spd.data.provenance import summary, synthetic_only

    if synthetic_only(predictor.trained_on):
        warnings.warn(f"spd: this model was trained only on {summary(predictor.trained_on)}: its metres are not "
                      "meaningful on real photographs", UserWarning, stacklevel=2)


def _rows(points, depth, intrinsics) -> list[dict]:
    """One dict per point: u, v, depth_m, and camera-frame x_m, y_m, z_m when intrinsics are given."""
    from spd.predictor import backproject

    rows = [{"u": float(u), "v": float(v), "depth_m": float(d)} for (u, v), d in zip(points, depth)]
    if intrinsics is not None:
        for row, (x, y, z) in zip(rows, backproject(points, depth, intrinsics)):
            row.update(x_m=float(x), y_m=float(y), z_m=float(z))
    return rows


def _write_rows(rows: list[dict], out: str | None, image: str) -> None:
    from pathlib import Path

    if out and out.lower().endswith(".csv"):
        with open(out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["u", "v", "depth_m"])
            writer.writeheader()
            writer.writerows(rows)
    elif out:
        Path(out).write_text(json.dumps({"image": str(image), "points": rows}, indent=2))
    else:
        for row in rows:
            print("  ".join(f"{k}={v:.3f}" for k, v in row.items()))


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from spd.cameras.intrinsics import read_intrinsics
    from spd.predictor import check_points, image_to_uint8

    check_output_file(args.out, "--out")
    check_output_suffix(args.out, "--out", (".json", ".csv"))
    check_output_file(args.vis, "--vis")
    check_output_suffix(args.vis, "--vis", (".png", ".jpg", ".jpeg", ".pdf", ".svg"))
    intrinsics = read_intrinsics(args.intrinsics) if args.intrinsics else None
    rgb = image_to_uint8(args.image)
    points = read_points(args, *rgb.shape[:2])
    check_points(points, *rgb.shape[:2])  # before the model loads: a bad point costs nothing
    predictor = _predictor(args)
    say_provenance(predictor)
    depth = predictor.predict(rgb, points, intrinsics)
    if not np.isfinite(depth).all():
        raise UserInputError(f"the model returned non-finite depths at {int((~np.isfinite(depth)).sum())} points; "
                             "nothing written (is the model folder trained?)")
    rows = _rows(points, depth, intrinsics)
    _write_rows(rows, args.out, args.image)
    if args.vis:
        from spd.vis import save_point_overlay

        save_point_overlay(args.vis, rgb, np.asarray(points), depth, title=f"SPD depth, {Path(args.image).name}")
    if args.out or args.vis:
        print(f"{len(rows)} points" + (f" -> {args.out}" if args.out else "") + (f", overlay -> {args.vis}" if args.vis else ""))
    return 0
