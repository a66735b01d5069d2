"""`spd demo`: the whole system end to end on a fresh CPU machine, no download.

synthetic NYU-layout data -> train the tiny preset -> sparse-protocol evaluation against the
median-depth predictor -> the predictor on a held-out image -> demo_out/ with metrics.json,
report.md and three figures.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from spd.data import NYUDepth, read_rgb
from spd.data.synthetic import TEST_DIR, TRAIN_DIR, generate
from spd.models.spd import load_model
from spd.engine.evaluate import evaluate
from spd.engine.train import train
from spd.metrics import METRIC_NAMES, format_metrics
from spd.models.constant import ConstantDepth, median_training_depth
from spd.predictor import Predictor
from spd.config.training import load_config
from spd.vis import save_point_overlay, save_scatter, save_training_curves


def _markdown_table(rows: dict[str, dict[str, float]]) -> str:
    lines = ["| predictor | " + " | ".join(METRIC_NAMES) + " |", "|---" * (len(METRIC_NAMES) + 1) + "|"]
    for name, metrics in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[m]:.4f}" for m in METRIC_NAMES) + " |")
    return "\n".join(lines)


def run_demo(
    out: str | Path = "demo_out",
    n_train: int = 1000,
    n_test: int = 50,
    size: tuple[int, int] = (120, 160),
    max_steps: int | None = None,
    seed: int = 0,
    resume_hint: str = "rerun the same spd demo command to continue",
) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    data = demo_data(out / "data", n_train, n_test, size, seed, out / "run")
    timings["synth_s"] = time.perf_counter() - start

    cfg = load_config("v15_tiny_synth")
    cfg.seed = seed
    if max_steps is not None:
        cfg.max_steps = max_steps
    run_dir = out / "run"
    start = time.perf_counter()
    # an interrupted demo run continues (a rerun of the same command; a changed setting is refused by the
    # run folder's guard, naming it), never restarts from step 0 over it
    resume = (run_dir / "checkpoints" / "last").is_dir()
    if train(cfg, data, run_dir, resume=resume, overwrite=not resume, resume_hint=resume_hint)["stopped"] == "preempted":
        raise KeyboardInterrupt  # Ctrl-C during training (saved in run/): evaluate nothing half-trained
    timings["train_s"] = time.perf_counter() - start

    # The final weights (checkpoints/last), not the best-on-test ones: no selection on the test set.
    start = time.perf_counter()
    model = load_model(run_dir / "checkpoints" / "last")
    test_set = NYUDepth(data / TEST_DIR, data / "test_files.txt", split="test", num_queries=cfg.eval.num_queries,
                        seed=cfg.eval.seed, eval_crop="none")
    train_frames = NYUDepth(data / TRAIN_DIR, data / "train_files.txt", split="test", min_depth=cfg.data.min_depth)
    median_m = median_training_depth(train_frames)
    rows = {}
    rows["model"], _ = evaluate(model, test_set, "sparse", crop="none", progress=False)
    rows["median"], _ = evaluate(ConstantDepth(median_m), test_set, "sparse", crop="none", progress=False)
    timings["eval_s"] = time.perf_counter() - start

    _figures(out, model, test_set, rows, run_dir, timings)
    ratio = rows["model"]["abs_rel"] / rows["median"]["abs_rel"]
    result = {"model": rows["model"], "median": rows["median"], "median_depth_m": median_m,
              "abs_rel_ratio_model_over_median": ratio, "timings_s": timings, "steps": cfg.max_steps,
              "data": {"train": n_train, "test": n_test, "size": list(size)}}
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    (out / "report.md").write_text(_report(result, rows, out, run_dir, data))
    print(format_metrics(rows))
    print(f"model abs_rel / median abs_rel = {ratio:.2f}; outputs in {out}/")
    return result


def _figures(out: Path, model, test_set: NYUDepth, rows: dict, run_dir: Path, timings: dict) -> None:
    """Predicted vs true at every evaluation point, the predictor on a held-out image, the curves."""
    predictor = Predictor(model)
    preds, truths = [], []
    for index in range(len(test_set)):
        sample = test_set[index]
        queries = sample["queries"][sample["query_mask"]]
        rgb = read_rgb(test_set.entries[index].rgb)  # the predictor gets the image as a user would
        u, v = queries.long().unbind(-1)
        start = time.perf_counter()
        preds.append(predictor.predict(rgb, queries.numpy()))
        if index == 0:
            timings["predict_one_image_s"] = time.perf_counter() - start
            save_point_overlay(out / "overlay.png", rgb, queries.numpy(), preds[0],
                               true_depth_map=sample["depth"][0].numpy(), title="SPD on a held-out synthetic room")
        truths.append(sample["depth"][0, v, u].numpy())
    save_scatter(out / "scatter.png", np.concatenate(truths), np.concatenate(preds),
                 f"held-out test points (abs_rel {rows['model']['abs_rel']:.3f})")
    save_training_curves(out / "training_curves.png", run_dir / "metrics.jsonl", rows["median"]["abs_rel"])


def demo_data(folder: Path, n_train: int, n_test: int, size: tuple[int, int], seed: int, run_dir: Path) -> Path:
    """The demo's synthetic rooms: reused when `folder` holds the same settings' (recorded in
    demo_data.json), written anew otherwise; a run begun on other data is refused, not mixed."""
    settings = {"n_train": n_train, "n_test": n_test, "size": list(size), "seed": seed}
    record = folder / "demo_data.json"
    if record.is_file() and json.loads(record.read_text()) == settings:
        return folder
    if (run_dir / "checkpoints" / "last").is_dir():
        from spd.errors import RunFolderError

        before = json.loads(record.read_text()) if record.is_file() else "unknown"
        raise RunFolderError(f"{run_dir.parent}: holds a demo run on other data ({before}, now {settings}): rerun "
                             "with the same --n-train / --n-test / --size / --seed to continue it, or use a new --out")
    generate(folder, n_train, n_test, size, holes=True, seed=seed)
    record.write_text(json.dumps(settings))
    return folder


def _report(result: dict, rows: dict, out: Path, run_dir: Path, data: Path) -> str:
    t = result["timings_s"]
    return f"""# SPD demo report

