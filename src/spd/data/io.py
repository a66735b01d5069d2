"""Reading NYU-layout files with errors that name the file and the problem."""

from __future__ import annotations

import codecs
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from spd.cameras.nyu import NYU_FOCAL, NYU_INTRINSICS  # noqa: F401 - the dataset's camera, re-exported
from spd.errors import DataLayoutError


class DataError(DataLayoutError):
    """A dataset file is missing, unreadable or not what the layout promises."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


# Byte-order marks, longest first (UTF-32 LE starts with UTF-16 LE's): what spreadsheets write as
# "Unicode Text" (UTF-16) or "CSV UTF-8" (with a BOM)
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def read_text(path: str | Path) -> str:
    """A text file (split list, label or points CSV, description) as str: UTF-8, or UTF-8 / UTF-16 /
    UTF-32 with a byte-order mark; DataError naming the file when it is missing, unreadable or in
    another encoding (e.g. Latin-1 from a spreadsheet), with the first undecodable byte."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except IsADirectoryError:
        raise DataError(path, "is a folder, not a text file") from None
    except OSError as err:
        raise DataError(path, f"cannot read it ({err.strerror})") from None
    encoding = next((name for bom, name in _BOMS if data.startswith(bom)), "utf-8")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        raise DataError(path, f"not {encoding.upper().replace('-SIG', '')} text (byte {err.start}: "
                              f"{err.object[err.start:err.start + 1]!r}); save it as UTF-8") from None


def _open(path: Path) -> Image.Image:
    if path.is_dir():
        raise DataError(path, "is a folder, not an image file")
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        image = Image.open(path)
        image.load()  # decode now: a truncated file fails here, not later in a worker
    except Image.DecompressionBombError as err:
        raise DataError(path, f"image too large to decode safely ({err})") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(path, f"unreadable or truncated image ({err})") from err
    return image


# Pillow modes of depth maps and other measurements, not photographs: converting one to RGB clips it
# to white and grey, and a model would answer plausible metres for it (a depth PNG passed as --image).
NOT_PHOTOGRAPHS = {"I;16": "16-bit: a depth map?", "I;16B": "16-bit: a depth map?", "I;16L": "16-bit: a depth map?",
                   "I": "32-bit integer: a depth map?", "F": "32-bit float: a depth map?"}


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as an (H, W, 3) uint8 RGB array (grey and RGBA are converted), upright: a
    camera's EXIF orientation tag is applied, so pixel (u, v) is where a viewer shows it. A 16-bit or
    float image (a depth map) is refused: DataError naming the file."""
    image = _open(Path(path))
    if image.mode in NOT_PHOTOGRAPHS:
        raise DataError(path, f"a {image.mode} image ({NOT_PHOTOGRAPHS[image.mode]}), not an 8-bit colour photograph")
    return np.array(ImageOps.exif_transpose(image).convert("RGB"))  # a writable copy


def read_depth_png(path: str | Path) -> np.ndarray:
    """A 16-bit depth PNG in millimetres as an (H, W) float32 array in metres; 0 stays 0 (invalid)."""
    path = Path(path)
    image = _open(path)
    array = np.asarray(image)
    if array.dtype != np.uint16 and image.mode not in ("I;16", "I;16B", "I"):
        raise DataError(path, f"depth must be a 16-bit PNG in millimetres; got mode {image.mode} ({array.dtype})")
    if array.ndim != 2:
        raise DataError(path, f"depth must be single-channel; got shape {array.shape}")
    if array.dtype != np.uint16:
        if array.min() < 0 or array.max() > 65535:
            raise DataError(path, f"depth values outside uint16 range in mode {image.mode}")
        array = array.astype(np.uint16)
    return array.astype(np.float32) / 1000.0


def write_depth_png(path: str | Path, depth_m: np.ndarray) -> None:
    """Writes (H, W) metres as a uint16 millimetre PNG (0 = invalid), rounding to the nearest mm."""
    millimetres = np.clip(np.round(depth_m * 1000.0), 0, 65535).astype(np.uint16)
    Image.fromarray(millimetres).save(path)


def parse_number_rows(lines: list[str], columns: int) -> tuple[list[list[float]], int | None]:
    """Rows of `columns` numbers separated by commas (or semicolons), blank lines skipped, a first
    line that is not numbers taken as a header. Returns (rows, the 1-based number of the first
    malformed line or None)."""
    rows: list[list[float]] = []
    for number, line in enumerate(lines, start=1):
        parts = [p.strip() for p in line.replace(";", ",").split(",") if p.strip()]
        if not parts:
            continue
        try:
            if len(parts) != columns:
                raise ValueError
            rows.append([float(p) for p in parts])
        except ValueError:
            if number == 1 and not rows:
                continue  # a header such as "u,v"
            return rows, number
    return rows, None
