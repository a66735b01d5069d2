"""`spd serve` against careless and hostile clients (issue 29): limits enforced while bodies stream in,
decoding off the event loop in a bounded pool, 503 beyond the queues, /metrics, memory under bursts."""

import asyncio
import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import spd  # noqa: E402
from spd.serve.app import Limits, create_app  # noqa: E402
from spd.serve.cache import FeatureCache  # noqa: E402
from spd.serve.hostile import pixel_bomb  # noqa: E402
from spd.serve.images import ImageRefused, decode_for_model  # noqa: E402
from spd.serve.loadcheck import _peak_rss_mb, _rss_mb, free_port, start_server, stop_server  # noqa: E402
from spd.serve.work import Busy, Stage  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "nyu_real"
FRAME = FIXTURES / "sync" / "rgb_00050.jpg"
MiB = 2**20
MULTIPART = {"content-type": "multipart/form-data; boundary=b"}
FILE_HEAD = b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\nContent-Type: image/png\r\n\r\n'


def chunked(total: int, head: bytes = b"", piece: bytes = b"x" * 65536):
    """A body of `head` + `total` bytes, sent without Content-Length."""
    yield head
    for _ in range(total // len(piece)):
        yield piece


@pytest.fixture(scope="module")
def predictor(tiny_model):
    return spd.Predictor(tiny_model)


def _client(predictor, cache=None, limits=Limits()):
    cache = cache or FeatureCache(256 * MiB, 600.0)
    return TestClient(create_app(predictor, "tiny", {"preset": "v15-tiny"}, cache, limits))


def _encoded(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def test_server_decoding_equals_the_predictors_own(predictor):
    """A PNG (any size) and an EXIF-rotated JPEG decode to exactly what `Predictor.prepare` sees."""
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 256, (900, 1500, 3), dtype=np.uint8))
    rotated = Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display: the upright image is 300 wide, 500 high
    for data in (_encoded(big, "PNG"), _encoded(rotated, "JPEG", exif=exif), FRAME.read_bytes()):
        ours = decode_for_model(data, predictor.model_size, 40_000_000, draft=False)
        theirs = predictor.prepare(Image.open(io.BytesIO(data)))
        assert (ours.height, ours.width) == (theirs.height, theirs.width)
        np.testing.assert_array_equal(ours.seen, theirs.seen)
    assert decode_for_model(_encoded(rotated, "JPEG", exif=exif), predictor.model_size, 10**9).height == 500


def test_large_jpeg_decodes_in_draft_mode_to_the_models_size(predictor):
    """A 2560 x 1920 JPEG: decoded at a DCT scale, still the model's size and the caller's pixels; the
    depths stay within 2 % of a full decode's (the NYU frame, upscaled 4x)."""
    data = _encoded(Image.open(FRAME).resize((2560, 1920), Image.Resampling.BICUBIC), "JPEG", quality=95)
    drafted = decode_for_model(data, predictor.model_size, 40_000_000)
    full = decode_for_model(data, predictor.model_size, 40_000_000, draft=False)
    assert (drafted.height, drafted.width) == (1920, 2560) and drafted.seen.shape == full.seen.shape == (480, 640, 3)
    points = spd.predictor.grid_points(8, 1920, 2560)
    fast = predictor.decode(predictor.encode_prepared(drafted), points)
    slow = predictor.decode(predictor.encode_prepared(full), points)
    assert np.abs(fast / slow - 1).max() < 0.02


def test_pixel_cap_refuses_from_the_header():
    with pytest.raises(ImageRefused, match="exceeds the limit of 1000000 pixels") as refused:
        decode_for_model(pixel_bomb(1100), lambda h, w: (h, w), 1_000_000)
    assert refused.value.status == 413


