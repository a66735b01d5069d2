"""`spd serve` (issue 16): the HTTP API with FastAPI's test client against the predictor on the real
NYU fixture frames, every bad input's 4xx, and the byte-bounded cache."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
from fastapi.testclient import TestClient  # noqa: E402

import spd  # noqa: E402
from spd.predictor import backproject, grid_points  # noqa: E402
from spd.serve.app import Limits, create_app  # noqa: E402
from spd.serve.cache import FeatureCache, nbytes  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "nyu_real"
FRAME = FIXTURES / "sync" / "rgb_00050.jpg"
OTHER = FIXTURES / "official_test" / "rgb.png"


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture(scope="module")
def predictor(tiny_model):
    return spd.Predictor(tiny_model)


def _client(predictor, cache=None, limits=Limits()):
    cache = cache or FeatureCache(256 * 2**20, 600.0)
    return TestClient(create_app(predictor, "tiny", {"preset": "v15-tiny"}, cache, limits))


def _upload(path=FRAME):
    return {"image": (Path(path).name, Path(path).read_bytes(), "image/jpeg")}


def test_uploaded_image_gives_the_predictors_depths(predictor):
    client = _client(predictor)
    points = [[10, 10], [320.5, 240.25], [639, 479]]
    answer = client.post("/v1/depth", files=_upload(), data={"points": json.dumps(points)})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    np.testing.assert_allclose(body["depth_m"], predictor.predict(str(FRAME), points), rtol=1e-6)
    assert (body["width"], body["height"], body["model"]) == (640, 480, "tiny")
    assert body["points"] == points


def test_image_id_is_reused_for_points_grid_and_intrinsics(predictor):
    client = _client(predictor)
    encoded = client.post("/v1/encode", files=_upload(OTHER)).json()
    image_id = encoded["image_id"]
    points = [[100, 50], [5.5, 470]]
    first = client.post("/v1/depth", json={"image_id": image_id, "points": points}).json()
    np.testing.assert_allclose(first["depth_m"], predictor.predict(str(OTHER), points), rtol=1e-6)
    grid = client.post("/v1/depth", json={"image_id": image_id, "grid": 4}).json()
    np.testing.assert_allclose(grid["depth_m"], predictor.predict(str(OTHER), grid_points(4, 480, 640)), rtol=1e-6)
    camera = [2 * predictor.canonical_focal, 1037.0, 325.58, 253.74]  # twice the canonical focal: twice the depth
    with_xyz = client.post("/v1/depth", data={"image_id": image_id, "points": json.dumps(points),
                                              "intrinsics": json.dumps(camera)}).json()
    np.testing.assert_allclose(with_xyz["depth_m"], 2 * np.array(first["depth_m"]), rtol=1e-6)
    want = backproject(np.array(points), np.array(with_xyz["depth_m"], dtype=np.float32), camera)
    np.testing.assert_allclose(with_xyz["xyz"], want, rtol=1e-5)
    assert "encode" not in with_xyz["timing_ms"]  # decoding only


def test_empty_point_list_is_an_empty_answer(predictor):
    client = _client(predictor)
    image_id = client.post("/v1/encode", files=_upload()).json()["image_id"]
    answer = client.post("/v1/depth", json={"image_id": image_id, "points": []})
    assert answer.status_code == 200
    assert answer.json()["depth_m"] == []


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"


def _tiff() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="TIFF")
    return buffer.getvalue()


BAD_REQUESTS = [
    ("garbage upload", lambda c, i: c.post("/v1/depth", files={"image": ("x.jpg", b"not an image", "image/jpeg")},
                                           data={"points": "[[1, 1]]"}), 400, "unreadable image"),
    ("empty upload", lambda c, i: c.post("/v1/encode", files={"image": ("x.jpg", b"", "image/jpeg")}), 400, "empty"),
    ("no image", lambda c, i: c.post("/v1/depth", json={"points": [[1, 1]]}), 400, "no image"),
    ("nan point", lambda c, i: c.post("/v1/depth", content=f'{{"image_id": "{i}", "points": [[1, 1], [NaN, 2]]}}',
                                      headers={"content-type": "application/json"}), 400, "point 1 is not finite"),
    ("outside point", lambda c, i: c.post("/v1/depth", json={"image_id": i, "points": [[1, 1], [2, 2], [640, 5]]}),
     400, "point 2"),
    ("malformed point", lambda c, i: c.post("/v1/depth", json={"image_id": i, "points": [[1, 1], [2]]}), 400, "point 1 must be"),
    ("points and grid", lambda c, i: c.post("/v1/depth", json={"image_id": i, "points": [[1, 1]], "grid": 2}),
     400, "exactly one of"),
    ("bad grid", lambda c, i: c.post("/v1/depth", json={"image_id": i, "grid": 0}), 400, "'grid' must be"),
    ("too many points", lambda c, i: c.post("/v1/depth", json={"image_id": i, "points": [[1, 1]] * 11}), 413, "11 points"),
    ("bad intrinsics", lambda c, i: c.post("/v1/depth", json={"image_id": i, "points": [[1, 1]], "intrinsics": [1, 2]}),
     400, "intrinsics"),
    ("unknown image_id", lambda c, i: c.post("/v1/depth", json={"image_id": "feed", "points": [[1, 1]]}),
     404, "unknown or expired"),
    ("wrong content type", lambda c, i: c.post("/v1/encode", content=b"x", headers={"content-type": "text/plain"}),
     415, "multipart/form-data"),
    ("bad json", lambda c, i: c.post("/v1/depth", content=b"{", headers={"content-type": "application/json"}),
     400, "not valid JSON"),
    ("oversized upload", lambda c, i: c.post("/v1/encode", files={"image": ("big.png", b"0" * 3000, "image/png")}),
     413, "exceeds the limit"),
    ("points nested 100,000 deep", lambda c, i: c.post(
        "/v1/depth", content=b'{"points": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        headers={"content-type": "application/json"}), 400, "nested too deeply"),
    ("form points nested 100,000 deep", lambda c, i: c.post(
        "/v1/depth", files=_upload(), data={"points": "[" * 100_000 + "]" * 100_000}), 400, "nested too deeply"),
    ("5,000-digit integer in the body", lambda c, i: c.post(
        "/v1/depth", content=f'{{"image_id": "{i}", "points": [[1{"0" * 5000}, 1]]}}',
        headers={"content-type": "application/json"}), 400, "number too large"),
    ("5,000-digit integer in a form field", lambda c, i: c.post(
        "/v1/depth", files=_upload(), data={"points": f'[[1{"0" * 5000}, 1]]'}), 400, "number too large"),
    ("EPS upload", lambda c, i: c.post("/v1/encode", files={"image": ("x.eps", EPS, "application/postscript")}),
     415, "EPS / PostScript uploads are not accepted"),
    ("TIFF upload", lambda c, i: c.post("/v1/encode", files={"image": ("x.tif", _tiff(), "image/tiff")}),
     415, "TIFF uploads are not accepted"),
    ("intrinsics out of range", lambda c, i: c.post(
        "/v1/depth", json={"image_id": i, "points": [[1, 1]], "intrinsics": [1e41, 1e41, 320, 240]}), 400, "not finite"),
]


@pytest.mark.parametrize("name, request_, status, message", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_a_4xx_naming_the_problem(predictor, name, request_, status, message):
    client = _client(predictor, limits=Limits(max_upload_bytes=2000 if name == "oversized upload" else 20 * 2**20,
                                              max_points=65_536 if ("nested" in name or "digit" in name) else 10))  # JSON limit ~ points
    image_id = None if name == "oversized upload" else client.post("/v1/encode", files=_upload()).json()["image_id"]
    answer = request_(client, image_id)
    assert answer.status_code == status, answer.text
    assert message in answer.json()["detail"]


def test_an_eps_upload_never_reaches_pillows_postscript_plugin(predictor, monkeypatch):
    from PIL import EpsImagePlugin

    reached = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: reached.append("open"))
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: reached.append("ghostscript"))
    answer = _client(predictor).post("/v1/depth", files={"image": ("x.eps", EPS, "image/jpeg")},
                                     data={"points": "[[1, 1]]"})
    assert answer.status_code == 415 and "EPS" in answer.json()["detail"] and not reached


def test_expired_image_id_is_refused(predictor):
    clock = Clock()
    client = _client(predictor, FeatureCache(256 * 2**20, ttl_s=60.0, clock=clock))
    image_id = client.post("/v1/encode", files=_upload()).json()["image_id"]
    clock.now = 59.0
    assert client.post("/v1/depth", json={"image_id": image_id, "points": [[1, 1]]}).status_code == 200  # renews
    clock.now = 118.0
    assert client.post("/v1/depth", json={"image_id": image_id, "points": [[1, 1]]}).status_code == 200
    clock.now = 200.0
    answer = client.post("/v1/depth", json={"image_id": image_id, "points": [[1, 1]]})
    assert answer.status_code == 404


def test_cache_evicts_least_recently_used_by_bytes(predictor):
    one_image = nbytes(predictor.encode(str(FRAME)))
    cache = FeatureCache(int(2.5 * one_image), 600.0)
    client = _client(predictor, cache)
    first, second = (client.post("/v1/encode", files=_upload()).json()["image_id"] for _ in range(2))
    client.post("/v1/depth", json={"image_id": first, "points": [[1, 1]]})  # first is now the most recent
    client.post("/v1/encode", files=_upload())  # a third image: evicts `second`
    assert cache.stats()["entries"] == 2 and cache.stats()["bytes"] <= cache.max_bytes
    assert client.post("/v1/depth", json={"image_id": second, "points": [[1, 1]]}).status_code == 404
    assert client.post("/v1/depth", json={"image_id": first, "points": [[1, 1]]}).status_code == 200


def test_nbytes_counts_each_storage_once():
    table = torch.zeros(100, 8)
    assert nbytes([table, table[:10], (table[5:], {"x": table})]) == 100 * 8 * 4
    assert nbytes([table, torch.zeros(3)]) == 100 * 8 * 4 + 12


def test_health_info_page_and_openapi(predictor):
    client = _client(predictor)
    assert client.get("/healthz").json() == {"status": "ok"}
    info = client.get("/v1/info").json()
    assert info["device"] == "cpu" and info["dtype"] == "fp32" and info["cache"]["entries"] == 0
    page = client.get("/")
    assert page.status_code == 200 and "/v1/depth" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # self-contained: no CDN
    assert "/v1/depth" in client.get("/openapi.json").json()["paths"]


def test_load_check_runs_concurrent_clients_against_a_live_server(tiny_model, tmp_path):
    """`spd loadcheck` end to end, short: a live server, its cache filled until it evicts, 3 clients."""
    from spd.serve.loadcheck import run_loadcheck

    folder = spd.save_model(tiny_model, tmp_path / "model")
    result = run_loadcheck(str(folder), clients=3, seconds=3, points=16, images=2, cache_mb=24)
    assert result.errors == 0, result.first_error
    assert result.requests >= 3 and result.latency_p99_ms >= result.latency_p50_ms > 0
    assert result.cache["evictions"] >= 1 and result.cache["bytes"] <= result.cache["max_bytes"]
    assert result.server_peak_rss_mb > 0
