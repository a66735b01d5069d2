"""Issue 27's int8 experiment (`spd.experiments.int8`): a v15-tiny export's encoder quantised on
synthetic rooms, measured against fp32 on speed, depth change and test-split abs_rel."""

import glob
import json
from pathlib import Path

import onnx
import pytest

import spd

pytest.importorskip("onnxruntime", reason="the [export] extra is not installed")

FRAMES = sorted(glob.glob(str(Path(__file__).parent / "fixtures" / "nyu_real" / "*" / "rgb*")))


def test_int8_experiment_quantises_the_encoder_and_measures_it_against_fp32(export_160, synth_root, tmp_path):
    from spd.experiments.int8 import main

    out = tmp_path / "int8"
    assert main(["--export", str(export_160[1]), "--calibration", str(synth_root / "sync"), "--calibration-images", "4",
                 "--images", FRAMES[0], "--test-data", str(synth_root), "--k", "16", "--rounds", "1",
                 "--threads", "1", "--out", str(out)]) == 0
    result = json.loads((out / "int8.json").read_text())
    assert result["calibration_images"] == 4 and result["export_size"] == [120, 160]
    assert set(result["total_ms"]) == {"fp32", "int8"} and all(t > 0 for t in result["total_ms"].values())
    assert 0 <= result["depth_change"]["mean"] <= result["depth_change"]["max"] and result["depth_change"]["images"] == 1
    accuracy = result["test_split"]
    assert result["abs_rel_change"] == pytest.approx(accuracy["int8"]["abs_rel"] / accuracy["fp32"]["abs_rel"] - 1)
    assert result["pays"] == (result["speedup"] >= 1.3 and abs(result["abs_rel_change"]) <= 0.02)
    int8_graph = onnx.load(str(out / "int8_export" / "encoder.onnx"), load_external_data=False).graph
    assert any(node.op_type == "QuantizeLinear" for node in int8_graph.node)
    depth = spd.OnnxPredictor(out / "int8_export").predict(FRAMES[0], [[10.0, 20.0]])  # the manifest's checksum holds
    assert depth.shape == (1,) and depth[0] > 0


def test_int8_experiment_without_calibration_images_says_so(export_160, tmp_path):
    from spd.experiments.int8 import main

    with pytest.raises(SystemExit, match="no .jpg / .png images to calibrate on"):
        main(["--export", str(export_160[1]), "--calibration", str(tmp_path), "--out", str(tmp_path / "out")])
