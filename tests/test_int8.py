"""int8 encoders (issue 27): `spd export --int8` (GRN unfolded, every constant-weight matmul and
convolution quantised, calibrated on synthetic rooms) and the experiment that measures an int8 export
against fp32 on speed, depth change and test-split abs_rel (`spd.experiments.int8`)."""

import glob
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import spd

pytest.importorskip("onnxruntime", reason="the [export] extra is not installed")

FRAMES = sorted(glob.glob(str(Path(__file__).parent / "fixtures" / "nyu_real" / "*" / "rgb*")))


def _int8_inputs(graph) -> tuple[set[str], list]:
    """(op types fed by a DequantizeLinear, MatMul / Gemm / Conv nodes whose weight is a dequantised constant)."""
    producers = {output: node for node in graph.node for output in node.output}
    constants = {tensor.name for tensor in graph.initializer}

    def dequantised(name: str) -> bool:
        return name in producers and producers[name].op_type == "DequantizeLinear"

    fed = {node.op_type for node in graph.node if node.op_type not in ("QuantizeLinear", "DequantizeLinear")
           and any(dequantised(name) for name in node.input)}
    weights = [node for node in graph.node if node.op_type in ("MatMul", "Gemm", "Conv") and len(node.input) > 1
               and dequantised(node.input[1]) and producers[node.input[1]].input[0] in constants]
    return fed, weights


def _assert_grn_sums_in_fp32(graph) -> None:
    """GRN's spatial sum of squares (a MatMul with a constant row of ones) is not quantised."""
    producers = {output: node for node in graph.node for output in node.output}
    constants = {tensor.name for tensor in graph.initializer}
    ones_rows = [node for node in graph.node if node.op_type == "MatMul" and node.input[0] in constants]
    assert ones_rows and not any(name in producers and producers[name].op_type == "DequantizeLinear"
                                 for node in ones_rows for name in node.input)


@pytest.fixture(scope="module")
def int8_export(export_160, synth_root, tmp_path_factory):
    """`spd export --int8` of the shared v15-tiny model folder, calibrated on 6 synthetic rooms; its stdout."""
    import contextlib
    import io
    import warnings

    from spd.cli.main import main

    out = tmp_path_factory.mktemp("int8") / "onnx"
    printed = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(printed):
        warnings.simplefilter("ignore")
        assert main(["export", "--model", str(export_160[0]), "--out", str(out), "--int8", "--calibration",
                     str(synth_root / "sync"), "--calibration-images", "6"]) == 0
    return out, printed.getvalue()


def test_spd_export_int8_quantises_every_mlp_matmul_and_checks_itself(int8_export, export_160):
    out, printed = int8_export
    manifest = json.loads((out / "manifest.json").read_text())
    assert "calibrated on 6 images" in manifest["encoder_quantization"]
    assert "int8 encoder calibrated on 6 images" in printed and "depth change" in printed  # its own check ran
    graph = onnx.load(str(out / "encoder.onnx"), load_external_data=False).graph
    fed, weights = _int8_inputs(graph)
    assert not fed & {"Gelu", "Sqrt", "Div", "ReduceMean"}  # GELU and GRN's norms take fp32 inputs (ORT's "all" would not)
    _assert_grn_sums_in_fp32(graph)
    from timm.models.convnext import ConvNeXtBlock

    blocks = sum(isinstance(module, ConvNeXtBlock) for module in spd.load_model(export_160[0]).modules())
    assert len([node for node in weights if node.op_type != "Conv"]) >= 2 * blocks  # fc1 and fc2 of every block
    fp32_graph = onnx.load(str(export_160[1] / "encoder.onnx"), load_external_data=False).graph
    assert len(_int8_inputs(fp32_graph)[1]) == 0
    decoder = onnx.load(str(out / "decoder.onnx"), load_external_data=False).graph
    assert not any(node.op_type == "DequantizeLinear" for node in decoder.node)  # the decoder stays fp32
    fp32, int8 = spd.OnnxPredictor(export_160[1]), spd.OnnxPredictor(out)  # the manifest's checksums hold
    points = [[10.0, 20.0], [80.0, 60.0], [150.0, 100.0]]
    reference, quantised = fp32.predict(FRAMES[0], points), int8.predict(FRAMES[0], points)
    assert np.all(np.isfinite(quantised)) and np.all(quantised > 0)
    assert not np.array_equal(reference, quantised)  # int8 really runs
    # ... and stays accurate on a real frame it was not calibrated on (synthetic rooms calibrated it):
    # the command's own bound on the mean change, on 256 grid points
    from spd.export.runtime import INT8_MEAN_CHANGE_LIMIT
    from spd.predictor import grid_points

    grid = grid_points(16, 480, 640)
    change = np.abs(int8.predict(FRAMES[0], grid) / fp32.predict(FRAMES[0], grid) - 1)
    assert change.mean() <= INT8_MEAN_CHANGE_LIMIT and np.isfinite(change).all(), (change.mean(), change.max())


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
    assert result["quantization"].startswith("int8 QDQ (weights:")
    int8_graph = onnx.load(str(out / "int8_export" / "encoder.onnx"), load_external_data=False).graph
    fed, weights = _int8_inputs(int8_graph)
    assert weights and not fed & {"Gelu", "Sqrt", "Div", "ReduceMean"}
    _assert_grn_sums_in_fp32(int8_graph)
    depth = spd.OnnxPredictor(out / "int8_export").predict(FRAMES[0], [[10.0, 20.0]])  # the manifest's checksum holds
    assert depth.shape == (1,) and depth[0] > 0


