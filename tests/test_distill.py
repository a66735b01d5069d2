"""Distillation (issue 41): `spd distill label` with a transformers and an SPD teacher, then training
and evaluation on the labels; Ctrl-C and resume bitwise; shards and torchrun equal one process; the
relative teacher's alignment; every bad input in one line; the two defects on the path (mixed pixel
scales, `depth_scale` mistakes)."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import spd
from spd.cli import main
from spd.distill import label as label_module
from spd.distill.align import aligned_depth, fit_scale_shift
from spd.distill.label import clean_labels
from spd.losses import largest_error_mask, silog_per_image


def _tiny_depth_anything(folder: Path, kind: str = "metric") -> Path:
    """A randomly initialised, tiny transformers Depth Anything with its image processor (no download)."""
    from transformers import DPTImageProcessor, DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=64,
                            image_size=56, patch_size=14, out_indices=[1, 2], out_features=["stage1", "stage2"],
                            reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[16, 32],
                                 fusion_hidden_size=16, head_hidden_size=8, reassemble_factors=[2, 1], patch_size=14,
                                 depth_estimation_type=kind, max_depth=10)
    torch.manual_seed(0)
    model = DepthAnythingForDepthEstimation(config)
    for module in model.modules():  # transformers' init (std 0.02) gives sigmoid(~0) x 10 = 5 m everywhere
        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            torch.nn.init.kaiming_normal_(module.weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder)
    DPTImageProcessor(do_resize=True, size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_teacher(tmp_path_factory):
    return _tiny_depth_anything(tmp_path_factory.mktemp("teacher") / "da_metric")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """8 synthetic rooms at 96 x 128 with sparse point labels; a list of their RGB files."""
    from spd.data.synthetic import generate

    root = generate(tmp_path_factory.mktemp("rooms"), n_train=8, n_test=2, size=(96, 128), holes=True, seed=5,
                    workers=1, progress=False, sparse=40)
    rows = [line.split()[0].lstrip("/") for line in (root / "train_files.txt").read_text().splitlines() if line]
    (root / "images.txt").write_text("".join(f"sync/{row}\n" for row in rows))
    return root


def _label(images_list, teacher, out, *extra) -> int:
    return main(["distill", "label", "--images", str(images_list), "--teacher", str(teacher), "--out", str(out),
                 "--batch-size", "3", *extra])


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _labelling(folder: Path) -> dict:
    """A labelling folder's files, its manifest reduced to its identity (the recorded command names --out)."""
    files = _files(folder)
    files["manifest.json"] = json.loads(files["manifest.json"])["identity"]
    return files


def test_transformers_teacher_labels_train_and_evaluate(tmp_path, hf_teacher, images):
    out = tmp_path / "labels"
    assert _label(images / "images.txt", hf_teacher, out, "--intrinsics", "97.29,97.4,63.55,47.58") == 0
    description = yaml.safe_load((out / "labels.yaml").read_text())
    assert description["intrinsics"] == [97.29, 97.4, 63.55, 47.58]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["teacher"]["kind"] == "transformers:depth_anything" and manifest["teacher"]["space"] == "metric"
    assert len(manifest["teacher"]["config_sha256"]) == 64 and manifest["command"].startswith("spd distill label")
    lines = (out / "train.txt").read_text().splitlines() + (out / "val.txt").read_text().splitlines()
    assert len(lines) == 8

    # Each label is the processor's own post-processing of the teacher's output at the image's size.
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    rgb_path, label_path = lines[0].split()
    rgb = np.array(Image.open(rgb_path).convert("RGB"))
    processor = AutoImageProcessor.from_pretrained(str(hf_teacher))
    model = AutoModelForDepthEstimation.from_pretrained(str(hf_teacher)).eval()
    batch = [np.array(Image.open(line.split()[0]).convert("RGB")) for line in sorted(lines)[:3]]
    with torch.inference_mode():
        outputs = model(**processor(images=batch, return_tensors="pt"))
    expected = processor.post_process_depth_estimation(outputs, target_sizes=[(96, 128)] * 3)
    first = sorted(lines)[0].split()[1]
    label = np.load(out / first)
    assert label.dtype == np.float16 and label.shape == rgb.shape[:2]
    reference = clean_labels(expected[0]["predicted_depth"].numpy(), 10.0)
    np.testing.assert_allclose(label.astype(np.float32), reference, rtol=1e-3, atol=1e-3)
    assert np.ptp(label) > 0.1  # a map, not a constant

    assert main(["data", "check", "--dataset", str(out / "labels.yaml")]) == 0
    run = tmp_path / "student"
    assert main(["train", "--config", "v15_tiny_synth", "--data-root", str(out / "labels.yaml"), "--out", str(run),
                 "--max-steps", "2", "--set", "batch_size=2", "--set", "eval.every_steps=0"]) == 0
    assert main(["eval", "--model", str(run / "checkpoints" / "last"), "--data-root", str(images / "dense_test.yaml")]) == 0


