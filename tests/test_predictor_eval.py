"""Evaluation protocols and the user-facing predictor / CLI (issue 5)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from spd import Predictor, save_model
from spd.data import NYUDepth
from spd.engine.evaluate import dense_query_order, evaluate
from spd.predictor import backproject


class Oracle:
    """Returns the ground truth at every query: the protocols must then report a perfect score."""

    def __init__(self, dataset):
        self.maps = [dataset[i]["depth"][0] for i in range(len(dataset))]
        self.calls = 0

    def encode(self, images):
        gt = self.maps[self.calls]
        self.calls += 1
        return gt

    def decode(self, gt, queries, mask=None, check_values=True):
        u, v = queries[0].long().unbind(-1)
        return gt[v, u][None]


def test_dense_protocol_with_an_oracle_is_perfect(synth_root):
    dataset = NYUDepth(synth_root / "official_splits/test", synth_root / "test_files.txt", split="test")
    metrics, acc = evaluate(Oracle(dataset), dataset, "dense", crop="none", chunk=1000, progress=False)
    assert acc.count == 4
    assert metrics["abs_rel"] == 0
    assert metrics["rmse"] == 0
    assert metrics["delta1"] == 1


def test_sparse_protocol_with_an_oracle_is_perfect(synth_root):
    dataset = NYUDepth(synth_root / "official_splits/test", synth_root / "test_files.txt", split="test",
                       num_queries=64, eval_crop="none")
    metrics, _ = evaluate(Oracle(dataset), dataset, "sparse", crop="none", progress=False)
    assert metrics["abs_rel"] == 0
    assert metrics["delta1"] == 1


def test_dense_order_is_fixed_per_seed():
    valid = torch.rand(30, 40) > 0.3
    a, b = dense_query_order(valid, 0, "x"), dense_query_order(valid, 0, "x")
    assert torch.equal(a, b)
    assert not torch.equal(a, dense_query_order(valid, 1, "x"))
    assert a.shape[0] == int(valid.sum())
    assert valid[a[:, 1].long(), a[:, 0].long()].all()


@pytest.fixture(scope="module")
def predictor(tiny_model):
    return Predictor(tiny_model, "cpu")


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    rgb = np.random.default_rng(0).integers(0, 256, size=(70, 101, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("img") / "picture.png"
    Image.fromarray(rgb).save(path)
    return rgb, path


def test_every_image_form_gives_the_same_depth(predictor, picture):
    rgb, path = picture
    points = [[0, 0], [100, 69], [50.5, 30.25], [3, 60]]
    reference = predictor.predict(path, points)
    assert reference.dtype == np.float32
    assert reference.shape == (4,)
    for form in (str(path), Image.open(path), rgb, torch.from_numpy(rgb).permute(2, 0, 1),
                 torch.from_numpy(rgb).float().permute(2, 0, 1) / 255.0):
        np.testing.assert_allclose(predictor.predict(form, points), reference, rtol=1e-6)


def test_point_set_sizes_and_borders(predictor, picture):
    rgb, _ = picture
    assert predictor.predict(rgb, [[5, 5]]).shape == (1,)
    assert predictor.predict(rgb, np.zeros((0, 2))).shape == (0,)
    many = np.random.default_rng(1).uniform([-0.5, -0.5], [100.5, 69.5], size=(10_000, 2))
    depth = predictor.predict(rgb, many)
    assert depth.shape == (10_000,)
    assert np.isfinite(depth).all()
    border = [[-0.5, -0.5], [100.5, 69.5], [0, 69], [100, 0]]
    assert np.isfinite(predictor.predict(rgb, border)).all()
    # Chunked decoding is deterministic, and encode once / decode many matches predict.
    feats = predictor.encode(rgb)
    np.testing.assert_array_equal(predictor.decode(feats, many), depth)


@pytest.mark.parametrize(
    "points, message",
    [
        ([[1, 1], [2, float("nan")]], "point 1 is not finite"),
        ([[1, 1], [5, 5], [101, 5]], "point 2 .* outside"),
        ([[1, 1], [5, -1]], "point 1 .* outside"),
        ([[1, 2, 3]], "shape"),
        ([1, 2], "shape"),
    ],
)
def test_bad_points_name_the_first_bad_index(predictor, picture, points, message):
    with pytest.raises(ValueError, match=message):
        predictor.predict(picture[0], points)


def test_backprojection():
    xyz = backproject(np.array([[320.0, 240.0], [420.0, 140.0]]), np.array([2.0, 4.0]), (500, 500, 320, 240))
    np.testing.assert_allclose(xyz, [[0, 0, 2], [0.8, -0.8, 4]], atol=1e-6)


def test_predict_batch(predictor, picture):
    rgb, path = picture
    out = predictor.predict_batch([rgb, path], [[[1, 1]], [[2, 2], [3, 3]]])
    assert [o.shape for o in out] == [(1,), (2,)]


@pytest.mark.parametrize("chunk_size", [256, 6])
def test_predict_batch_is_one_batched_call_with_predicts_depths(tiny_model, chunk_size):
    """Images of one model size are encoded together and their point sets decoded in one padded call
    (one by one in chunks when a set exceeds chunk_size): the depths `predict` gives each image, also
    for an empty set, another size in the same batch, and a camera."""
    generator = np.random.default_rng(3)
    images = [generator.integers(0, 256, size=shape, dtype=np.uint8) for shape in ((70, 101, 3), (70, 101, 3), (48, 64, 3), (70, 101, 3))]
    points = [generator.uniform([0, 0], [image.shape[1] - 1, image.shape[0] - 1], size=(k, 2))
              for image, k in zip(images, (5, 9, 4, 0))]
    cameras = [None, (90.0, 90.0, 50.0, 35.0), None, None]
    predictor = Predictor(tiny_model, "cpu", chunk_size=chunk_size)
    calls = []
    decode_batch = predictor._decode_batch
    predictor._decode_batch = lambda features, queries: calls.append(len(queries)) or decode_batch(features, queries)
    batched = predictor.predict_batch(images, points, cameras)
    assert calls == ([3] if chunk_size == 256 else [])  # the three 70x101 images in one call; 9 > 6: one by one
    for image, query, camera, depth in zip(images, points, cameras, batched):
        np.testing.assert_allclose(depth, predictor.predict(image, query, camera), rtol=1e-5, atol=1e-6)
        assert depth.dtype == np.float32 and depth.shape == (len(query),)
    with pytest.raises(ValueError, match="point 0"):
        predictor.predict_batch(images[:2], [points[0], [[1000.0, 1.0]]])


def test_spd_predict_cli_writes_json_csv_and_a_readable_overlay(tmp_path, tiny_model, picture):
    _, path = picture
    model_dir = save_model(tiny_model, tmp_path / "model")
    base = [sys.executable, "-m", "spd.cli", "predict", "--model", str(model_dir), "--image", str(path)]
    subprocess.run(base + ["--points", "10,20;50.5,30", "--out", str(tmp_path / "o.json"), "--vis", str(tmp_path / "v.png"),
                           "--intrinsics", "100,100,50,35"], check=True, capture_output=True)
    result = json.loads((tmp_path / "o.json").read_text())
    assert [p["u"] for p in result["points"]] == [10, 50.5]
    assert "z_m" in result["points"][0]
    overlay = np.asarray(Image.open(tmp_path / "v.png"))
    assert overlay.shape[0] > 300
    assert overlay.shape[1] > 400
    assert overlay.std() > 10
    subprocess.run(base + ["--grid", "4", "--out", str(tmp_path / "o.csv")], check=True, capture_output=True)
    assert (tmp_path / "o.csv").read_text().count("\n") == 17
    bad = subprocess.run(base + ["--points", "10,20;500,30"], capture_output=True, text=True)
    assert bad.returncode != 0
    assert "point 1" in bad.stderr


def test_torch_hub_entry_point(tmp_path, tiny_model):
    from pathlib import Path

    folder = save_model(tiny_model, tmp_path / "model")
    repo = Path(__file__).resolve().parents[1]
    model = torch.hub.load(str(repo), "spd_v15", source="local", weights=str(folder))
    images, queries = torch.randn(1, 3, 64, 96), torch.tensor([[[5.0, 6.0]]])
    with torch.no_grad():
        torch.testing.assert_close(model(images, queries), tiny_model(images, queries))


def test_features_copied_out_of_a_cuda_graph_are_whole_and_separate(tiny_model):
    """`copy_tensors` (what a compiled predictor on CUDA applies to the encoder's outputs, whose memory
    the graph's next replay overwrites): every tensor copied, nothing shared, the same depths."""
    from spd.predictor import copy_tensors
    from spd.serve.cache import nbytes

    images, queries = torch.randn(1, 3, 64, 96), torch.tensor([[[3.0, 4.0], [90.0, 60.0]]])
    with torch.inference_mode():
        features = tiny_model.encode(images)
        copied = copy_tensors(features)
        assert copied.table.data_ptr() != features.table.data_ptr()
        assert copied.seed_index.base.data_ptr() != features.seed_index.base.data_ptr()
        assert copied.msda_values[0][0].data_ptr() != features.msda_values[0][0].data_ptr()
        assert copied.layout == features.layout
        torch.testing.assert_close(tiny_model.decode(copied, queries), tiny_model.decode(features, queries), rtol=0, atol=0)
        # one copy of each storage, views rebuilt on it: no larger than what it copies (issue 46: was 3.8x)
        assert nbytes(copied) == nbytes(features)
        assert copied.l1.untyped_storage().data_ptr() == copied.table.untyped_storage().data_ptr()  # still a view
        assert nbytes([features, copied]) == 2 * nbytes(features)  # and shares no storage with it


def test_compiled_predictor_compiles_only_its_sizes_and_warms_them_up(tiny_model, monkeypatch):
    """Issue 46: `compile_sizes` bounds what compiles (a server never stalls on a new aspect ratio):
    images the model sees at those sizes run the compiled graphs, every other size the eager model,
    and `warm_up` runs each compiled graph (encode per size, decode per K bucket) before any request.
    The compiled callables are stand-ins that record their calls (compiling costs minutes on a CPU)."""
    import spd.predictor as predictor_module
    from spd.errors import UserInputError

    calls = []

    def recording(model, device):
        def encode(images):
            calls.append(("encode", tuple(images.shape[-2:])))
            return model.encode(images)

        def decode(features, queries, mask=None, check_values=True):
            calls.append(("decode", features.image_size, queries.shape[1]))
            return model.decode(features, queries, mask, check_values=check_values)

        return encode, decode

    monkeypatch.setattr(predictor_module, "compiled_encode_decode", recording)
    compiled = Predictor(tiny_model, compile=True, compile_sizes=[(96, 128)], chunk_size=64, long_side=None)
    compiled.warm_up()
    assert [c for c in calls if c[0] == "encode"] == [("encode", (96, 128))]
    assert sorted(c[2] for c in calls if c[0] == "decode") == list(compiled.buckets)  # every K bucket once
    calls.clear()
    eager = Predictor(tiny_model, long_side=None)
    rng = np.random.default_rng(0)
    for height, width, expect_compiled in ((96, 128, True), (64, 160, False)):
        image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        points = rng.uniform([0, 0], [width - 1, height - 1], size=(10, 2))
        np.testing.assert_allclose(compiled.predict(image, points), eager.predict(image, points), rtol=1e-5)
        assert bool(calls) == expect_compiled, (height, width, calls)
        calls.clear()
    with pytest.raises(UserInputError, match="compile=True"):
        Predictor(tiny_model, compile_sizes=[(96, 128)])
