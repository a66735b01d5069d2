"""Reading NYU-layout files with errors that name the file and the problem."""

from __future__ import annotations

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


def read_text(path: str | Path) -> str:
    """A text file (split list, label CSV, description) as str; DataError naming the file when it is
    missing, unreadable or not UTF-8 (e.g. saved as Latin-1 by a spreadsheet)."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except UnicodeDecodeError as err:
        raise DataError(path, f"not UTF-8 text (byte {err.start}: {err.object[err.start:err.start + 1]!r}); save it "
                              "as UTF-8") from None
    except OSError as err:
        raise DataError(path, f"cannot read it ({err.strerror})") from None


def _open(path: Path) -> Image.Image:
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


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as an (H, W, 3) uint8 RGB array (grey and RGBA are converted), upright: a
    camera's EXIF orientation tag is applied, so pixel (u, v) is where a viewer shows it."""
    return np.array(ImageOps.exif_transpose(_open(Path(path))).convert("RGB"))  # a writable copy


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