def test_spd_folder_teacher_labels_train_and_evaluate(tmp_path, images):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = spd.build_model("v15-tiny", warn_random_encoder=False, image_long_side=128)
    teacher = spd.save_model(model, tmp_path / "spd_teacher")
    few = tmp_path / "few.txt"
    few.write_text("".join(f"{images / line}\n" for line in (images / "images.txt").read_text().splitlines()[:3]))
    out = tmp_path / "labels"
    assert _label(few, teacher, out, "--val-fraction", "0") == 0
    assert "val_list" not in yaml.safe_load((out / "labels.yaml").read_text()) and not (out / "val.txt").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["teacher"]["kind"] == "spd:spd"
    first = (out / "train.txt").read_text().split()
    label = np.load(out / first[1]).astype(np.float32)
    # The label is the predictor's depth at every pixel centre (float16 storage).
    expected = spd.Predictor(spd.load_model(teacher)).predict(first[0], np.stack(np.meshgrid(
        np.arange(128), np.arange(96)), -1).reshape(-1, 2).astype(np.float32)).reshape(96, 128)
    np.testing.assert_allclose(label, clean_labels(expected, 10.0), rtol=1e-3, atol=1e-3)
    run = tmp_path / "student"
    assert main(["train", "--config", "v15_tiny_synth", "--data-root", str(out / "labels.yaml"), "--out", str(run),
                 "--max-steps", "2", "--set", "batch_size=2", "--set", "eval.every_steps=0"]) == 0
    assert main(["eval", "--model", str(run / "checkpoints" / "last"), "--data-root", str(images / "dense_test.yaml")]) == 0


def test_interrupted_labelling_resumes_to_the_same_bits(tmp_path, hf_teacher, images, monkeypatch):
    straight = tmp_path / "straight"
    assert _label(images / "images.txt", hf_teacher, straight) == 0

    interrupted = tmp_path / "interrupted"
    real_save, calls, seen_partial = np.save, [0], []

    def save_then_ctrl_c(file, array, allow_pickle=False):
        calls[0] += 1
        if calls[0] == 5:  # Ctrl-C half-way through writing the fifth label
            file.write(b"\x93NUMPY half a header")
            raise KeyboardInterrupt
        real_save(file, array, allow_pickle=allow_pickle)
        # at every write, nothing under a label's final name is partial
        for path in (interrupted / "labels").rglob("*.npy"):
            try:
                np.load(path)
            except ValueError:
                seen_partial.append(path)

    monkeypatch.setattr(label_module.np, "save", save_then_ctrl_c)
    assert _label(images / "images.txt", hf_teacher, interrupted) == 130  # "interrupted", not a traceback
    monkeypatch.setattr(label_module.np, "save", real_save)
    written = sorted((interrupted / "labels").rglob("*"))
    finals = [p for p in written if p.is_file()]
    assert len(finals) == 4 and not seen_partial
    assert not [p for p in finals if ".tmp-" in p.name]  # the half-written temporary file was removed
    assert not (interrupted / "labels.yaml").exists()  # the set is incomplete: no description yet
    for path in finals:
        assert path.read_bytes() == (straight / path.relative_to(interrupted)).read_bytes()

    assert _label(images / "images.txt", hf_teacher, interrupted) == 0
    assert _labelling(interrupted) == _labelling(straight)