Synthetic NYU-layout rooms ({result['data']['train']} train / {result['data']['test']} test frames,
{result['data']['size'][0]}x{result['data']['size'][1]}, Kinect-like holes), the `v15-tiny` preset trained
{result['steps']} steps with the `v15_tiny_synth` config on this machine's CPU, evaluated with the sparse
protocol (256 fixed-seed valid points per test image) against a predictor that answers the training
set's median depth ({result['median_depth_m']:.3f} m) everywhere.

{_markdown_table(rows)}

model abs_rel / median abs_rel = **{result['abs_rel_ratio_model_over_median']:.2f}** (lower is better).

Timings: data {t['synth_s']:.0f} s, training {t['train_s']:.0f} s, evaluation {t['eval_s']:.0f} s,
one predictor call (encode + 256 points) {t['predict_one_image_s'] * 1000:.0f} ms.

Figures: `training_curves.png` (loss and validation abs_rel), `scatter.png` (predicted vs true
depth at every test point), `overlay.png` (queried points coloured by predicted depth beside the
true depth map).

## Going further

```bash
spd predict --model {run_dir}/checkpoints/last --image {data}/official_splits/test/synth_room_00000/rgb_00000.jpg --grid 16 --vis overlay16.png
spd eval --model {run_dir}/checkpoints/last --data-root {data} --protocol dense --crop none
spd train --config v15_tiny_synth --data-root {data} --out runs/longer --max-steps 3000
spd train --config v15_nyu --data-root /path/to/nyu --out runs/v15_nyu       # real NYU, GPU (see README)
```
"""
