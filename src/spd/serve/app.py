"""`spd serve`'s HTTP API (FastAPI): encode an image once, then ask for depth at any points of it.

    POST /v1/encode   multipart `image`                          -> {image_id, width, height, ...}
    POST /v1/depth    multipart `image` or `image_id`, `points` (JSON [[u, v], ...]) or `grid` (N),
                      optional `intrinsics` (JSON [fx, fy, cx, cy]: depth for that camera, and xyz; without
                      them the model's canonical camera, spd.camera); or the same as a JSON body with
                      `image_id`                                  -> {depth_m, points, xyz?, width, height, model, ...}
    GET  /healthz, /v1/info, /docs (OpenAPI), /  (the click-for-depth page, `page.html`)

Every bad input is a 4xx JSON `{"detail": "..."}` naming the problem (the first bad point by index),
never a 500. The model is shared and its calls are serialised by one lock (on a CPU the model uses
every core anyway); requests are parsed and answered on the event loop, so a slow client holds no
lock. Encoded images live in a `FeatureCache` (LRU by bytes, with expiry).
"""

from __future__ import annotations

import io
import json
import math
import threading
import time
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image, UnidentifiedImageError

from spd.errors import UserInputError
from spd.cameras.intrinsics import checked_intrinsics
from spd.predictor import ImageFeatures, Predictor, backproject, check_points, grid_points, image_to_uint8
from spd.serve.cache import FeatureCache


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_upload_bytes: int = 20 * 2**20
    max_image_pixels: int = 40_000_000
    max_points: int = 65_536
    max_grid: int = 256


@dataclass
class ServerState:
    predictor: Predictor
    model_name: str
    model_info: dict
    cache: FeatureCache
    limits: Limits
    lock: threading.Lock


