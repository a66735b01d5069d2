"""Camera intrinsics (fx, fy, cx, cy) in pixels, from the command line or a file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from spd.errors import UserInputError


def checked_intrinsics(values, source: str) -> tuple[float, float, float, float]:
    """(fx, fy, cx, cy) as floats; UserInputError naming `source` unless four finite numbers, fx, fy > 0."""
    try:
        fx, fy, cx, cy = (float(v) for v in values)
    except (TypeError, ValueError):
        raise UserInputError(f"{source}: intrinsics must be four numbers fx, fy, cx, cy in pixels; got {values!r}") from None
    if not all(math.isfinite(v) for v in (fx, fy, cx, cy)) or fx <= 0 or fy <= 0:
        raise UserInputError(f"{source}: intrinsics need finite fx, fy > 0 and cx, cy; got {[fx, fy, cx, cy]}")
    return fx, fy, cx, cy


MAX_FIELD_OF_VIEW_DEG = 170.0  # wider than any pinhole camera's: fisheyes are not pinholes


def implausible_intrinsics(intrinsics, height: int, width: int) -> str | None:
    """Why (fx, fy, cx, cy) look wrong for a height x width image, or None: a focal length of a few
    pixels (a field of view beyond 170 degrees: millimetres, not pixels?) or a principal point outside
    the image (intrinsics of another image size?)."""
    fx, fy, cx, cy = intrinsics
    fov = math.degrees(2 * math.atan(width / (2 * fx))), math.degrees(2 * math.atan(height / (2 * fy)))
    if max(fov) > MAX_FIELD_OF_VIEW_DEG:
        return (f"intrinsics fx={fx:g}, fy={fy:g} px give a {max(fov):.0f} degree field of view for this {width}x{height} "
                "image: they are pixels, not millimetres (fx_px = f_mm x image width px / sensor width mm)")
    if not (0 <= cx <= width and 0 <= cy <= height):
        return (f"intrinsics put the principal point ({cx:g}, {cy:g}) outside this {width}x{height} image: are they "
                "for another image size? (they are in pixels of the image you pass)")
    return None


def _from_matrix(matrix, source: str) -> tuple[float, float, float, float]:
    k = np.asarray(matrix, dtype=np.float64)
    if k.shape != (3, 3):
        raise UserInputError(f"{source}: a camera matrix must be 3x3, got shape {k.shape}")
    return checked_intrinsics((k[0, 0], k[1, 1], k[0, 2], k[1, 2]), source)


def read_intrinsics(spec: str) -> tuple[float, float, float, float]:
    """`fx,fy,cx,cy`, or a file: `.npy` (3x3 K), `.json` ({"fx", "fy", "cx", "cy"} or {"K": 3x3}),
    `.txt` (3x3 K, or the four numbers). UserInputError naming the problem."""
    path = Path(spec)
    if path.suffix.lower() not in (".npy", ".json", ".txt"):
        try:
            values = [float(v) for v in spec.split(",")]
        except ValueError:
            values = []
        if len(values) != 4:
            raise UserInputError(f"--intrinsics needs fx,fy,cx,cy in pixels or a .npy/.json/.txt file, got {spec!r}")
        return checked_intrinsics(values, "--intrinsics")
    if not path.is_file():
        raise UserInputError(f"{path}: intrinsics file not found")
    try:
        if path.suffix.lower() == ".npy":
            return _from_matrix(np.load(path, allow_pickle=False), str(path))
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text())
            if isinstance(data, dict) and "K" in data:
                return _from_matrix(data["K"], str(path))
            if isinstance(data, dict) and {"fx", "fy", "cx", "cy"} <= set(data):
                return checked_intrinsics([data[k] for k in ("fx", "fy", "cx", "cy")], str(path))
            raise UserInputError(f"{path}: expected {{'fx', 'fy', 'cx', 'cy'}} or {{'K': 3x3}}")
        numbers = np.array(path.read_text().split(), dtype=np.float64)
    except (ValueError, OSError, TypeError) as err:
        raise UserInputError(f"{path}: unreadable intrinsics ({err})") from None
    if numbers.size == 9:
        return _from_matrix(numbers.reshape(3, 3), str(path))
    if numbers.size == 4:
        return checked_intrinsics(numbers, str(path))
    raise UserInputError(f"{path}: expected a 3x3 matrix or fx fy cx cy, found {numbers.size} numbers")