def test_stage_refuses_beyond_its_queue_at_once():
    async def scenario():
        stage, release = Stage("model", "waiting for the model", workers=1, max_waiting=1), threading.Event()
        running = [asyncio.ensure_future(stage.run(release.wait, 5)) for _ in range(2)]  # one runs, one waits
        await asyncio.sleep(0.05)
        with pytest.raises(Busy, match="--max-queue"):
            await stage.run(lambda: None)
        release.set()
        await asyncio.gather(*running)
        assert stage.active == 0 and stage.refused == 1
        stage.shutdown()

    asyncio.run(scenario())


def test_busy_model_answers_503_with_retry_after_and_health_still_answers(predictor):
    client = _client(predictor, limits=Limits(max_queue=2))
    image_id = client.post("/v1/encode", files={"image": ("f.jpg", FRAME.read_bytes(), "image/jpeg")}).json()["image_id"]
    state = client.app.state.spd
    state.model.active = state.model.capacity  # as if 1 call ran and 2 waited
    answer = client.post("/v1/depth", json={"image_id": image_id, "points": [[1, 1]]})
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
    assert "--max-queue" in answer.json()["detail"]
    assert client.get("/healthz").status_code == 200 and client.get("/v1/info").json()["queues"]["model"] == 3
    state.model.active = 0
    assert client.post("/v1/depth", json={"image_id": image_id, "points": [[1, 1]]}).status_code == 200


def test_encode_larger_than_the_cache_is_a_4xx_naming_cache_mb(predictor):
    client = _client(predictor, FeatureCache(1024, 600.0))
    answer = client.post("/v1/encode", files={"image": ("f.jpg", FRAME.read_bytes(), "image/jpeg")})
    assert answer.status_code == 413 and "--cache-mb" in answer.json()["detail"]


def test_points_as_a_form_field_take_what_max_points_allows(predictor):
    """40,000 points (over starlette's default 1 MiB per form field) work as a form as they do as JSON."""
    client = _client(predictor, limits=Limits(max_points=40_000))
    points = np.random.default_rng(1).uniform([0, 0], [639, 479], (40_000, 2)).tolist()
    text = json.dumps(points)
    assert len(text) > MiB
    answer = client.post("/v1/depth", files={"image": ("f.jpg", FRAME.read_bytes(), "image/jpeg")},
                         data={"points": text})
    assert answer.status_code == 200, answer.text[:300]
    assert len(answer.json()["depth_m"]) == 40_000


def test_json_and_form_bodies_beyond_their_limits_are_413_even_chunked(predictor):
    client = _client(predictor, limits=Limits(max_upload_bytes=MiB, max_points=1000))
    big_json = client.post("/v1/depth", content=chunked(2 * MiB), headers={"content-type": "application/json"})
    assert big_json.status_code == 413 and "--max-points" in big_json.json()["detail"]
    form = client.post("/v1/encode", content=chunked(8 * MiB, FILE_HEAD), headers=MULTIPART)
    assert form.status_code == 413 and "--max-upload-mb" in form.json()["detail"]
    declared = client.post("/v1/encode", content=b"x" * (2 * MiB), headers={"content-type": "multipart/form-data; boundary=b"})
    assert declared.status_code == 413


def test_metrics_parse_and_count_the_requests_sent(predictor):
    client = _client(predictor, limits=Limits(max_upload_bytes=MiB))
    image_id = client.post("/v1/encode", files={"image": ("f.jpg", FRAME.read_bytes(), "image/jpeg")}).json()["image_id"]
    for _ in range(3):
        assert client.post("/v1/depth", json={"image_id": image_id, "points": [[1, 1]]}).status_code == 200
    assert client.post("/v1/depth", json={"image_id": "nope", "points": [[1, 1]]}).status_code == 404
    assert client.post("/v1/encode", content=b"x" * (2 * MiB),
                       headers={"content-type": "multipart/form-data; boundary=b"}).status_code == 413
    assert client.get("/no/such/path").status_code == 404
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    requests = {(s.labels["route"], s.labels["status"]): s.value for s in families["spd_requests"].samples
                if s.name == "spd_requests_total"}
    assert requests == {("/v1/encode", "200"): 1, ("/v1/depth", "200"): 3, ("/v1/depth", "404"): 1,
                        ("/v1/encode", "413"): 1, ("other", "404"): 1}
    latency_counts = {s.labels["route"]: s.value for s in families["spd_request_seconds"].samples
                      if s.name == "spd_request_seconds_count"}
    assert latency_counts["/v1/depth"] == 4
    model = {s.labels["stage"]: s.value for s in families["spd_model_seconds"].samples if s.name.endswith("_count")}
    assert model == {"encode": 1, "decode": 3}
    value = lambda name: next(s.value for s in families[name].samples)  # noqa: E731
    assert (value("spd_cache_hits"), value("spd_cache_misses"), value("spd_cache_entries")) == (3, 1, 1)
    assert value("spd_cache_bytes") > 0
    depths = {s.labels["stage"]: s.value for s in families["spd_queue_depth"].samples}
    assert depths == {"decode": 0, "model": 0, "parse": 0}