def test_shards_and_torchrun_ranks_write_one_process_labels(tmp_path, hf_teacher, images):
    single = tmp_path / "single"
    assert _label(images / "images.txt", hf_teacher, single) == 0
    sharded = tmp_path / "sharded"
    assert _label(images / "images.txt", hf_teacher, sharded, "--shard", "1/2") == 0
    assert not (sharded / "labels.yaml").exists()  # shard 0 still to run
    assert _label(images / "images.txt", hf_teacher, sharded, "--shard", "0/2") == 0
    assert _labelling(sharded) == _labelling(single)

    # Two torchrun ranks against one process with the same threads per process: the bits of a float
    # reduction depend on how many threads split it, not on which process runs the batch.
    launch = [sys.executable, "-m", "spd.cli"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "spd.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for launcher, out in ((launch, tmp_path / "one_process"), (torchrun, tmp_path / "torchrun")):
        command = [*launcher, "distill", "label", "--images", str(images / "images.txt"), "--teacher", str(hf_teacher),
                   "--out", str(out), "--batch-size", "3"]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
    ranks, one = _files(tmp_path / "torchrun"), _files(tmp_path / "one_process")
    identity = [json.loads(files.pop("manifest.json"))["identity"] for files in (ranks, one)]  # its command names --out
    assert identity[0] == identity[1] and ranks == one and len(ranks) == 8 + 3  # labels, train.txt, val.txt, labels.yaml


def test_relative_teacher_is_aligned_per_image_or_refused(tmp_path, images, capsys):
    relative = _tiny_depth_anything(tmp_path / "da_relative", kind="relative")
    capsys.readouterr()  # transformers' "Writing model shards" bar
    assert _label(images / "images.txt", relative, tmp_path / "refused") == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "relative disparity" in error[0] and "--align" in error[0]
    assert not (tmp_path / "refused").exists()

    out = tmp_path / "aligned"
    assert _label(images / "images.txt", relative, out, "--align", str(images / "sparse.yaml")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["identity"]["alignment"].endswith("sparse.yaml")
    rgb, label = (out / "train.txt").read_text().splitlines()[0].split()
    from spd.distill.align import AlignmentPoints
    from spd.distill.teachers import load_teacher

    teacher = load_teacher(str(relative))
    batch = [line.split()[0] for line in sorted((out / "train.txt").read_text().splitlines()
                                                + (out / "val.txt").read_text().splitlines())[:3]]
    assert rgb in batch  # the first batch of the sorted images: the teacher saw it with the same companions
    maps = teacher.predict([np.array(Image.open(path).convert("RGB")) for path in batch])
    points = AlignmentPoints(images / "sparse.yaml").points_for(Path(rgb), (96, 128))
    expected, fit = aligned_depth(maps[batch.index(rgb)], points, "disparity")
    assert fit.ok and fit.points == len(points)
    np.testing.assert_allclose(np.load(out / label).astype(np.float32), clean_labels(expected, 10.0), rtol=1e-3, atol=1e-3)


def test_scale_shift_fit_is_exact_in_the_teachers_space():
    rng = np.random.default_rng(0)
    truth = rng.uniform(0.5, 8.0, size=(30, 40)).astype(np.float32)
    disparity_map = (1.0 / truth - 0.05) / 3.0  # the teacher's relative inverse depth: s = 3, t = 0.05
    v, u = rng.integers(0, 30, 50), rng.integers(0, 40, 50)
    points = np.stack([u, v, truth[v, u]], 1).astype(np.float64)
    metric, fit = aligned_depth(disparity_map, points, "disparity")
    assert fit.ok and fit.scale == pytest.approx(3.0, rel=1e-6) and fit.shift == pytest.approx(0.05, abs=1e-6)
    np.testing.assert_allclose(metric, truth, rtol=1e-4)
    assert not fit_scale_shift(np.ones(10), np.arange(10.0)).ok  # a constant map has no scale
    assert not fit_scale_shift(np.arange(2.0), np.arange(2.0)).ok  # fewer than three points
    _, backwards = aligned_depth(-disparity_map, points, "disparity")
    assert not backwards.ok  # a map that runs the wrong way is no label, not negative metres


def test_teacher_invalid_outputs_are_no_label():
    teacher_map = np.array([[1.0, np.nan, np.inf], [-2.0, 0.0, 12.0]], np.float32)
    np.testing.assert_array_equal(clean_labels(teacher_map, 10.0), [[1.0, 0, 0], [0, 0, 0]])


@pytest.fixture(scope="module")
def bad(tmp_path_factory, images):
    root = tmp_path_factory.mktemp("bad_distill")
    (root / "empty").mkdir()
    (root / "broken").mkdir()
    rgb = images / "images.txt"
    first = images / rgb.read_text().splitlines()[0]
    for name in ("a.jpg", "b.jpg"):
        (root / "broken" / name).write_bytes(first.read_bytes())
    (root / "broken" / "c.jpg").write_text("not an image")
    (root / "mixed").mkdir()
    Image.open(first).save(root / "mixed" / "a.png")
    Image.open(first).resize((64, 48)).save(root / "mixed" / "b.png")
    (root / "not_depth").mkdir()
    (root / "not_depth" / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}')
    (root / "not_depth" / "preprocessor_config.json").write_text("{}")
    (root / "no_config").mkdir()
    return root


@pytest.mark.parametrize("case, expected", [
    ("not_depth", "not a transformers depth-estimation model"),
    ("no_config", "not a depth model folder"),
    ("empty", "no images"),
    ("broken", "1 of 3 files are not readable photographs: c.jpg"),
    ("mixed", "images of 2 sizes"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, bad, hf_teacher, images, case, expected, capsys):
    teacher = bad / case if case in ("not_depth", "no_config") else hf_teacher
    source = bad / case if case in ("empty", "broken", "mixed") else images / "images.txt"
    out = tmp_path / "out"
    assert _label(source, teacher, out) != 0
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and expected in error[0] and "Traceback" not in error[0], error
    assert not out.exists()


def test_unreadable_files_can_be_skipped_and_are_recorded(tmp_path, bad, hf_teacher):
    out = tmp_path / "out"
    assert _label(bad / "broken", hf_teacher, out, "--skip-unreadable") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [entry["image"] for entry in manifest["skipped_unreadable"]] == ["c.jpg"]
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["a.npy", "b.npy"]


def test_output_folder_of_another_run_is_refused(tmp_path, hf_teacher, images, capsys):
    out = tmp_path / "labels"
    assert _label(images / "images.txt", hf_teacher, out) == 0
    before = _files(out)
    capsys.readouterr()
    assert _label(images / "images.txt", hf_teacher, out, "--max-depth", "5") == 3
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "another run's labels" in error[0] and "max_depth" in error[0]
    assert _files(out) == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert _label(images / "images.txt", hf_teacher, tmp_path / "other") == 3
    assert "not a labelling folder" in capsys.readouterr().err


def test_mixed_sets_of_different_sizes_are_refused_before_training(tmp_path, images, capsys):
    from spd.data.synthetic import generate

    other = generate(tmp_path / "larger", n_train=4, n_test=1, size=(120, 160), seed=9, workers=1, progress=False)
    run = tmp_path / "run"
    mix = json.dumps([{"dataset": str(other / "dense.yaml"), "weight": 1}])
    code = main(["train", "--config", "v15_tiny_synth", "--data-root", str(images / "dense.yaml"), "--out", str(run),
                 "--max-steps", "2", "--set", f"data.mix={mix}", "--set", "eval.every_steps=0"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "differ in size" in error and "128x96" in error and "160x120" in error
    assert not (run / "checkpoints").exists()


def test_depth_scale_mistake_is_refused_by_check_and_train(tmp_path, images, capsys):
    description = yaml.safe_load((images / "dense.yaml").read_text())
    description.update(root=str(images), depth_scale=100)  # millimetre PNGs read as centimetres: 10x too far
    wrong = tmp_path / "wrong_scale.yaml"
    wrong.write_text(yaml.safe_dump(description))
    assert main(["data", "check", "--dataset", str(wrong)]) == 1
    assert "depth_scale" in capsys.readouterr().out
    code = main(["train", "--config", "v15_tiny_synth", "--data-root", str(wrong), "--out", str(tmp_path / "run"),
                 "--max-steps", "2", "--set", "eval.every_steps=0"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(error) == 1 and "depth_scale (100)" in error[0]


def test_evaluation_without_any_valid_label_is_one_data_error():
    from spd.metrics import MetricAccumulator, NoValidGroundTruth

    accumulator = MetricAccumulator()
    accumulator.update(None)
    with pytest.raises(NoValidGroundTruth, match="depth_scale"):
        accumulator.compute()


def test_trimmed_silog_leaves_out_each_images_largest_errors():
    log_error = torch.tensor([[0.0, 0.1, -0.1, 2.0, 0.05, 0.0, 0.0, 0.0, 0.0, 0.0],
                              [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0]])
    mask = torch.ones_like(log_error, dtype=torch.bool)
    mask[1, 9] = False  # masked entries are never the ones dropped
    dropped = largest_error_mask(log_error, mask, 0.1)
    assert dropped[0].nonzero().flatten().tolist() == [3] and dropped[1].sum() == 0  # floor(0.9) = 0 in image 2
    gt = torch.full_like(log_error, 2.0)
    pred = gt * log_error.exp()
    trimmed = silog_per_image(pred[:1], gt[:1], mask[:1], trim=0.1)
    keep = mask[:1].clone()
    keep[0, 3] = False
    assert float(trimmed) == pytest.approx(float(silog_per_image(pred[:1], gt[:1], keep)), rel=1e-6)
    assert float(silog_per_image(pred, gt, mask, trim=0.0)) == float(silog_per_image(pred, gt, mask))


def test_depth_scale_100_over_real_millimetre_pngs_is_refused(tmp_path, capsys):
    """The review's case on real NYU frames: `depth_scale: 100` reads millimetres as centimetres, the
    median (~30 m) looks like a scene, but almost no label lies in the depth range."""
    sync = Path(__file__).parent / "fixtures" / "nyu_real" / "sync"
    (tmp_path / "list.txt").write_text("".join(f"{sync}/rgb_{i:05d}.jpg {sync}/sync_depth_{i:05d}.png\n"
                                               for i in (0, 50, 100)))
    (tmp_path / "nyu.yaml").write_text("list: list.txt\ndepth_scale: 100\n")
    assert main(["data", "check", "--dataset", str(tmp_path / "nyu.yaml")]) == 1
    printed = capsys.readouterr().out
    assert "of the labels lie in" in printed and "depth_scale (100" in printed
    code = main(["train", "--config", "v15_tiny_synth", "--data-root", str(tmp_path / "nyu.yaml"), "--out",
                 str(tmp_path / "run"), "--max-steps", "1", "--set", "eval.every_steps=0", "--set", "batch_size=1"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 3 and "of the labels lie in" in error and "depth_scale (100)" in error
    (tmp_path / "nyu.yaml").write_text("list: list.txt\ndepth_scale: 1000\n")  # the right unit passes
    assert main(["data", "check", "--dataset", str(tmp_path / "nyu.yaml")]) == 0
