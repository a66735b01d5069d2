"""`spd export`: an SPD model folder as encoder.onnx + decoder.onnx (K dynamic) + manifest.json,
checked against PyTorch before the command returns."""

from __future__ import annotations

import argparse

from spd.cli.args import check_output_folder, positive_int
from spd.cli.models import load_any_model
from spd.errors import UserInputError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="write encoder.onnx + decoder.onnx (K dynamic) + manifest.json, checked against PyTorch")
    p.add_argument("--model", required=True, help="SPD model folder or Hub id")
    p.add_argument("--out", required=True, help="export folder (created)")
    p.add_argument("--height", type=positive_int, default=None,
                   help="image height the graphs take (default: 3/4 of the model's pixel scale, 480 for NYU models)")
    p.add_argument("--width", type=positive_int, default=None,
                   help="image width the graphs take (default: the model's pixel scale, its training frames' long "
                        "side: 640 for NYU models)")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="graph dtype (fp32; fp16 not implemented yet)")
    p.add_argument("--opset", type=positive_int, default=None, help="ONNX opset (default: the exporter's, 18 or newer)")
    p.add_argument("--int8", action="store_true",
                   help="quantise the encoder to int8 (ONNX Runtime static quantisation, calibrated on --calibration "
                        "images; total(256) 1.64x faster on an AMD EPYC Zen 4, see docs/deployment.md); the decoder "
                        "stays fp32")
    p.add_argument("--calibration", default=None, metavar="DIR",
                   help="with --int8: a folder of typical images (.jpg / .png, searched recursively) of the export's "
                        "aspect ratio")
    p.add_argument("--calibration-images", type=positive_int, default=32, metavar="N", help="with --int8: calibrate on at most this many (default 32)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from spd.export.onnx_export import default_export_size, export_onnx
    from spd.export.runtime import check_export
    from spd.models.spd import SPD

    if args.dtype != "fp32":
        raise UserInputError(f"--dtype {args.dtype}: only fp32 export is implemented so far")
    if args.int8 != (args.calibration is not None):
        raise UserInputError("--int8 needs --calibration DIR (typical images to calibrate on), and --calibration is only "
                             "for --int8")
    calibration = check_images = None
    if args.int8:
        from spd.export.int8 import calibration_images, split_calibration

        calibration, check_images = split_calibration(
            calibration_images(args.calibration, args.calibration_images + 4), args.calibration_images)
    check_output_folder(args.out, "--out")  # a file, or a parent that is a file or missing: before any work
    model = load_any_model(args.model, "cpu")
    if not isinstance(model, SPD):
        raise UserInputError(f"{args.model}: only SPD model folders export (the baseline is timed by `spd bench --backend onnx`)")
    default_height, default_width = default_export_size(model)
    height, width = args.height or default_height, args.width or default_width
    checked = []  # the export's own check, run on the new folder before it replaces --out

    def check(staging: Path) -> None:
        from spd.export.runtime import ExportMismatch, check_int8_export

        kept = f"the export already in {args.out} is unchanged" if Path(args.out).exists() else "nothing was written"
        try:
            checked.append(check_export(model, staging, name=args.out) if calibration is None else
                           check_int8_export(model, staging, check_images, name=args.out))
        except ExportMismatch as err:
            raise ExportMismatch(f"{err} ({kept})") from None

    if calibration is None:
        manifest = export_onnx(model, args.out, height, width, args.opset, source=str(args.model), before_swap=check)
    else:
        from spd.export.int8 import export_int8

        manifest = export_int8(model, args.out, height, width, calibration, check=check, opset=args.opset,
                               source=str(args.model))
    written = f"{args.out}: encoder.onnx + decoder.onnx (K dynamic) for {width}x{height} images, {manifest.parent / manifest.name}"
    if calibration is None:
        print(f"{written}; ONNX Runtime vs PyTorch on a random image, 1000 points: max relative depth difference "
              f"{checked[0]:.1e}")
        return 0
    change = checked[0]
    print(f"{written}; int8 encoder calibrated on {len(calibration)} images; ONNX Runtime int8 vs PyTorch fp32 on "
          f"{change['images']} held-out images, 1024 points each: depth change {change['mean']:.1%} mean, "
          f"{change['max']:.1%} max")
    return 0
