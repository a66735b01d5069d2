"""The service's OpenAPI description: request bodies and responses as schemas, documentation only.

The routes read their bodies themselves (streamed limits, `limits.BodyLimit`; bounded JSON; uploads
decoded in a worker pool), so FastAPI cannot infer their request bodies from parameters. They are
written here as JSON Schema, with the service's own bounds (`Limits`), and attached to each route
with `openapi_extra`; responses are pydantic models named in `responses=` (described, never used to
filter or re-validate what a route returns). A test validates the document and checks real answers
against these schemas.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from spd.serve.limits import Limits


class ErrorBody(BaseModel):
    """Every 4xx / 503 answer."""

    detail: str = Field(description="what is wrong, naming the field, the point index or the limit")


class EncodeAnswer(BaseModel):
    image_id: str = Field(description="key of the encoded image in the service's cache, for /v1/depth")
    width: int = Field(description="the uploaded image's width [px]")
    height: int = Field(description="the uploaded image's height [px]")
    model: str
    expires_after_s: float = Field(description="the id expires after this long unused")
    timing_ms: dict[str, float]


class DepthAnswer(BaseModel):
    model: str
    image_id: str | None = Field(description="the image's cache key (null: an upload too large to cache)")
    width: int
    height: int
    points: list[list[float]] = Field(description="the queried (u, v) pixels, as given or from the grid")
    depth_m: list[float] = Field(description="metric depth [m] at each point (z, camera frame)")
    xyz: list[list[float]] | None = Field(None, description="camera-frame (x, y, z) [m], with intrinsics only")
    timing_ms: dict[str, float]


class Health(BaseModel):
    status: str


class Info(BaseModel):
    model: str
    trained_on: str = Field(description="what the model was trained on (kinds, frames, sizes), or unknown")
    config: dict
    device: str
    dtype: str
    chunk_size: int
    cache: dict
    limits: dict
    queues: dict


ERRORS = {status: {"model": ErrorBody, "description": why} for status, why in (
    (400, "bad field, point, grid, intrinsics or image"), (404, "unknown or expired image_id"),
    (413, "body, image, points or cache limit exceeded"), (415, "content type or image format not accepted"),
    (503, "busy: retry after the Retry-After header's seconds"))}


def _point_list(limits: Limits) -> dict:
    pair = {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}
    return {"type": "array", "items": pair, "maxItems": limits.max_points,
            "description": "(u, v) pixels of the image: column, row; integers at pixel centres, "
                           "-0.5 <= u <= W - 0.5, -0.5 <= v <= H - 0.5"}


def _intrinsics() -> dict:
    return {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4,
            "description": "[fx, fy, cx, cy] in the image's pixels: depth for this camera, and xyz"}


def depth_request_body(limits: Limits) -> dict:
    """`openapi_extra` of POST /v1/depth: a JSON body (an encoded image's id) or a multipart form."""
    grid = {"type": "integer", "minimum": 1, "maximum": limits.max_grid, "description": "an N x N grid of points"}
    as_json = {"type": "object", "required": ["image_id"], "additionalProperties": True,
               "properties": {"image_id": {"type": "string", "minLength": 1}, "points": _point_list(limits),
                              "grid": grid, "intrinsics": _intrinsics()},
               "description": "exactly one of points or grid"}
    text = "JSON text of the same value as in the JSON body"
    form = {"type": "object", "properties": {
        "image": {"type": "string", "format": "binary", "maxLength": limits.max_upload_bytes,
                  "description": f"a JPEG, PNG or WebP file of at most {limits.max_image_pixels} pixels (or image_id)"},
        "image_id": {"type": "string"},
        "points": {"type": "string", "maxLength": limits.max_json_bytes, "description": f"{text}: [[u, v], ...]"},
        "grid": {"type": "string", "description": f"{text}: N"},
        "intrinsics": {"type": "string", "description": f"{text}: [fx, fy, cx, cy]"}}}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": as_json},
                                                          "multipart/form-data": {"schema": form}}}}


def encode_request_body(limits: Limits) -> dict:
    """`openapi_extra` of POST /v1/encode: a multipart form with one image file."""
    form = {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "string", "format": "binary", "maxLength": limits.max_upload_bytes,
                  "description": f"a JPEG, PNG or WebP file of at most {limits.max_image_pixels} pixels"}}}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form}}}}
