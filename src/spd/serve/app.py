"""`spd serve`'s HTTP API (FastAPI): encode an image once, then ask for depth at any points of it.

    POST /v1/encode   multipart `image`                          -> {image_id, width, height, ...}
    POST /v1/depth    multipart `image` or `image_id`, `points` (JSON [[u, v], ...]) or `grid` (N),
                      optional `intrinsics` (JSON [fx, fy, cx, cy]: depth for that camera, and xyz; without
                      them the model's canonical camera, spd.camera); or the same as a JSON body with
                      `image_id`                                  -> {depth_m, points, xyz?, width, height, model, ...}
    GET  /healthz, /v1/info, /metrics (Prometheus), /docs (OpenAPI), /  (the click-for-depth page, `page.html`)

Every bad input is a 4xx JSON `{"detail": "..."}` naming the problem (the first bad point by index),
never a 500. How the service stays up under hostile traffic:
- bodies are limited while they stream in (`limits.BodyLimit`: 413 the moment the limit is passed);
- images are decoded in a bounded pool of threads (`images.decode_for_model`), never on the event loop;
- large JSON bodies are parsed in a worker process (`fields`), only their compact form queued;
- the model runs on one thread of its own (its calls are serialised; on a CPU it uses every core);
- each of those stages admits a bounded number of requests (`work.Stage`), beyond which 503 at once;
- the event loop only parses and routes, so /healthz, /v1/info and /metrics never wait behind work.
Encoded images live in a `FeatureCache` (LRU by bytes, with expiry).
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from spd.allocator import release_free_memory
from spd.errors import UserInputError
from spd.predictor import ImageFeatures, PreparedImage, Predictor, backproject, check_points, grid_points
from spd.data.provenance import summary
from spd.serve import fields, schema
from spd.serve.cache import FeatureCache
from spd.serve.images import ImageRefused, decode_for_model
from spd.serve.limits import BodyLimit, BodyTooLarge, Limits
from spd.serve.metrics import MetricsMiddleware, ServiceMetrics
from spd.serve.work import Busy, Stage

__all__ = ["Limits", "create_app"]
BIG_IMAGE_PIXELS = 8_000_000  # after decoding one this large, freed memory is handed back to the OS when idle


@dataclass
class ServerState:
    predictor: Predictor
    model_name: str
    model_info: dict
    cache: FeatureCache
    limits: Limits
    decoding: Stage
    model: Stage
    metrics: ServiceMetrics
    parsing: Stage | None = None  # large request bodies' JSON (`_parsed_fields`)
    parse_process: Any = None  # its worker process (a ProcessPoolExecutor), started on first use
    trim_pending: bool = False  # a big image was decoded since freed memory was last handed back


def _bad(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


def create_app(predictor: Predictor, model_name: str, model_info: dict, cache: FeatureCache,
               limits: Limits = Limits()) -> FastAPI:
    """The FastAPI app around one predictor. `model_info` is what /v1/info reports about the model."""
    decoding = Stage("decode", "decoding images", limits.decode_workers, limits.max_queue, low_priority=True)
    model = Stage("model", "waiting for the model", 1, limits.max_queue)
    parsing = Stage("parse", "parsing large request bodies", 1, limits.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        decoding.shutdown()
        model.shutdown()
        parsing.shutdown()
        if state.parse_process is not None:
            state.parse_process.shutdown(cancel_futures=True)

    app = FastAPI(title="SPD depth service", version="1", lifespan=lifespan,
                  description="Metric depth at the pixels you ask for: encode an image once, query points many times. "
                              "No authentication of its own: put it behind your reverse proxy.")
    metrics = ServiceMetrics(cache, {"decode": decoding, "model": model, "parse": parsing})
    state = ServerState(predictor, model_name, model_info, cache, limits, decoding, model, metrics, parsing)
    app.state.spd = state
    app.add_middleware(BodyLimit, limits=limits)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # added last: outermost, so it sees the 413s too

    _add_service_routes(app, state)

    @app.post("/v1/encode", openapi_extra=schema.encode_request_body(limits), response_model=None,
              responses={200: {"model": schema.EncodeAnswer}, **schema.ERRORS})
    async def encode(request: Request) -> dict:
        """multipart/form-data with an `image` file -> its `image_id` for later /v1/depth calls."""
        form = await _form(request, limits)
        prepared = await _decoded(state, await _upload(form, limits))
        image_id, features, encode_ms = await model.run(_encode_and_cache, state, prepared)
        if image_id is None:
            raise _bad(413, f"this image's encoded features ({_mb(features)} MB) do not fit the whole image cache "
                            f"({cache.max_bytes / 2**20:.0f} MB): start spd serve with a larger --cache-mb")
        return {"image_id": image_id, "width": features.width, "height": features.height, "model": model_name,
                "expires_after_s": cache.ttl_s, "timing_ms": {"encode": encode_ms}}

    @app.post("/v1/depth", openapi_extra=schema.depth_request_body(limits), response_model=None,
              responses={200: {"model": schema.DepthAnswer}, **schema.ERRORS})
    async def depth(request: Request) -> dict:
        """Depth [m] at points: multipart (`image` file or `image_id`; `points` JSON or `grid`;
        optional `intrinsics` JSON) or a JSON body {image_id, points | grid, intrinsics?}.
        With an uploaded image whose features do not fit the cache, the answer's `image_id` is null."""
        asked, upload = await _depth_request(request, state)
        if upload is not None and "image_id" in asked:
            raise _bad(400, "send either an 'image' file or an 'image_id', not both")
        prepared = await _decoded(state, upload) if upload is not None else None
        return await model.run(_answer_depth, state, asked, prepared, quick=prepared is None)

    return app


