"""A /v1/depth request's fields, parsed and checked off the event loop, and kept only in compact form.

`parse_json_body` (a JSON body) and `parse_form_fields` (a form's text fields) run inline for small
bodies and in a worker process for large ones (`app._parsed_fields`): a 3 MiB body of `[{},{},...]`
costs ~56 ms of `json.loads`, which holds the GIL, so in the server (even in a thread) it would stall
/healthz for everyone. What they return is what waits in the model's queue: the
points as one float64 (K, 2) array (16 bytes a point), the grid as an int, the intrinsics as four
floats. The parsed JSON (~30x its bytes in Python objects) is dropped before the request queues, and
a malformed one is a 4xx before it queues at all. Every parsing error names its field.

Checks that need the image (points inside it) run on the model's thread (`app._points`).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from fastapi import HTTPException

from spd.cameras.intrinsics import checked_intrinsics
from spd.errors import UserInputError
from spd.serve.limits import Limits

FIELD_NAMES = ("image_id", "points", "grid", "intrinsics")


def _bad(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


def _first_words(err: Exception) -> str:
    return " ".join(str(err).split())[:100]


def _loads(text: str | bytes, what: str) -> Any:
    """json.loads with every failure a 400 naming `what` (the body, or a form field)."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _bad(400, f"{what} is not valid JSON ({_first_words(err)})") from None
    except RecursionError:  # json's recursive parser: nesting beyond Python's recursion limit
        raise _bad(400, f"{what} is JSON nested too deeply") from None
    except ValueError as err:  # an integer of over 4,300 digits: Python's int limit, not a JSON error
        raise _bad(400, f"{what} holds a number too large to read ({_first_words(err)})") from None


def parse_json_body(raw: bytes, limits: Limits) -> dict:
    """A JSON body {image_id, points | grid, intrinsics?} -> compact fields (`compact_fields`)."""
    body = _loads(raw, "request body")
    if not isinstance(body, dict):
        raise _bad(400, "JSON body must be an object {image_id, points | grid, intrinsics?}")
    return compact_fields({name: body[name] for name in FIELD_NAMES if name in body}, limits)


def parse_form_fields(texts: dict[str, str], limits: Limits) -> dict:
    """A form's text fields (`image_id` as it is, the others JSON text) -> compact fields."""
    fields = {name: text if name == "image_id" else _loads(text, f"form field {name!r}") for name, text in texts.items()}
    return compact_fields(fields, limits)


def parse_outcome(parse_name: str, payload, limits: Limits) -> tuple:
    """`parse_json_body` / `parse_form_fields` as a picklable outcome, for a worker process:
    ("ok", fields) or ("refused", status, detail) (an HTTPException does not survive pickling)."""
    try:
        return "ok", globals()[parse_name](payload, limits)
    except HTTPException as err:
        return "refused", err.status_code, err.detail


def compact_fields(fields: dict, limits: Limits) -> dict:
    """Parsed fields checked in structure and bounds, points as a float64 (K, 2) array."""
    if ("points" in fields) == ("grid" in fields):
        raise _bad(400, "give exactly one of 'points' (a JSON list of [u, v] pixel pairs) or 'grid' (N for N x N)")
    compact: dict[str, Any] = {}
    if "image_id" in fields:
        compact["image_id"] = fields["image_id"]
    if "grid" in fields:
        n = fields["grid"]
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limits.max_grid:
            raise _bad(400, f"'grid' must be an integer from 1 to {limits.max_grid}, got {_preview(n)}")
        compact["grid"] = n
    else:
        compact["points"] = point_array(fields["points"], limits)
    if fields.get("intrinsics") is not None:
        compact["intrinsics"] = intrinsics(fields["intrinsics"])
    return compact


def point_array(raw: Any, limits: Limits) -> np.ndarray:
    """[[u, v], ...] -> (K, 2) float64; 413 above the point limit, 400 naming the first malformed pair."""
    if not isinstance(raw, list):
        raise _bad(400, "'points' must be a JSON list of [u, v] pixel pairs")
    if len(raw) > limits.max_points:
        raise _bad(413, f"{len(raw)} points exceed the limit of {limits.max_points} per request")
    for index, pair in enumerate(raw):
        if not isinstance(pair, list) or len(pair) != 2 or not all(_is_number(x) for x in pair):
            raise _bad(400, f"point {index} must be [u, v] with two numbers, got {_preview(pair)}")
    try:
        return np.asarray(raw, dtype=np.float64).reshape(-1, 2)
    except OverflowError:  # an integer beyond float64's range: not a pixel
        raise _bad(400, "'points' holds a number beyond any image's pixels") from None


def intrinsics(raw: Any) -> tuple[float, float, float, float]:
    if not isinstance(raw, list) or len(raw) != 4 or not all(_is_number(x) and _finite(x) for x in raw):
        raise _bad(400, "'intrinsics' must be [fx, fy, cx, cy]: four finite numbers in pixels")
    try:
        return checked_intrinsics(raw, "intrinsics")
    except UserInputError as err:
        raise _bad(400, " ".join(str(err).split())) from None


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _preview(value: Any) -> str:
    """The start of a value's JSON for an error message (a deeply nested one is not serialised)."""
    try:
        return json.dumps(value)[:80]
    except (RecursionError, ValueError):
        return f"a nested {type(value).__name__}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
