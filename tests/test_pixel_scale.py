"""The pixel-scale rule (issue 25, `spd.cameras.scale`): a model records the long side of its
training frames, and every backend feeds it images at that scale, so the same scene point gets the
same metric depth whatever size the caller gives the image at, on PyTorch and on ONNX Runtime."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import spd
from spd.cameras.scale import DEFAULT_LONG_SIDE, long_side_of, scaled_size
from spd.cli import main

FRAME = Path(__file__).parent / "fixtures" / "nyu_real" / "sync" / "rgb_00000.jpg"  # 640 x 480
NYU_INTRINSICS = (518.86, 519.47, 325.58, 253.74)
SCENE_POINTS = np.array([[159.5, 119.5], [479.5, 359.5], [320.0, 240.0], [40.0, 420.0]])  # in the 640 x 480 frame


@pytest.fixture(scope="module")
def scaled_model(export_160):
    """v15-tiny recording 120 x 160 training frames (the demo's), saved and exported at that scale."""
    model, onnx = export_160
    assert json.loads((onnx / "manifest.json").read_text())["width"] == 160  # `spd export`'s default: the model's scale
    return model, onnx


def _at_size(factor: float):
    """The fixture frame at `factor` x its size, with the scene points and the intrinsics scaled alike."""
    rgb = Image.open(FRAME).convert("RGB")
    size = (round(640 * factor), round(480 * factor))
    resized = np.asarray(rgb.resize(size, Image.Resampling.BILINEAR)) if factor != 1 else np.asarray(rgb)
    points = (SCENE_POINTS + 0.5) * factor - 0.5
    fx, fy, cx, cy = NYU_INTRINSICS
    return resized, points, (fx * factor, fy * factor, (cx + 0.5) * factor - 0.5, (cy + 0.5) * factor - 0.5)


def test_same_scene_points_same_depth_at_any_input_size_on_both_backends(scaled_model):
    model_dir, export_dir = scaled_model
    torch_predictor = spd.Predictor.from_pretrained(model_dir)
    onnx_predictor = spd.OnnxPredictor(export_dir)
    assert torch_predictor.long_side == 160
    depths = {}
    for factor in (0.5, 1.0, 2.0):  # 320 x 240, 640 x 480, 1280 x 960
        rgb, points, intrinsics = _at_size(factor)
        depths[factor] = torch_predictor.predict(rgb, points, intrinsics)
        on_onnx = onnx_predictor.predict(rgb, points, intrinsics)
        np.testing.assert_allclose(on_onnx, depths[factor], rtol=1e-3)
    for factor in (0.5, 2.0):
        np.testing.assert_allclose(depths[factor], depths[1.0], rtol=0.03)


def test_the_trial_commands_print_the_same_depths(scaled_model):
    model_dir, export_dir = scaled_model
    common = ["--image", str(FRAME), "--points", "159.5,119.5;479.5,359.5", "--intrinsics", ",".join(map(str, NYU_INTRINSICS))]
    printed = []
    for backend, model in (("torch", model_dir), ("onnx", export_dir)):
        result = subprocess.run([sys.executable, "-m", "spd.cli", "predict", "--backend", backend, "--model", str(model),
                                 *common], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        printed.append(result.stdout)
    assert printed[0] == printed[1]


def test_training_records_the_frames_long_side_and_old_folders_read_as_nyu(tmp_path, synth_root):
    from spd.config.training import load_config
    from spd.engine.train import train

    cfg = load_config("v15_tiny_synth", ["data.workers=0", "eval.limit=1", "data.crop_size=[64, 96]"])
    cfg.max_steps = 1
    train(cfg, synth_root, tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "checkpoints" / "last" / "config.json").read_text())
    assert saved["image_long_side"] == 128  # synth_root's frames are 96 x 128

    config = tmp_path / "run" / "checkpoints" / "last" / "config.json"
    del saved["image_long_side"]
    config.write_text(json.dumps(saved))
    with pytest.warns(UserWarning, match="no image_long_side recorded"):
        old = spd.load_model(tmp_path / "run" / "checkpoints" / "last")
    assert long_side_of(old) == DEFAULT_LONG_SIDE == 640


def test_scaled_size_keeps_the_aspect_and_the_export_refuses_another_scale(scaled_model, tmp_path):
    assert scaled_size(480, 640, 160) == (120, 160)
    assert scaled_size(3000, 4000, 160) == (120, 160)
    assert scaled_size(100, 50, 160) == (160, 80)  # upscaled too: the model's scale, not a cap
    assert scaled_size(480, 640, None) == (480, 640)
    model_dir, _ = scaled_model
    assert main(["export", "--model", str(model_dir), "--out", str(tmp_path / "x"), "--height", "480",
                 "--width", "640"]) == 2
    assert not (tmp_path / "x" / "encoder.onnx").exists()