@pytest.fixture(scope="module")
def live_server(tiny_model, tmp_path_factory):
    """`spd serve` of v15-tiny in a subprocess, 1 MiB upload limit, 64 MB cache: (url, pid)."""
    folder = spd.save_model(tiny_model, tmp_path_factory.mktemp("served") / "model")
    port = free_port()
    server = start_server(str(folder), port, ["--cache-mb", "64", "--max-upload-mb", "1"])
    yield f"http://127.0.0.1:{port}", server.pid
    stop_server(server)


def test_chunked_8mib_body_is_413_without_growing_memory(live_server):
    import httpx

    url, pid = live_server
    with httpx.Client(base_url=url, timeout=60) as client:
        client.get("/healthz")
        before = _rss_mb(pid)
        answer = client.post("/v1/encode", headers=MULTIPART, content=chunked(8 * MiB, FILE_HEAD))
        assert answer.status_code == 413, answer.text
        assert _rss_mb(pid) - before < 16


def test_forty_concurrent_pixel_bombs_stay_bounded_in_memory(live_server):
    """40 uploads at once of a 6000 x 6000 PNG: 200 or 503 each (never 500 or dropped), peak resident memory
    <= 1.5 GiB, and back within 300 MiB of idle a few seconds after."""
    import time

    import httpx

    url, pid = live_server
    bomb = pixel_bomb(6000)
    idle = _rss_mb(pid)
    statuses = []

    def upload():
        with httpx.Client(base_url=url, timeout=300) as client:
            try:
                statuses.append(client.post("/v1/encode", files={"image": ("b.png", bomb, "image/png")}).status_code)
            except httpx.HTTPError as err:
                statuses.append(repr(err))

    threads = [threading.Thread(target=upload) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
    assert _peak_rss_mb(pid) <= 1.5 * 1024
    time.sleep(3)
    assert _rss_mb(pid) - idle <= 300


def test_hostile_load_check_runs_and_every_hostile_request_is_answered(tiny_model, tmp_path):
    """`spd loadcheck --hostile`, short: normal clients see no error, hostile requests get 2xx / 4xx / 503,
    never a 500 or a dropped connection (the committed 30-s run is docs/serve_hostile.json)."""
    from spd.serve.hostile import run_hostile

    folder = spd.save_model(tiny_model, tmp_path / "model")
    result = run_hostile(str(folder), clients=2, seconds=6, points=16, images=1, cache_mb=24, settle_s=1,
                         serve_args=["--max-image-pixels", "2000000"], bomb_sides=(1000, 1500), burst=10)
    assert result.normal_errors == 0, result.first_normal_error
    assert result.hostile_failures == 0, result.hostile_answers
    answered = {cls for counts in result.hostile_answers.values() for cls in counts}
    assert "4xx" in answered and answered <= {"2xx", "4xx", "503"}
    assert "large JSON of empty objects" in result.hostile_answers  # (its worker process starts on the first)
    assert result.healthz_requests > 10 and result.server_peak_rss_mb >= result.server_idle_rss_mb > 0
