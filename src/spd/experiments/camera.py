"""The canonical-camera rule (spd.camera) measured: one training camera, another at test time.

    python -m spd.experiments.camera --out camera_out            # ~16 min on a 2-core CPU
    make camera-experiment                                     # the same

Synthetic rooms (`spd synth`, 1000 train / 50 test at 120x160, NYU's camera scaled) train
`v15-tiny` twice with the demo's budget (`v15_tiny_synth`): once as the demo does, once with the
camera augmentation `data.zoom` (random enlargement, focal length multiplied to match). The test
rooms are then rendered again through a lens of `--zoom` x the focal length (same rooms, same poses;
`spd synth --intrinsics`), and each model is scored (sparse protocol, 256 points per image) on

  - the training camera's test rooms,
  - the other camera's, with their intrinsics (predictions x f / f_c),
  - the other camera's, without intrinsics (the canonical camera assumed: predictions as they are).

`scale` is exp(mean log(predicted / true)) over the points: the focal ratio shows there as 1 / zoom.
Writes OUT/camera_experiment.json and prints a table. Data and runs already under OUT are reused
(OUT/data; OUT/run_plain and OUT/run_zoom_augmented are resumed, so an interrupted call continues).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import yaml

from spd.cameras.canonical import canonical_focal_of, prediction_to_metric
from spd.cli import run_reporting_errors
from spd.data.described import DescribedDepth
from spd.data.synthetic import generate, nyu_camera
from spd.engine.evaluate import evaluate
from spd.engine.train import train
from spd.models.spd import load_model
from spd.config.training import load_config

SIZE = (120, 160)


def geometric_scale(model, frames) -> float:
    """exp(mean log(predicted / true depth)) over the frames' evaluation points, predictions in
    metres by each frame's focal (spd.camera)."""
    logs = []
    with torch.inference_mode():
        for index in range(len(frames)):
            sample = frames[index]
            queries, mask = sample["queries"][None], sample["query_mask"][None]
            pred = model.decode(model.encode(sample["image"][None]), queries, mask)[0][mask[0]]
            pred = prediction_to_metric(pred, sample["focal"], canonical_focal_of(model))
            u, v = sample["queries"][mask[0]].long().unbind(-1)
            logs.append(torch.log(pred / sample["depth"][0, v, u]))
    return float(torch.exp(torch.cat(logs).mean()))


def score(model, description: Path) -> dict[str, float]:
    """abs_rel, rmse, delta1 and scale of `model` on a description's frames (sparse protocol, K = 256)."""
    frames = DescribedDepth(description, split="test", num_queries=256)
    metrics, _ = evaluate(model, frames, "sparse", crop="none", progress=False)
    return {"abs_rel": metrics["abs_rel"], "rmse": metrics["rmse"], "delta1": metrics["delta1"],
            "scale": geometric_scale(model, frames)}


def other_camera_test_set(out: Path, n_test: int, zoom: float, seed: int) -> Path:
    """The test rooms through a lens of `zoom` x the focal length: `dense_test.yaml` (with the
    intrinsics) and `dense_test_no_intrinsics.yaml` (the same frames, camera unknown)."""
    fx, fy, cx, cy = nyu_camera(SIZE[1])
    data = generate(out, 0, n_test, SIZE, holes=True, seed=seed, intrinsics=(fx * zoom, fy * zoom, cx, cy), progress=False)
    description = yaml.safe_load((data / "dense_test.yaml").read_text())
    description.pop("intrinsics")
    (data / "dense_test_no_intrinsics.yaml").write_text(yaml.safe_dump(description, sort_keys=False))
    return data


def train_model(data: Path, run: Path, zoom: float, seed: int) -> Path:
    """`v15_tiny_synth` on `data` with `data.zoom = zoom`; returns the final weights' folder. A run
    already in `run` is resumed (one that finished only re-validates): delete it to train again."""
    cfg = load_config("v15_tiny_synth")
    cfg.seed, cfg.data.zoom = seed, zoom
    resume = (run / "checkpoints" / "last").is_dir()
    if train(cfg, data, run, resume=resume)["stopped"] == "preempted":
        raise KeyboardInterrupt  # Ctrl-C during training (saved; the next call resumes it): score nothing half-trained
    return run / "checkpoints" / "last"


def run(out: Path, n_train: int, n_test: int, zoom: float, train_zoom: float, seed: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if not (data / "dense_test.yaml").is_file():
        generate(data, n_train, n_test, SIZE, holes=True, seed=seed)
    other = other_camera_test_set(out / "data_other_camera", n_test, zoom, seed)
    fx = nyu_camera(SIZE[1])[0]
    result: dict = {"zoom": zoom, "focal_px": {"train_camera": round(fx, 4), "other_camera": round(fx * zoom, 4)},
                    "data": {"train": n_train, "test": n_test, "size": list(SIZE)}, "models": {}}
    for name, augment in (("plain", 1.0), ("zoom_augmented", train_zoom)):
        model = load_model(train_model(data, out / f"run_{name}", augment, seed))
        result["models"][name] = {
            "train_zoom": augment,
            "train_camera": score(model, data / "dense_test.yaml"),
            "other_camera_with_intrinsics": score(model, other / "dense_test.yaml"),
            "other_camera_without_intrinsics": score(model, other / "dense_test_no_intrinsics.yaml"),
        }
    (out / "camera_experiment.json").write_text(json.dumps(result, indent=2))
    return result


def table(result: dict) -> str:
    lines = [f"test rooms through a {result['zoom']}x lens (fx {result['focal_px']['other_camera']} px vs "
             f"{result['focal_px']['train_camera']} px in training); abs_rel (scale = predicted / true)",
             f"{'model':<16}{'train camera':>16}{'other, intrinsics':>20}{'other, none':>16}{'change':>9}"]
    for name, rows in result["models"].items():
        cells = [f"{rows[k]['abs_rel']:.3f} ({rows[k]['scale']:.2f})" for k in
                 ("train_camera", "other_camera_with_intrinsics", "other_camera_without_intrinsics")]
        change = rows["other_camera_with_intrinsics"]["abs_rel"] / rows["train_camera"]["abs_rel"] - 1
        lines.append(f"{name:<16}{cells[0]:>16}{cells[1]:>20}{cells[2]:>16}{change * 100:>+8.0f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spd.experiments.camera", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("camera_out"))
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=50)
    parser.add_argument("--zoom", type=float, default=1.5, help="the test camera's focal length over the training one's")
    parser.add_argument("--train-zoom", type=float, default=1.75, help="data.zoom of the augmented model (>= 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.n_train < 1 or args.n_test < 1:
        parser.error("--n-train and --n-test must be positive")
    if not (args.zoom > 0 and args.zoom == args.zoom) or not args.train_zoom >= 1:  # also refuses NaN
        parser.error("--zoom must be > 0 and --train-zoom >= 1")
    def experiment() -> int:
        result = run(args.out, args.n_train, args.n_test, args.zoom, args.train_zoom, args.seed)
        print(table(result))
        print(f"written: {args.out / 'camera_experiment.json'}")
        return 0

    return run_reporting_errors(parser.prog, experiment, os.environ.get("SPD_DEBUG") == "1")


if __name__ == "__main__":
    raise SystemExit(main())
