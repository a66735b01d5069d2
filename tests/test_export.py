"""ONNX export (issue 14): v15-tiny (random weights) exported with `spd export`, run on ONNX Runtime,
compared with PyTorch on the real NYU fixture frames; K symbolic; broken export folders refused."""

import glob
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import spd
from conftest import DEVICES
from spd.cli import main

pytest.importorskip("onnxruntime", reason="the [export] extra is not installed")
import onnx  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "nyu_real"
FRAMES = sorted(glob.glob(str(FIXTURES / "*" / "rgb*")))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model):
    """(model folder, export folder) of v15-tiny at NYU's 480 x 640, written through the CLI."""
    root = tmp_path_factory.mktemp("export")
    spd.save_model(tiny_model, root / "model")
    assert main(["export", "--model", str(root / "model"), "--out", str(root / "onnx")]) == 0
    return root / "model", root / "onnx"


def test_onnx_runtime_matches_pytorch_on_real_frames(exported, tiny_model):
    """One session of each graph answers K = 1, 7, 256, 1000 on every fixture frame within 1e-4."""
    predictor = spd.OnnxPredictor(exported[1])
    reference = spd.Predictor(tiny_model)
    rng = np.random.default_rng(0)
    worst = 0.0
    for frame in FRAMES:
        features_onnx, features_torch = predictor.encode(frame), reference.encode(frame)
        for k in (1, 7, 256, 1000):
            points = rng.uniform([0, 0], [639, 479], size=(k, 2))
            got, want = predictor.decode(features_onnx, points), reference.decode(features_torch, points)
            worst = max(worst, float(np.max(np.abs(got - want) / want)))
    assert worst <= 1e-4, worst


def test_onnx_predict_batch_equals_per_image_predict(exported):
    """Issue 42: two same-size images (which `Predictor.predict_batch` stacks into one encoder call, and
    the batch-1 encoder graph refused) and two of different sizes, each exactly `predict`'s answer."""
    from PIL import Image

    predictor = spd.OnnxPredictor(exported[1])
    same = [np.array(Image.open(FRAMES[0]).convert("RGB")), np.array(Image.open(FRAMES[1]).convert("RGB"))]
    half = np.array(Image.open(FRAMES[2]).convert("RGB").resize((320, 240)))  # the export's aspect ratio, resized
    rng = np.random.default_rng(0)
    points = [rng.uniform([0, 0], [639, 479], size=(5, 2)), rng.uniform([0, 0], [639, 479], size=(3, 2)),
              rng.uniform([0, 0], [319, 239], size=(4, 2))]
    for images, sets in (((same[0], same[1]), points[:2]), ((same[0], half), (points[0], points[2]))):
        batched = predictor.predict_batch(list(images), list(sets))
        for image, query, depth in zip(images, sets, batched):
            np.testing.assert_array_equal(depth, predictor.predict(image, query))


