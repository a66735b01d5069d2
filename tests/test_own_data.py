"""Your own data (issue 15, part): dataset descriptions with dense or sparse labels from `spd synth`,
their augmentation, losses, training, resume, evaluation and `spd data check`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from spd.cli import main
from spd.data.check import check_description
from spd.data.described import DescribedDepth
from spd.data.synthetic import generate
from spd.losses import spd_losses


@pytest.fixture(scope="module")
def described_root(tmp_path_factory):
    """12 train + 3 test synthetic rooms at 120 x 160 with holes, as dense.yaml and sparse.yaml (300 labels each)."""
    return generate(tmp_path_factory.mktemp("own"), n_train=12, n_test=3, size=(120, 160), holes=True, seed=5,
                    workers=1, progress=False, sparse=300)


def _train(description: Path, run: Path, steps: int, extra=()):
    command, env = _train_command(description, run, steps, extra)
    return subprocess.run(command, env=env, capture_output=True, text=True)


def _train_command(description: Path, run: Path, steps: int, extra=()):
    command = [sys.executable, "-m", "spd.cli", "train", "--config", "v15_tiny_synth", "--data-root", str(description),
               "--out", str(run), "--max-steps", str(steps), "--set", "data.workers=0", "--set", "eval.limit=2",
               "--set", "batch_size=2", "--set", "data.num_queries=32", "--set", "deterministic=true",
               "--set", "log_every=1", "--set", "eval.every_steps=0", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return command, env


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss_total"] for r in rows if r["kind"] == "train"}


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_description_trains_with_finite_losses_and_evaluates(described_root, tmp_path, kind):
    run = tmp_path / kind
    result = _train(described_root / f"{kind}.yaml", run, 3)
    assert result.returncode == 0, result.stderr[-2000:]
    losses = _losses(run)
    assert sorted(losses) == [1, 2, 3] and all(np.isfinite(v) for v in losses.values())
    assert main(["eval", "--model", str(run / "checkpoints" / "last"), "--data-root", str(described_root / "dense.yaml"),
                 "--limit", "2", "--out", str(tmp_path / "eval.json")]) == 0
    metrics = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert np.isfinite(metrics["abs_rel"])


@pytest.mark.parametrize("kind, extra", [("dense", "mix"), ("dense", ("--set", "data.zoom=1.75"))])
def test_description_run_resumes_bit_exactly(described_root, tmp_path, kind, extra):
    """Stopped by SIGTERM after a few steps (it saves, exits 75), then --resume: the same losses and
    the same weights as an uninterrupted run (dense labels mixed with sparse ones by `data.mix`, whose
    draws seed their own augmentation; dense labels with the camera augmentation)."""
    if extra == "mix":
        extra = ("--set", "data.mix=" + json.dumps([{"dataset": str(described_root / "sparse.yaml"), "weight": 3}]))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _train(described_root / f"{kind}.yaml", straight, 6, extra).returncode == 0
    command, env = _train_command(described_root / f"{kind}.yaml", resumed, 6, extra)
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log, deadline = resumed / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 2):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 75, output
    again = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _losses(resumed) == _losses(straight)
    a = load_file(str(straight / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "last" / "model.safetensors"))
    assert all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("rotation, zoom", [(0.0, 1.0), (2.5, 1.0), (0.0, 1.75)])
def test_sparse_points_move_with_the_image_onto_the_same_scene_point(described_root, rotation, zoom):
    """The same frames and seeds through the dense and the sparse description: every label that
    survives zoom, crop, flip (and rotation) sits where the dense map shows the depth it was read from."""
    common = dict(crop_size=(64, 96), rotation_deg=rotation, color_p=0.0, min_depth=1e-3, max_depth=10.0, seed=1,
                  zoom=zoom)
    dense = DescribedDepth(described_root / "dense.yaml", "train", **common)
    sparse = DescribedDepth(described_root / "sparse.yaml", "train", **common)
    relative = []
    for epoch in range(3):
        dense.set_epoch(epoch)
        sparse.set_epoch(epoch)
        for index in range(4):
            a, b = dense[index], sparse[index]
            torch.testing.assert_close(a["image"], b["image"])  # the same augmentation drawn
            assert a["focal"] == b["focal"] and (a["focal"] > 129.72 if zoom > 1 else a["focal"] == 129.7145)
            labelled = b["valid"][0] & a["valid"][0]
            assert labelled.sum() > 0
            relative.append(((b["depth"][0] - a["depth"][0]).abs() / a["depth"][0])[labelled])
    relative = torch.cat(relative)
    if rotation == 0.0:  # zoom, crop and flip move pixel centres onto (the nearest) pixel centres: exact
        assert relative.max() < 1e-6
    else:  # a rotated label lands within half a pixel of the dense map's nearest-neighbour sample
        assert relative.median() < 1e-6 and (relative < 0.02).float().mean() > 0.95


def test_a_crop_without_labels_adds_zero_loss_not_nan(tmp_path, tiny_model):
    image = (np.random.default_rng(0).integers(0, 255, (120, 160, 3))).astype(np.uint8)
    from PIL import Image

    Image.fromarray(image).save(tmp_path / "rgb.png")
    (tmp_path / "points.csv").write_text("u,v,depth_m\n1,1,2.0\n2,1,2.5\n")  # both in the top-left corner
    (tmp_path / "list.txt").write_text("rgb.png points.csv\n")
    (tmp_path / "d.yaml").write_text("list: list.txt\n")
    dataset = DescribedDepth(tmp_path / "d.yaml", "train", num_queries=8, crop_size=(64, 96), rotation_deg=0, color_p=0)
    empty = next(s for e in range(40) for s in [dataset.set_epoch(e) or dataset[0]] if not s["valid"].any())
    batch = {k: v[None] for k, v in empty.items() if isinstance(v, torch.Tensor)}
    out = tiny_model(batch["image"], batch["queries"], batch["query_mask"], return_aux=True)
    terms = spd_losses(out, batch, tiny_model.ldrm_patch_origin(batch["queries"]))
    assert all(torch.isfinite(value) for value in terms.values())
    assert float(terms["total"].detach()) == 0.0


def test_data_check_reports_every_problem_with_file_and_line(described_root, tmp_path):
    lines = (described_root / "sparse_train.txt").read_text().splitlines()[:4]
    rgb, label = lines[0].split()
    (tmp_path / "outside.csv").write_text("u,v,depth_m\n5,5,2.0\n500,5,2.0\n")
    np.save(tmp_path / "ints.npy", np.ones((120, 160), dtype=np.int32))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    root = described_root.resolve()
    listed = [f"missing.jpg {label}", f"{rgb} {tmp_path / 'outside.csv'}", f"{rgb} {tmp_path / 'ints.npy'}",
              f"{rgb} {tmp_path / 'broken.png'}", lines[1]]
    (tmp_path / "list.txt").write_text("\n".join(listed) + "\n")
    (tmp_path / "d.yaml").write_text(f"root: {root}\nlist: {tmp_path / 'list.txt'}\n")
    report = check_description(tmp_path / "d.yaml", progress=False)
    text = "\n".join(report.errors)
    assert len(report.errors) == 4, text
    assert "list.txt:1" in text and "missing.jpg: file not found" in text
    assert "list.txt:2" in text and "point 1 (500.0, 5.0) lies outside the 160x120 image" in text
    assert "list.txt:3" in text and "dtype int32" in text
    assert "list.txt:4" in text and "broken.png: unreadable" in text


def test_mixed_datasets_share_each_epoch_by_weight_and_train(described_root, tmp_path):
    """`data.mix`: the --data-root set plus others, drawn per epoch in proportion to their weights,
    the same draw on every run; a short run trains on the mix."""
    from spd.data.mix import MixedDataset, WeightedEpochSampler

    parts = [DescribedDepth(described_root / f"{kind}.yaml", "train", crop_size=None) for kind in ("dense", "sparse")]
    mixed = MixedDataset(parts)
    assert len(mixed) == 24 and mixed[13]["id"] == parts[1][1]["id"] == mixed[(13, 5)]["id"]
    counts = np.zeros(2)
    for epoch in range(200):
        sampler = WeightedEpochSampler(mixed, [1.0, 3.0], seed=0, rank=0, world_size=1)
        sampler.set_epoch(epoch)
        drawn = np.array([index for index, _ in sampler])
        counts += [(drawn < 12).sum(), (drawn >= 12).sum()]
    assert abs(counts[1] / counts.sum() - 0.75) < 0.02
    again = WeightedEpochSampler(mixed, [1.0, 3.0], seed=0, rank=0, world_size=1)
    again.set_epoch(199)
    assert [index for index, _ in again] == drawn.tolist()
    ranks = [WeightedEpochSampler(mixed, [1.0, 3.0], seed=0, rank=r, world_size=2) for r in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(3)
    assert len(list(ranks[0])) == len(list(ranks[1])) == 12

    run = tmp_path / "mix"
    mix = json.dumps([{"dataset": str(described_root / "sparse.yaml"), "weight": 3}])
    result = _train(described_root / "dense.yaml", run, 2, ["--set", f"data.mix={mix}"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(_losses(run)) == [1, 2]


def test_each_mixed_draw_of_an_image_gets_its_own_crop_and_queries(described_root):
    """`data.mix` draws with replacement: two draws of one image in one epoch are augmented and queried
    differently (their seeds come from the draw's position and its set), and the same key gives the
    same sample every time (what resume relies on)."""
    from spd.data.mix import MixedDataset, WeightedEpochSampler

    common = dict(crop_size=(64, 96), num_queries=32, seed=0)
    parts = [DescribedDepth(described_root / f"{kind}.yaml", "train", **common) for kind in ("dense", "sparse")]
    mixed = MixedDataset(parts)
    sampler = WeightedEpochSampler(mixed, [1.0, 1.0], seed=0, rank=0, world_size=1)
    sampler.set_epoch(2)
    mixed.set_epoch(2)
    keys = list(sampler)
    positions: dict[int, list[int]] = {}
    for index, position in keys:
        positions.setdefault(index, []).append(position)
    index, (first, second, *_) = next((i, p) for i, p in positions.items() if len(p) > 1)
    a, b = mixed[(index, first)], mixed[(index, second)]
    assert a["id"] == b["id"]
    assert not torch.equal(a["image"], b["image"]) or not torch.equal(a["queries"], b["queries"])
    torch.testing.assert_close(mixed[(index, first)]["queries"], a["queries"], rtol=0, atol=0)
    # sample i of one set and sample i of another no longer share a seed: the same frame in both parts
    twin = MixedDataset([parts[0], parts[0]])
    assert not torch.equal(twin[(0, 0)]["queries"], twin[(12, 0)]["queries"])


def test_a_description_without_val_list_trains_with_validation_off(described_root, tmp_path, capsys):
    """No val_list: eval.every_steps=0 trains, says once that no validation will run and leaves
    checkpoints/last; periodic validation asked for is one clear error naming val_list."""
    text = (described_root / "dense.yaml").read_text()
    bare = described_root / "no_val.yaml"
    bare.write_text("\n".join(line for line in text.splitlines() if not line.startswith("val_list")) + "\n")
    run = tmp_path / "run"
    result = _train(bare, run, 2)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("no validation will run") == 1
    assert (run / "checkpoints" / "last").is_dir() and not (run / "checkpoints" / "best").exists()
    command, env = _train_command(bare, tmp_path / "periodic", 2, ("--set", "eval.every_steps=5"))
    refused = subprocess.run(command, env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "val_list" in refused.stderr and "eval.every_steps=0" in refused.stderr


# --- any camera (spd.camera): labels to the canonical focal in training, back at inference -------------


def test_training_labels_go_to_the_canonical_camera_frame_by_frame():
    from spd.cameras.canonical import labels_to_canonical

    depth = torch.full((3, 1, 2, 2), 2.0)
    batch = {"depth": depth, "focal": torch.tensor([100.0, 200.0, float("nan")])}
    scaled = labels_to_canonical(batch, canonical_focal=400.0)["depth"]
    assert scaled[:, 0, 0, 0].tolist() == [8.0, 4.0, 2.0]  # f_c / f; unknown camera (NaN): as it is
    assert torch.equal(batch["depth"], depth)  # the input batch is unchanged


def test_predictor_converts_to_the_camera_of_the_intrinsics_after_any_resize(tiny_model):
    from spd.predictor import Predictor

    rgb = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    points = [[10, 20], [50.5, 30]]
    f_c = tiny_model.canonical_focal
    full = Predictor(tiny_model, long_side=None)
    plain = full.predict(rgb, points)
    np.testing.assert_allclose(full.predict(rgb, points, intrinsics=(2 * f_c, 2 * f_c, 48, 32)), 2 * plain, rtol=1e-6)
    np.testing.assert_allclose(full.predict(rgb, points, intrinsics=(f_c, 3.0, 48, 32)), plain, rtol=1e-6)  # fx decides
    halved = Predictor(tiny_model, long_side=48)  # the model sees 32 x 48: fx on its image is half the user's
    np.testing.assert_allclose(halved.predict(rgb, points, intrinsics=(2 * f_c, 2 * f_c, 48, 32)), halved.predict(rgb, points),
                               rtol=1e-6)
    xyz = full.predict_points3d(rgb, points, (2 * f_c, 2 * f_c, 48, 32))
    np.testing.assert_allclose(xyz[:, 2], 2 * plain, rtol=1e-6)
    with pytest.raises(ValueError, match="four numbers"):
        full.predict(rgb, points, intrinsics=(1.0, 2.0))


def test_eval_converts_predictions_by_each_frames_focal(described_root, tmp_path):
    """A model that answers the true depth of a camera with focal 2f: evaluated on frames of focal f
    with their intrinsics its depths are halved (abs_rel 0.5); without intrinsics (canonical camera
    assumed) they are taken as they are (abs_rel 0)."""
    import yaml

    from spd.engine.evaluate import evaluate

    with_camera = DescribedDepth(described_root / "dense.yaml", split="test", which="val_list", num_queries=32)
    focal = with_camera[0]["focal"]

    class TrueDepthAtTwiceTheFocal:
        canonical_focal = 2 * focal

        def __init__(self, dataset):
            self.maps, self.calls = [dataset[i]["depth"][0] for i in range(len(dataset))], 0

        def encode(self, images):
            self.calls += 1
            return self.maps[self.calls - 1]

        def decode(self, gt, queries, mask=None, check_values=True):
            u, v = queries[0].long().unbind(-1)
            return gt[v, u][None]

    description = yaml.safe_load((described_root / "dense.yaml").read_text())
    del description["intrinsics"]
    (described_root / "no_camera.yaml").write_text(yaml.safe_dump(description))
    without_camera = DescribedDepth(described_root / "no_camera.yaml", split="test", which="val_list", num_queries=32)
    assert without_camera[0]["focal"] is None
    scored, _ = evaluate(TrueDepthAtTwiceTheFocal(with_camera), with_camera, "sparse", crop="none", progress=False)
    assert scored["abs_rel"] == pytest.approx(0.5, abs=1e-6)
    scored, _ = evaluate(TrueDepthAtTwiceTheFocal(without_camera), without_camera, "sparse", crop="none", progress=False)
    assert scored["abs_rel"] == 0


def test_synth_renders_the_same_room_through_another_lens(tmp_path):
    """`spd synth --intrinsics`: same seed, same room and pose; at twice the focal length, pixel
    (cx + 2d, cy + 2e) looks along the ray of pixel (cx + d, cy + e) of the first camera."""
    from spd.data.synthetic import render_frame

    _, wide = render_frame(7, 60, 80, (60.0, 60.0, 40.0, 30.0))
    _, tele = render_frame(7, 60, 80, (120.0, 120.0, 40.0, 30.0))
    d = np.arange(-10, 10)
    np.testing.assert_array_equal(tele[30 + 2 * d[:, None], 40 + 2 * d[None, :]], wide[30 + d[:, None], 40 + d[None, :]])
    assert main(["synth", "--out", str(tmp_path / "tele"), "--n-train", "1", "--n-test", "1", "--size", "60x80",
                 "--intrinsics", "120,120,40,30", "--workers", "1"]) == 0
    assert (tmp_path / "tele" / "train_files.txt").read_text().split()[2] == "120.0000"
    import yaml

    assert yaml.safe_load((tmp_path / "tele" / "dense.yaml").read_text())["intrinsics"] == [120.0, 120.0, 40.0, 30.0]


def test_ctrl_c_during_training_stops_demo_and_camera_experiment_before_scoring(tmp_path, monkeypatch, capsys):
    """A training run stopped by Ctrl-C (saved, `stopped == "preempted"`) ends `spd demo` and the camera
    experiment in one line and exit 130: nothing is scored or written from a half-trained model."""
    import spd.experiments.camera as experiment
    import spd.experiments.demo as demo

    preempted = lambda *args, **kwargs: {"stopped": "preempted"}  # noqa: E731
    monkeypatch.setattr(demo, "train", preempted)
    monkeypatch.setattr(experiment, "train", preempted)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--n-train", "2", "--n-test", "1", "--size", "32x32"]) == 130
    assert not (tmp_path / "demo" / "metrics.json").exists()
    assert experiment.main(["--out", str(tmp_path / "camera"), "--n-train", "2", "--n-test", "1"]) == 130
    assert not (tmp_path / "camera" / "camera_experiment.json").exists()
    lines = capsys.readouterr().err.splitlines()
    assert "spd demo: interrupted" in lines and lines[-1] == "python -m spd.experiments.camera: interrupted"