def _bad(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


def create_app(predictor: Predictor, model_name: str, model_info: dict, cache: FeatureCache,
               limits: Limits = Limits()) -> FastAPI:
    """The FastAPI app around one predictor. `model_info` is what /v1/info reports about the model."""
    app = FastAPI(title="SPD depth service", version="1",
                  description="Metric depth at the pixels you ask for: encode an image once, query points many times. "
                              "No authentication of its own: put it behind your reverse proxy.")
    state = ServerState(predictor, model_name, model_info, cache, limits, threading.Lock())
    app.state.spd = state

    @app.middleware("http")
    async def refuse_oversized_bodies(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limits.max_upload_bytes + 64 * 1024:
            return JSONResponse({"detail": f"request body of {int(length)} bytes exceeds the limit of "
                                           f"{limits.max_upload_bytes} bytes"}, status_code=413)
        return await call_next(request)

    @app.exception_handler(UserInputError)
    async def user_input_error(request: Request, err: UserInputError):
        return JSONResponse({"detail": " ".join(str(err).split())}, status_code=400)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return resources.files("spd.serve").joinpath("page.html").read_text()

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/info")
    async def info() -> dict:
        return {"model": model_name, "config": model_info, "device": str(predictor.device), "dtype": predictor.dtype,
                "chunk_size": predictor.chunk_size, "cache": cache.stats(), "limits": asdict(limits)}

    @app.post("/v1/encode")
    async def encode(request: Request) -> dict:
        """multipart/form-data with an `image` file -> its `image_id` for later /v1/depth calls."""
        form = await _form(request)
        rgb = await _image(form, limits)
        image_id, features, encode_ms = await run_in_threadpool(_encode_and_cache, state, rgb)
        return {"image_id": image_id, "width": features.width, "height": features.height, "model": model_name,
                "expires_after_s": cache.ttl_s, "timing_ms": {"encode": encode_ms}}

    @app.post("/v1/depth")
    async def depth(request: Request) -> dict:
        """Depth [m] at points: multipart (`image` file or `image_id`; `points` JSON or `grid`;
        optional `intrinsics` JSON) or a JSON body {image_id, points | grid, intrinsics?}."""
        fields, rgb = await _depth_request(request, limits)
        return await run_in_threadpool(_answer_depth, state, fields, rgb)

    return app


async def _form(request: Request):
    kind = request.headers.get("content-type", "")
    if not kind.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise _bad(415, f"expected multipart/form-data (an 'image' file and fields) or JSON, got content type {kind or 'none'!r}")
    try:
        return await request.form(max_files=1, max_fields=8)
    except Exception as err:  # starlette's MultiPartException and parser errors
        raise _bad(400, f"unreadable multipart body ({err})") from None


async def _image(form, limits: Limits) -> np.ndarray:
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise _bad(400, "no 'image' file in the form (send the image as a file field named 'image')")
    data = await upload.read(limits.max_upload_bytes + 1)
    if len(data) > limits.max_upload_bytes:
        raise _bad(413, f"image upload exceeds the limit of {limits.max_upload_bytes} bytes")
    if not data:
        raise _bad(400, "the 'image' file is empty")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > limits.max_image_pixels:
                raise _bad(413, f"image of {image.width}x{image.height} pixels exceeds the limit of "
                                f"{limits.max_image_pixels} pixels")
            image.load()
            return image_to_uint8(image)
    except HTTPException:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise _bad(400, f"unreadable image ({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None


async def _depth_request(request: Request, limits: Limits) -> tuple[dict, np.ndarray | None]:
    """The request's fields (image_id, points, grid, intrinsics; parsed JSON) and its image, if uploaded."""
    kind = request.headers.get("content-type", "")
    if kind.startswith("application/json"):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise _bad(400, f"request body is not valid JSON ({err})") from None
        except RecursionError:  # json's recursive parser: nesting beyond Python's recursion limit
            raise _bad(400, "request body is JSON nested too deeply") from None
        if not isinstance(body, dict):
            raise _bad(400, "JSON body must be an object {image_id, points | grid, intrinsics?}")
        return body, None
    form = await _form(request)
    fields: dict[str, Any] = {}
    for name in ("image_id", "points", "grid", "intrinsics"):
        value = form.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise _bad(400, f"form field {name!r} must be text, not a file")
        fields[name] = value if name == "image_id" else _json_field(name, value)
    rgb = await _image(form, limits) if form.get("image") is not None else None
    return fields, rgb


def _json_field(name: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise _bad(400, f"form field {name!r} is not valid JSON: {text[:80]!r}") from None
    except RecursionError:
        raise _bad(400, f"form field {name!r} is JSON nested too deeply") from None


def _encode_and_cache(state: ServerState, rgb: np.ndarray) -> tuple[str | None, ImageFeatures, float]:
    start = time.perf_counter()
    with state.lock:
        features = state.predictor.encode(rgb)
    image_id = state.cache.put(features)
    return image_id, features, (time.perf_counter() - start) * 1000


def _answer_depth(state: ServerState, fields: dict, rgb: np.ndarray | None) -> dict:
    timing: dict[str, float] = {}
    if rgb is not None:
        if "image_id" in fields:
            raise _bad(400, "send either an 'image' file or an 'image_id', not both")
        image_id, features, timing["encode"] = _encode_and_cache(state, rgb)
    else:
        image_id = fields.get("image_id")
        if not isinstance(image_id, str) or not image_id:
            raise _bad(400, "no image: send an 'image' file, or the 'image_id' of an earlier /v1/encode")
        features = state.cache.get(image_id)
        if features is None:
            raise _bad(404, f"image_id {image_id!r} is unknown or expired: send the image again")
    points = _points(fields, features, state.limits)
    intrinsics = _intrinsics(fields.get("intrinsics"))
    start = time.perf_counter()
    with state.lock:
        depth = state.predictor.decode(features, points, intrinsics)
    timing["decode"] = (time.perf_counter() - start) * 1000
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


def _points(fields: dict, features: ImageFeatures, limits: Limits) -> np.ndarray:
    if ("points" in fields) == ("grid" in fields):
        raise _bad(400, "give exactly one of 'points' (a JSON list of [u, v] pixel pairs) or 'grid' (N for N x N)")
    if "grid" in fields:
        n = fields["grid"]
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limits.max_grid:
            raise _bad(400, f"'grid' must be an integer from 1 to {limits.max_grid}, got {n!r}")
        return grid_points(n, features.height, features.width)
    raw = fields["points"]
    if not isinstance(raw, list):
        raise _bad(400, "'points' must be a JSON list of [u, v] pixel pairs")
    if len(raw) > limits.max_points:
        raise _bad(413, f"{len(raw)} points exceed the limit of {limits.max_points} per request")
    for index, pair in enumerate(raw):
        if not isinstance(pair, list) or len(pair) != 2 or not all(_is_number(x) for x in pair):
            raise _bad(400, f"point {index} must be [u, v] with two numbers, got {_preview(pair)}")
    points = np.asarray(raw, dtype=np.float64).reshape(-1, 2)
    check_points(points, features.height, features.width)  # NaN / outside: UserInputError naming the index
    return points


def _preview(value: Any) -> str:
    """The start of a value's JSON for an error message (a deeply nested one is not serialised)."""
    try:
        return json.dumps(value)[:80]
    except (RecursionError, ValueError):
        return f"a nested {type(value).__name__}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _intrinsics(raw: Any) -> tuple[float, float, float, float] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) != 4 or not all(_is_number(x) and math.isfinite(x) for x in raw):
        raise _bad(400, "'intrinsics' must be [fx, fy, cx, cy]: four finite numbers in pixels")
    return checked_intrinsics(raw, "intrinsics")
