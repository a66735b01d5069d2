"""What one request may send or ask for, and the body limit enforced while the body streams in.

`BodyLimit` is plain ASGI middleware (not Starlette's BaseHTTPMiddleware, which would buffer): it counts
the request body's bytes as the server hands them over and answers 413 the moment they pass the limit,
whatever the content type and with or without Content-Length (chunked uploads declare none). Nothing
past the limit is read: uvicorn stops reading a connection whose application does not ask for more,
so an 8 MiB body against a 1 MiB limit costs the server about 1 MiB, not 8.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries and the small fields that travel with an image
JSON_BYTES_PER_POINT = 48  # "[1234.5678901234567, 1234.5678901234567], " is 42


@dataclass(frozen=True)
class Limits:
    """The service's bounds (flags of `spd serve`, reported by /v1/info)."""

    max_upload_bytes: int = 20 * 2**20  # one request body (an image upload, or a JSON body)
    max_image_pixels: int = 40_000_000  # width x height, refused from the image header before decoding
    max_points: int = 65_536  # points per /v1/depth request
    max_grid: int = 256  # N of a `grid` request (N x N points)
    max_queue: int = 16  # requests that may wait for each stage (decoding, the model) before 503
    decode_workers: int = 1  # images decoded at once (each may hold ~150 MB while decoding)

    @property
    def max_body_bytes(self) -> int:
        """Any request body: an image upload and the fields beside it."""
        return self.max_upload_bytes + FORM_OVERHEAD_BYTES

    @property
    def max_json_bytes(self) -> int:
        """A JSON body or a JSON form field: room for `max_points` points written with full float precision.
        Tighter than the upload limit because parsed JSON costs ~30x its bytes in Python objects."""
        return 4096 + self.max_points * JSON_BYTES_PER_POINT


class BodyTooLarge(Exception):
    """Raised from `receive` when a request body passes the limit; `BodyLimit` turns it into a 413."""


async def send_json(send, status: int, payload: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware: 413 as soon as a request body passes its limit (declared or streamed):
    `limits.max_json_bytes` for JSON bodies, `limits.max_body_bytes` for every other content type."""

    def __init__(self, app, limits: Limits) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        is_json = headers.get(b"content-type", b"").startswith(b"application/json")
        limit = self.limits.max_json_bytes if is_json else self.limits.max_body_bytes
        flag = "--max-points" if is_json else "--max-upload-mb"
        detail = lambda size: {"detail": f"request body of {size} bytes exceeds the limit of {limit} "  # noqa: E731
                                         f"bytes{' for JSON' if is_json else ''} (spd serve {flag})"}
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await send_json(send, 413, detail(str(int(declared))), [(b"connection", b"close")])
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge
            return message

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except BodyTooLarge:
            if started:  # an answer is already on its way (never for our routes, which read the body first)
                raise
            await send_json(send, 413, detail(f"more than {limit}"), [(b"connection", b"close")])