def _add_service_routes(app: FastAPI, state: ServerState) -> None:
    """Error mapping, the page, /healthz, /metrics and /v1/info: answered on the event loop, never queued."""
    @app.exception_handler(UserInputError)
    async def user_input_error(request: Request, err: UserInputError):
        return JSONResponse({"detail": " ".join(str(err).split())}, status_code=400)

    @app.exception_handler(Busy)
    async def busy(request: Request, err: Busy):
        return JSONResponse({"detail": str(err)}, status_code=503, headers={"Retry-After": "1"})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return resources.files("spd.serve").joinpath("page.html").read_text()

    @app.get("/healthz", response_model=None, responses={200: {"model": schema.Health}})
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/info", response_model=None, responses={200: {"model": schema.Info}})
    async def info() -> dict:
        predictor = state.predictor
        return {"model": state.model_name, "trained_on": summary(getattr(predictor, "trained_on", None)),
                "config": state.model_info, "device": str(predictor.device),
                "dtype": predictor.dtype, "chunk_size": predictor.chunk_size, "cache": state.cache.stats(),
                "limits": asdict(state.limits), "queues": {"decode": state.decoding.active, "model": state.model.active}}


def _mb(features: ImageFeatures) -> str:
    from spd.serve.cache import nbytes

    return f"{nbytes(features) / 2**20:.1f}"


async def _decoded(state: ServerState, data: bytes) -> PreparedImage:
    """The upload decoded for the model in the decoding pool (400 / 413 for refused images)."""
    try:
        prepared = await state.decoding.run(decode_for_model, data, state.predictor.model_size,
                                            state.limits.max_image_pixels)
    except ImageRefused as err:
        raise _bad(err.status, str(err)) from None
    except UserInputError as err:  # model_size: an exported model that cannot take this aspect ratio
        raise _bad(400, " ".join(str(err).split())) from None
    # A burst of big images must not leave the server at its peak: once the pool is idle after one, the
    # freed heap goes back to the OS (checked after every decode, so a small one finishing last still trims).
    state.trim_pending = state.trim_pending or prepared.height * prepared.width >= BIG_IMAGE_PIXELS
    if state.trim_pending and state.decoding.submit_when_idle(release_free_memory):
        state.trim_pending = False
    return prepared


async def _form(request: Request, limits: Limits):
    kind = request.headers.get("content-type", "")
    if not kind.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise _bad(415, f"expected multipart/form-data (an 'image' file and fields) or JSON, got content type {kind or 'none'!r}")
    try:  # a text field (points) may be as large as --max-points needs
        return await request.form(max_files=1, max_fields=8, max_part_size=limits.max_json_bytes)
    except BodyTooLarge:
        raise
    except Exception as err:  # starlette's MultiPartException and parser errors
        raise _bad(400, f"unreadable multipart body ({err})") from None


async def _upload(form, limits: Limits) -> bytes:
    """The bytes of the form's `image` file (the body limit has already bounded them)."""
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise _bad(400, "no 'image' file in the form (send the image as a file field named 'image')")
    data = await upload.read(limits.max_upload_bytes + 1)
    if len(data) > limits.max_upload_bytes:
        raise _bad(413, f"image upload exceeds the limit of {limits.max_upload_bytes} bytes (spd serve --max-upload-mb)")
    return data