def test_int8_pays_only_with_both_conditions_measured():
    from spd.experiments.int8 import pays

    assert pays(1.5, 0.01) is True and pays(1.5, -0.019) is True
    assert pays(1.5, 0.03) is False and pays(1.2, 0.0) is False
    assert pays(1.5, None) is None  # fast enough, accuracy not measured: no verdict, never a yes
    assert pays(1.2, None) is False


def test_int8_experiment_without_calibration_images_says_so(export_160, tmp_path):
    from spd.experiments.int8 import main

    with pytest.raises(SystemExit, match="no .jpg / .png images to calibrate on"):
        main(["--export", str(export_160[1]), "--calibration", str(tmp_path), "--out", str(tmp_path / "out")])


def test_int8_experiment_measures_an_spd_export_int8_folder(int8_export, export_160, tmp_path):
    from spd.experiments.int8 import main

    out = tmp_path / "measured"
    assert main(["--export", str(export_160[1]), "--int8-export", str(int8_export[0]), "--images", FRAMES[0],
                 "--k", "16", "--rounds", "1", "--threads", "1", "--out", str(out)]) == 0
    result = json.loads((out / "int8.json").read_text())
    assert result["int8_export"] == str(int8_export[0]) and "calibrated on 6 images" in result["quantization"]
    assert result["speedup"] > 0 and result["depth_change"]["images"] == 1
    assert result["pays"] in (False, None)  # no --test-data: never a yes without the accuracy condition
    assert not (out / "int8_export").exists()  # nothing quantised here
    with pytest.raises(SystemExit, match="not an int8 export"):
        main(["--export", str(export_160[1]), "--int8-export", str(export_160[1]), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="--calibration .* or --int8-export"):
        main(["--export", str(export_160[1]), "--out", str(tmp_path / "y")])


def test_int8_check_fails_when_the_export_is_far_from_the_model(export_160):
    """`spd export --int8`'s own check: an export whose depths are far from the model's (here another
    model's export; a calibration unlike the inputs does the same) fails in one line, exit 1."""
    import warnings

    import torch

    from spd.export.runtime import ExportMismatch, check_int8_export

    model = spd.load_model(export_160[0])
    close = check_int8_export(model, export_160[1], [Path(FRAMES[0])], grid=8)
    assert close["mean"] < 1e-4 and close["images"] == 1  # the fp32 export of this very model
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = spd.build_model("v15-tiny", warn_random_encoder=False, image_long_side=160).eval()
    with pytest.raises(ExportMismatch, match="changes depths by .* on average") as caught:
        check_int8_export(other, export_160[1], [Path(FRAMES[0])], grid=8)
    assert caught.value.exit_code == 1


def test_a_calibration_image_of_another_shape_is_named_in_one_line(export_160, tmp_path):
    from PIL import Image

    from spd.errors import UserInputError
    from spd.export.int8 import encoder_input

    square = tmp_path / "square.png"
    Image.new("RGB", (100, 100)).save(square)
    with pytest.raises(UserInputError, match=r"--calibration .*square.png: 100x100 has not the export's aspect ratio \(160x120\)"):
        encoder_input(spd.OnnxPredictor(export_160[1]), square)
    assert encoder_input(spd.OnnxPredictor(export_160[1]), FRAMES[0]).shape == (1, 3, 120, 160)


def test_a_failed_int8_check_leaves_the_previous_export_as_it_was(export_160, synth_root, tmp_path, monkeypatch, capsys):
    """Issue 46: the export's own check runs on the new folder before it replaces --out, so a check that
    fails (here: a bound no int8 encoder meets) leaves the previous export byte for byte and loadable."""
    import hashlib
    import shutil

    from spd.cli.main import main
    from spd.export import runtime

    out = tmp_path / "onnx"
    shutil.copytree(export_160[1], out)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}
    monkeypatch.setattr(runtime, "INT8_MEAN_CHANGE_LIMIT", 0.0)
    code = main(["export", "--model", str(export_160[0]), "--out", str(out), "--int8", "--calibration",
                 str(synth_root / "sync"), "--calibration-images", "2"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(error) == 1 and f"{out}: the int8 encoder changes depths" in error[0]
    assert "held-out" in error[0] and "is unchanged" in error[0]
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())} == before
    assert not list(tmp_path.glob(".onnx.*"))  # no staging folder left behind
    assert spd.OnnxPredictor(out).predict(FRAMES[0], [[10.0, 20.0]]).shape == (1,)


def test_int8_check_images_are_held_out_of_the_calibration():
    from spd.errors import UserInputError
    from spd.export.int8 import split_calibration

    images = [Path(f"{i}.jpg") for i in range(10)]
    assert split_calibration(images, 6) == (images[:6], images[6:10])
    assert split_calibration(images[:5], 6) == (images[:4], images[4:5])  # a small folder: a fifth held out
    with pytest.raises(UserInputError, match="at least 2"):
        split_calibration(images[:1], 6)