@pytest.mark.parametrize("num_queries", [300, 1000])
def test_one_decoder_call_takes_any_k(exported, tiny_model, num_queries):
    """The raw decoder graph, K queries in one call (no chunks; both forms of the canvas write), twice:
    same as PyTorch, same each run (ONNX Runtime's ScatterND add races on duplicate indices; the
    export writes whole row sums without reduction, or reads prefix sums at every row)."""
    import torch

    predictor = spd.OnnxPredictor(exported[1])
    image = torch.randn(1, 3, 480, 640)
    features = predictor._encode_tensor(image)
    queries = torch.rand(1, num_queries, 2) * torch.tensor([639.0, 479.0])
    queries[0, : num_queries // 2] = queries[0, :1] + torch.rand(num_queries // 2, 2)  # half share a few cells
    mask = torch.ones(1, num_queries, dtype=torch.bool)
    first, second = predictor._run_decoder(features, queries, mask), predictor._run_decoder(features, queries, mask)
    with torch.no_grad():
        want = tiny_model.decode(tiny_model.encode(image), queries, mask)
    torch.testing.assert_close(first, want, rtol=1e-4, atol=0)
    assert torch.equal(first, second)


def test_decoder_k_is_symbolic_in_the_saved_graph(exported):
    graph = onnx.load(str(exported[1] / "decoder.onnx"), load_external_data=False).graph
    inputs = {i.name: i.type.tensor_type.shape.dim for i in graph.input}
    assert inputs["queries"][1].dim_param and not inputs["queries"][1].dim_value
    assert inputs["mask"][1].dim_param == inputs["queries"][1].dim_param
    assert inputs["table"][0].dim_value > 0  # the image-size part is fixed
    assert not any(node.op_type in ("GridSample", "Loop", "ScatterND") and _adds(node) for node in _all_nodes(graph))


def test_exported_forms_agree_with_the_eager_ones_and_leave_no_buffer_copies(exported, tiny_model, monkeypatch):
    """Issue 27's exported forms, run eagerly, against the forms PyTorch runs: the canvas cascade that
    writes the whole buffer once (under `export_ops`) and GRN's sum of squares as a MatMul with ones
    (when exporting). The saved decoder has no ScatterND add (ONNX Runtime's racy duplicate-index add)
    and no ScatterND buffer copies of the in-place form: outside the canvas write's If (touched rows
    below 512 queries, prefix sums over all rows from there), its only scatters are the 1-D
    ScatterElements adds of the canvas's per-cell weights and counts; inside, one ScatterND without
    reduction per layer writes the touched rows."""
    import torch

    from spd.models import encoder
    from spd.models.rows import export_ops

    image = torch.randn(1, 3, 96, 128)
    queries = torch.rand(1, 300, 2) * torch.tensor([127.0, 95.0])
    with torch.no_grad():
        features = tiny_model.encode(image)
        want = tiny_model.decode(features, queries)
        with export_ops():
            got = tiny_model.decode(features, queries)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    x = torch.randn(2, 24, 32, 40)
    slices = encoder._spatial_sum_of_squares(x)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    torch.testing.assert_close(encoder._spatial_sum_of_squares(x), slices, rtol=1e-5, atol=0)
    graph = onnx.load(str(exported[1] / "decoder.onnx"), load_external_data=False).graph
    assert not [node.name for node in graph.node if node.op_type == "ScatterND"]
    assert len([node for node in graph.node if node.op_type == "ScatterElements"]) == 2  # weights and counts, not the write
    assert len([node for node in graph.node if node.op_type == "If"]) == 5  # one canvas write per decoder layer
    scatters = [node for node in _all_nodes(graph) if node.op_type == "ScatterND"]
    assert len(scatters) == 5 and not any(_adds(node) for node in scatters)  # the touched rows' writes


def test_ort_profile_sums_node_time_per_op_type_after_the_warm_up_run(exported):
    """`spd bench --backend onnx`'s profile: the warm-up run's events and control-flow nodes are left out,
    the rest summed per op type and divided by the runs; a real graph's times come back largest first."""
    import onnxruntime as ort

    from spd.bench.onnx_profile import _after_warm_up, _sum_by_op_type, op_type_times, top_ops
    from spd.export.runtime import session_options

    def node(op, ts, dur):
        return {"cat": "Node", "name": f"{op}_1_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    events = [{"name": "model_run", "ts": 0, "dur": 100}, node("Conv", 10, 5000), node("Conv", 150, 3000),
              {"name": "model_run", "ts": 120, "dur": 100}, node("Conv", 250, 1000), node("MatMul", 260, 4000),
              node("If", 255, 4500),  # spans the MatMul it runs: its own time would count that twice
              {"name": "model_run", "ts": 240, "dur": 100}]
    assert _sum_by_op_type(_after_warm_up(events), runs=2) == {"MatMul": 2.0, "Conv": 2.0}
    times = op_type_times(ort, exported[1] / "encoder.onnx", session_options(ort, 1),
                          {"image": np.zeros((1, 3, 480, 640), dtype=np.float32)}, runs=2)
    assert times and all(t > 0 for t in times.values()) and list(times.values()) == sorted(times.values(), reverse=True)
    assert "Conv" in times  # ORT's fused op types (Gemm, FusedConv, ...) vary with its version; its convolutions stay
    assert sum(share for _, _, share in top_ops(times, n=len(times))) == pytest.approx(1.0, abs=0.01)


def test_onnx_sessions_sleep_between_runs_instead_of_spinning():
    """ORT's default keeps its worker threads spinning after a run, busy cores that slowed PyTorch by
    ~10 % in the bench's paired rounds; every SPD and baseline session turns it off, and says so."""
    import onnxruntime as ort

    from spd.export.runtime import describe_session_options, session_options

    described = describe_session_options(session_options(ort, 2))
    assert described["intra_op_allow_spinning"] == "0" and described["intra_op_num_threads"] == 2


def _all_nodes(graph):
    """The graph's nodes and those of every subgraph (an If's branches), depth first."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_nodes(subgraph)


def _adds(node) -> bool:
    """GridSample and Loop always count; ScatterND only with reduction add (the racy one)."""
    if node.op_type != "ScatterND":
        return True
    return any(a.name == "reduction" and a.s == b"add" for a in node.attribute)


def _predict_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spd.cli", "predict", *args], capture_output=True, text=True)


def test_cli_predict_onnx_prints_the_pytorch_depths(exported):
    frame = str(FIXTURES / "sync" / "rgb_00050.jpg")
    points = "10,10;320,240;639,479;100.5,400.25"
    torch_run = _predict_cli("--model", str(exported[0]), "--image", frame, "--points", points)
    onnx_run = _predict_cli("--model", str(exported[1]), "--backend", "onnx", "--image", frame, "--points", points)
    assert torch_run.returncode == 0, torch_run.stderr
    assert onnx_run.returncode == 0, onnx_run.stderr
    assert onnx_run.stdout == torch_run.stdout
    assert len(onnx_run.stdout.splitlines()) == 4


def _broken_copy(exported, tmp_path, edit) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(exported[1], folder)
    edit(folder)
    return folder


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_manifest(folder: Path, **changes) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(changes)
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, expected", [
    (lambda f: (f / "encoder.onnx").unlink(), "encoder.onnx: missing"),
    (lambda f: _corrupt(f / "decoder.onnx"), "decoder.onnx: SHA-256 differs"),
    (lambda f: (f / "manifest.json").unlink(), "manifest.json: missing"),
    (lambda f: (f / "manifest.json").write_text("{not json"), "unreadable manifest"),
    (lambda f: _edit_manifest(f, height=240), "says 240x640 but encoder.onnx takes 480x640"),
    (lambda f: _edit_manifest(f, table_shape=[1, 2]), "does not match decoder.onnx"),
])
def test_broken_export_folders_are_refused_in_one_line(exported, tmp_path, edit, expected):
    folder = _broken_copy(exported, tmp_path, edit)
    run = _predict_cli("--model", str(folder), "--backend", "onnx", "--image", FRAMES[0], "--points", "10,10")
    assert run.returncode == 4
    assert expected in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert "Traceback" not in run.stderr


def test_wrong_image_size_is_refused_naming_the_exported_size(exported, tmp_path):
    from PIL import Image

    small = tmp_path / "small.png"
    Image.open(FRAMES[0]).convert("RGB").resize((320, 240)).save(small)
    square = tmp_path / "square.png"
    Image.open(FRAMES[0]).convert("RGB").resize((300, 300)).save(square)
    no_resize = _predict_cli("--model", str(exported[1]), "--backend", "onnx", "--image", str(small), "--points", "5,5",
                             "--max-side", "0")
    assert no_resize.returncode == 2
    assert "image is 320x240 but" in no_resize.stderr and "exported for 640x480 images and resizing is off" in no_resize.stderr
    other_aspect = _predict_cli("--model", str(exported[1]), "--backend", "onnx", "--image", str(square), "--points", "5,5")
    assert other_aspect.returncode == 2
    assert "its aspect ratio differs" in other_aspect.stderr
    resized = _predict_cli("--model", str(exported[1]), "--backend", "onnx", "--image", str(small), "--points", "5,5")
    assert resized.returncode == 0, resized.stderr


@pytest.mark.parametrize("device", DEVICES)
def test_export_leaves_the_callers_model_in_its_mode_on_its_device(tmp_path, device, monkeypatch):
    """A model in train mode (one submodule in eval, as a frozen part would be) on any device comes
    back from `export_onnx` exactly so, also when the export fails; the graphs are traced from the
    model on the CPU in eval mode (the tracing itself is tested above, so it is replaced here)."""
    from spd.export import onnx_export

    seen = []

    def trace(model, *args):
        seen.append((model.training, {p.device.type for p in model.parameters()}))
        if len(seen) == 2:
            raise RuntimeError("tracing failed")

    monkeypatch.setattr(onnx_export, "_export_graphs", trace)
    model = spd.build_model("v15-tiny", warn_random_encoder=False, image_long_side=96).to(device).train()
    model.encoder.eval()
    for attempt in range(2):
        try:
            onnx_export.export_onnx(model, tmp_path / "onnx", height=64, width=96)
        except RuntimeError:
            assert attempt == 1
        assert model.training and not model.encoder.training
        assert all(m.training == (not any(m is e for e in model.encoder.modules())) for m in model.modules())
        assert {p.device.type for p in model.parameters()} == {device}
    assert seen == [(False, {"cpu"})] * 2