async def _depth_request(request: Request, state: ServerState) -> tuple[dict, bytes | None]:
    """The request's compact fields (`spd.serve.fields`: parsed and checked in the decoding pool, not on
    the event loop) and its image bytes, if uploaded."""
    limits = state.limits
    kind = request.headers.get("content-type", "")
    if kind.startswith("application/json"):
        body = await request.body()
        return await _parsed_fields(state, fields.parse_json_body, body, len(body)), None
    form = await _form(request, limits)
    texts: dict[str, str] = {}
    for name in fields.FIELD_NAMES:
        value = form.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise _bad(400, f"form field {name!r} must be text, not a file")
        texts[name] = value
    upload = await _upload(form, limits) if form.get("image") is not None else None
    size = sum(len(text) for text in texts.values())
    return await _parsed_fields(state, fields.parse_form_fields, texts, size), upload


# Bodies up to this size are parsed on the event loop (json.loads: well under a millisecond). Larger
# ones (up to the JSON limit, ~3 MiB: ~56 ms and ~70 MiB of Python objects) go to a worker process
# through the parse stage (bounded by its queue): json.loads holds the GIL throughout, so in a thread
# it would still stall the event loop; in a process it stalls nothing, and its objects never live in
# the server. They never wait behind image decodes: a normal client's request never queues at all.
INLINE_PARSE_BYTES = 64 * 1024


async def _parsed_fields(state: ServerState, parse, payload, size: int) -> dict:
    if size <= INLINE_PARSE_BYTES or state.parsing is None:
        return parse(payload, state.limits)
    outcome = await state.parsing.run(_parse_in_worker, state, parse.__name__, payload)
    if outcome[0] == "refused":
        raise _bad(outcome[1], outcome[2])
    return outcome[1]


def _parse_in_worker(state: ServerState, parse_name: str, payload) -> tuple:
    """On the parse stage's thread: the parse in the worker process (started on first use), its outcome."""
    if state.parse_process is None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        state.parse_process = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    return state.parse_process.submit(fields.parse_outcome, parse_name, payload, state.limits).result()


def _encode_and_cache(state: ServerState, prepared: PreparedImage) -> tuple[str | None, ImageFeatures, float]:
    """On the model's thread: encode, cache (None when the features alone exceed the cache), time."""
    start = time.perf_counter()
    features = state.predictor.encode_prepared(prepared)
    seconds = time.perf_counter() - start
    state.metrics.model_time.labels("encode").observe(seconds)
    return state.cache.put(features), features, seconds * 1000


def _answer_depth(state: ServerState, asked: dict, prepared: PreparedImage | None) -> dict:
    """On the model's thread: the depth answer for a parsed request (points validated here, off the loop)."""
    timing: dict[str, float] = {}
    if prepared is not None:
        image_id, features, timing["encode"] = _encode_and_cache(state, prepared)
    else:
        image_id = asked.get("image_id")
        if not isinstance(image_id, str) or not image_id:
            raise _bad(400, "no image: send an 'image' file, or the 'image_id' of an earlier /v1/encode")
        features = state.cache.get(image_id)
        if features is None:
            raise _bad(404, f"image_id {image_id!r} is unknown or expired: send the image again")
    points = _points(asked, features)
    intrinsics = asked.get("intrinsics")
    start = time.perf_counter()
    depth = state.predictor.decode(features, points, intrinsics)
    seconds = time.perf_counter() - start
    state.metrics.model_time.labels("decode").observe(seconds)
    timing["decode"] = seconds * 1000
    answer = {"model": state.model_name, "image_id": image_id, "width": features.width, "height": features.height,
              "points": points.tolist(), "depth_m": depth.tolist(), "timing_ms": timing}
    if intrinsics is not None:
        xyz = backproject(points, depth, intrinsics)
        answer["xyz"] = xyz.tolist()
        depth = np.concatenate([depth, xyz.ravel()])
    if not np.isfinite(depth).all():  # never NaN / Infinity in an answer
        if intrinsics is not None:
            raise _bad(400, f"'intrinsics' {list(intrinsics)} give depths or points that are not finite: they are "
                            "out of any camera's range (pixels of this image)")
        raise _bad(500, "the model returned non-finite depths (is the model folder trained?)")
    return answer


def _points(asked: dict, features: ImageFeatures) -> np.ndarray:
    """(K, 2) pixels of the compact fields' points or grid, checked against the image (NaN, outside:
    UserInputError naming the index)."""
    if "grid" in asked:
        return grid_points(asked["grid"], features.height, features.width)
    check_points(asked["points"], features.height, features.width)
    return asked["points"]
