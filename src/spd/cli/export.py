"""`spd export`: an SPD model folder as encoder.onnx + decoder.onnx (K dynamic) + manifest.json,
checked against PyTorch before the command returns."""

from __future__ import annotations

import argparse

from spd.cli.args import positive_int
from spd.cli.models import load_any_model
from spd.errors import UserInputError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="write encoder.onnx + decoder.onnx (K dynamic) + manifest.json, checked against PyTorch")
    p.add_argument("--model", required=True, help="SPD model folder or Hub id")
    p.add_argument("--out", required=True, help="export folder (created)")
    p.add_argument("--height", type=positive_int, default=480, help="image height the graphs take (default 480)")
    p.add_argument("--width", type=positive_int, default=640, help="image width the graphs take (default 640)")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="graph dtype (fp32; fp16 not implemented yet)")
    p.add_argument("--opset", type=positive_int, default=None, help="ONNX opset (default: the exporter's, 18 or newer)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from spd.export.onnx_export import export_onnx
    from spd.export.runtime import check_export
    from spd.models.spd import SPD

    if args.dtype != "fp32":
        raise UserInputError(f"--dtype {args.dtype}: only fp32 export is implemented so far")
    model = load_any_model(args.model, "cpu")
    if not isinstance(model, SPD):
        raise UserInputError(f"{args.model}: only SPD model folders export (the baseline is timed by `spd bench --backend onnx`)")
    manifest = export_onnx(model, args.out, args.height, args.width, args.opset, source=str(args.model))
    error = check_export(model, Path(args.out))
    print(f"{args.out}: encoder.onnx + decoder.onnx (K dynamic) for {args.width}x{args.height} images, "
          f"{manifest.parent / manifest.name}; ONNX Runtime vs PyTorch on a random image, 1000 points: "
          f"max relative depth difference {error:.1e}")
    return 0
