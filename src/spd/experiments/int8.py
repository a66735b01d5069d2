"""Issue 27's int8 experiment: an int8 SPD encoder on ONNX Runtime against the fp32 export.

The int8 folder is either made by `spd export --int8` (`--int8-export`: GRN unfolded, every MLP
matmul quantised) or quantised here from the fp32 folder itself (`spd.export.int8`: QDQ, per-channel
int8 weights, uint8 activations, MinMax calibration on `--calibration` images; with the fp32
export's GRN folded into fc2, fc2 stays fp32); the decoder stays fp32. Measured, against the fp32
folder, in one process:
- speed: encode + decode(K) of one image at the exported size, the two folders timed in rounds;
- depth change: |int8 - fp32| / fp32 at a grid of about K points of each `--images` image;
- accuracy: abs_rel and δ1 of both at K fixed-seed labelled points of each test image of an
  NYU-layout dataset (`--test-data`: its test_files.txt), when given.

`spd export` offers int8 only if it pays: total(256) >= 1.3x faster with abs_rel within 2 % relative
of fp32 (the deployment page records the measured result).

    python -m spd.experiments.int8 --export EXPORT_DIR (--calibration IMAGE_DIR | --int8-export INT8_DIR)
        [--images IMG ...] [--test-data ROOT] --out OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np

from spd.export.int8 import QUANTIZED_OPS

def quantize_export(export: Path, out: Path, calibration: list[Path], ops: str = "weights") -> Path:
    """A copy of `export` in `out` whose encoder.onnx is int8 (`spd.export.int8.quantize_encoder`)."""
    from spd.export.int8 import quantize_encoder

    shutil.copytree(export, out)
    quantize_encoder(out, calibration, ops)
    return out


def total_ms(predictors: dict, k: int, rounds: int, seed: int = 0) -> dict[str, float]:
    """Median encode + decode(K) ms of each predictor on one random image, timed in rounds."""
    import time

    import torch

    first = next(iter(predictors.values()))
    height, width = first.export_size
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 3, height, width, generator=generator)
    queries = torch.rand(1, k, 2, generator=generator) * torch.tensor([width - 1.0, height - 1.0])
    mask = torch.ones(1, k, dtype=torch.bool)
    times: dict[str, list[float]] = {name: [] for name in predictors}
    for round_index in range(rounds + 1):
        for name, predictor in predictors.items():
            start = time.perf_counter()
            predictor._run_decoder(predictor._encode_tensor(image), queries, mask)
            if round_index:  # the first round warms up
                times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: statistics.median(values) for name, values in times.items()}


def depth_change(fp32, int8, images: list[Path], k: int) -> dict[str, float]:
    """Mean and max |int8 - fp32| / fp32 at a grid of about K points of each image."""
    from spd.export.runtime import relative_depth_change

    return relative_depth_change(fp32, int8, images, grid=max(1, round(k**0.5)))


def test_split_accuracy(predictors: dict, root: Path, k: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """abs_rel and δ1 of each predictor at K fixed-seed labelled points of every test image of an
    NYU-layout dataset (test_files.txt, paths under official_splits/test; depth 0 = no label)."""
    from spd.data.io import read_depth_png, read_rgb

    rng = np.random.default_rng(seed)
    errors: dict[str, list[np.ndarray]] = {name: [] for name in predictors}
    test_dir = root / "official_splits" / "test"
    for line in (root / "test_files.txt").read_text().split("\n"):
        if not line.strip():
            continue
        rgb_name, depth_name = line.split()[:2]
        rgb, depth = read_rgb(test_dir / rgb_name), read_depth_png(test_dir / depth_name)
        rows, cols = np.nonzero(depth > 0)
        pick = rng.choice(len(rows), size=min(k, len(rows)), replace=False)
        truth = depth[rows[pick], cols[pick]]
        points = np.stack([cols[pick], rows[pick]], 1).astype(np.float64)  # pixel centres (u, v)
        for name, predictor in predictors.items():
            errors[name].append(np.stack([predictor.predict(rgb, points), truth]))
    result = {}
    for name, pairs in errors.items():
        predicted, truth = np.concatenate(pairs, axis=1)
        ratio = np.maximum(predicted / truth, truth / predicted)
        result[name] = {"abs_rel": float(np.mean(np.abs(predicted - truth) / truth)), "delta1": float(np.mean(ratio < 1.25))}
    return result


def pays(speedup: float, abs_rel_change: float | None) -> bool | None:
    """Whether int8 is worth offering: total(K) >= 1.3x faster and abs_rel within 2 % relative of fp32.
    None (no verdict) when it is fast enough but its accuracy was not measured (no --test-data)."""
    if speedup < 1.3:
        return False
    return None if abs_rel_change is None else abs(abs_rel_change) <= 0.02


def run(args: argparse.Namespace) -> dict:
    from spd.bench.machine import cpu_facts
    from spd.errors import SPDError
    from spd.export.int8 import calibration_images
    from spd.export.runtime import OnnxPredictor, read_manifest

    export, out = Path(args.export), Path(args.out)
    try:
        read_manifest(export)  # a missing or broken export folder, named in one line
    except SPDError as err:
        raise SystemExit(f"spd: error: --export {err}") from None
    for image in args.images:
        if not Path(image).is_file():
            raise SystemExit(f"spd: error: --images {image}: not found")
    if args.test_data and not (Path(args.test_data) / "test_files.txt").is_file():
        raise SystemExit(f"spd: error: --test-data {args.test_data}: no test_files.txt (an NYU-layout dataset, as `spd synth` writes)")
    if (args.calibration is None) == (args.int8_export is None):
        raise SystemExit("spd: error: give --calibration (quantise --export here) or --int8-export (an `spd export --int8` folder)")
    calibration: list[Path] = []
    if args.int8_export is not None:
        int8_dir = Path(args.int8_export)
        try:
            if "encoder_quantization" not in read_manifest(int8_dir):
                raise SystemExit(f"spd: error: --int8-export {int8_dir}: not an int8 export (made by `spd export --int8`)")
        except SPDError as err:
            raise SystemExit(f"spd: error: --int8-export {err}") from None
    else:
        try:
            calibration = calibration_images(args.calibration, args.calibration_images)
        except SPDError as err:
            raise SystemExit(f"spd: error: {err}") from None
        out.mkdir(parents=True, exist_ok=True)
        int8_dir = out / "int8_export"
        if int8_dir.exists():
            shutil.rmtree(int8_dir)
        quantize_export(export, int8_dir, calibration, args.quantize)
    out.mkdir(parents=True, exist_ok=True)
    predictors = {"fp32": OnnxPredictor(export, threads=args.threads), "int8": OnnxPredictor(int8_dir, threads=args.threads)}
    if predictors["fp32"].export_size != predictors["int8"].export_size:
        raise SystemExit(f"spd: error: --int8-export {int8_dir} takes {predictors['int8'].export_size} images, --export "
                         f"{export} {predictors['fp32'].export_size}: export both at one size to compare them")
    result: dict = {"command": " ".join(["python -m spd.experiments.int8", *sys.argv[1:]]), "cpu": cpu_facts(),
                    "threads": args.threads, "int8_export": str(int8_dir),
                    "quantization": read_manifest(int8_dir)["encoder_quantization"],
                    "export_size": list(predictors["fp32"].export_size), "k": args.k}
    if calibration:  # quantised here (an --int8-export's manifest says what it was calibrated on)
        result["calibration_images"] = len(calibration)
    result["total_ms"] = total_ms(predictors, args.k, args.rounds)
    result["speedup"] = result["total_ms"]["fp32"] / result["total_ms"]["int8"]
    if args.images:
        result["depth_change"] = depth_change(predictors["fp32"], predictors["int8"], [Path(p) for p in args.images], args.k)
    if args.test_data:
        accuracy = test_split_accuracy(predictors, Path(args.test_data), args.k)
        result["test_split"] = accuracy
        result["abs_rel_change"] = accuracy["int8"]["abs_rel"] / accuracy["fp32"]["abs_rel"] - 1.0
    result["pays"] = pays(result["speedup"], result.get("abs_rel_change"))
    (out / "int8.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spd.experiments.int8", description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", required=True, help="an `spd export` folder (fp32)")
    parser.add_argument("--calibration", default=None, help="a folder of images (searched recursively) to calibrate on")
    parser.add_argument("--int8-export", default=None, help="an `spd export --int8` folder of the same model, measured "
                                                             "instead of quantising --export here")
    parser.add_argument("--calibration-images", type=int, default=32, help="at most this many (default 32)")
    parser.add_argument("--images", nargs="*", default=[], help="images to measure the depth change on")
    parser.add_argument("--test-data", default=None, help="an NYU-layout dataset: abs_rel of both on its test split")
    parser.add_argument("--k", type=int, default=256, help="points per image, and the K of total(K) (default 256)")
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds (default 9)")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    parser.add_argument("--quantize", choices=sorted(QUANTIZED_OPS), default="weights",  # when quantised here
                        help="which nodes: " + "; ".join(f"{k}: {v}" for k, v in QUANTIZED_OPS.items()))
    parser.add_argument("--out", required=True, help="output folder: int8.json (and int8_export/ when quantised here)")
    result = run(parser.parse_args(argv))
    print(json.dumps({key: result[key] for key in result if key not in ("cpu", "command")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
