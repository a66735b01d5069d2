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


def test_sparse_run_resumes_bit_exactly(described_root, tmp_path):
    """Stopped by SIGTERM after a few steps (it saves, exits 75), then --resume: the same losses and
    the same weights as an uninterrupted run."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _train(described_root / "sparse.yaml", straight, 6).returncode == 0
    command, env = _train_command(described_root / "sparse.yaml", resumed, 6)
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


@pytest.mark.parametrize("rotation", [0.0, 2.5])
def test_sparse_points_move_with_the_image_onto_the_same_scene_point(described_root, rotation):
    """The same frames and seeds through the dense and the sparse description: every label that
    survives crop, flip (and rotation) sits where the dense map shows the depth it was read from."""
    common = dict(crop_size=(64, 96), rotation_deg=rotation, color_p=0.0, min_depth=1e-3, max_depth=10.0, seed=1)
    dense = DescribedDepth(described_root / "dense.yaml", "train", **common)
    sparse = DescribedDepth(described_root / "sparse.yaml", "train", **common)
    relative = []
    for epoch in range(3):
        dense.set_epoch(epoch)
        sparse.set_epoch(epoch)
        for index in range(4):
            a, b = dense[index], sparse[index]
            torch.testing.assert_close(a["image"], b["image"])  # the same augmentation drawn
            labelled = b["valid"][0] & a["valid"][0]
            assert labelled.sum() > 0
            relative.append(((b["depth"][0] - a["depth"][0]).abs() / a["depth"][0])[labelled])
    relative = torch.cat(relative)
    if rotation == 0.0:
        assert relative.max() < 1e-6  # crop and flip move pixel centres onto pixel centres: exact
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
    assert len(mixed) == 24 and mixed[13]["id"] == parts[1][1]["id"]
    counts = np.zeros(2)
    for epoch in range(200):
        sampler = WeightedEpochSampler(mixed, [1.0, 3.0], seed=0, rank=0, world_size=1)
        sampler.set_epoch(epoch)
        drawn = np.array(list(sampler))
        counts += [(drawn < 12).sum(), (drawn >= 12).sum()]
    assert abs(counts[1] / counts.sum() - 0.75) < 0.02
    again = WeightedEpochSampler(mixed, [1.0, 3.0], seed=0, rank=0, world_size=1)
    again.set_epoch(199)
    assert list(again) == drawn.tolist()
    ranks = [WeightedEpochSampler(mixed, [1.0, 3.0], seed=0, rank=r, world_size=2) for r in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(3)
    assert len(list(ranks[0])) == len(list(ranks[1])) == 12

    run = tmp_path / "mix"
    mix = json.dumps([{"dataset": str(described_root / "sparse.yaml"), "weight": 3}])
    result = _train(described_root / "dense.yaml", run, 2, ["--set", f"data.mix={mix}"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(_losses(run)) == [1, 2]
