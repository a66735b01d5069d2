"""Your own data: a dataset description (YAML) beside the NYU layouts.

    root: /data/my_robot          # relative paths below are relative to it (default: the YAML's folder)
    list: train.txt               # one sample a line: RGB path, label path (relative to root, or
                                  # absolute), then optional fx fy cx cy
    depth_scale: 1000.0           # label PNG units per metre (NYU 1000, KITTI 256)
    intrinsics: [fx, fy, cx, cy]  # default for lines that give none (optional)
    val_list: val.txt             # samples for validation during `spd train` (same format; without it: eval.every_steps=0)

Label kinds, by file:
- a depth map: a 16-bit PNG (value / depth_scale metres) or an `.npy` float array in metres, H x W
  like its RGB; 0 or NaN = no measurement;
- sparse points: a `.csv` or an `.npy` (N, 3) of rows `u, v, depth_m` in pixels of the RGB image
  (the project's convention: integers at pixel centres, -0.5 <= u <= W - 0.5). A CSV may start
  with a header line.

`DescribedDepth` is a `DepthDataset`: the same sample dict, augmentation and query sampling as NYU.
Sparse points move with the image through crop, flip and rotation exactly (torchvision KeyPoints),
points that leave the image are dropped, and the rest are written into an otherwise empty depth map
at their nearest pixel: queries are then drawn among labelled pixels only, and the dense auxiliary
losses see only labelled pixels (an image whose crop holds none contributes zero, not NaN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from spd.data.io import DataError, parse_number_rows, read_depth_png, read_rgb, read_text
from spd.data.nyu import DepthDataset, Split
from spd.errors import ConfigError, DataLayoutError, UserInputError
from spd.cameras.intrinsics import checked_intrinsics

DESCRIPTION_KEYS = {"root", "list", "val_list", "depth_scale", "intrinsics"}
SPARSE_SUFFIXES, DENSE_SUFFIXES = (".csv",), (".png",)


@dataclass(frozen=True)
class LabelledFrame:
    rgb: Path
    label: Path
    intrinsics: tuple[float, float, float, float] | None
    where: str  # "LIST:LINE", for errors
    id: str  # the RGB path as listed: unique in the list, seeds the evaluation queries


@dataclass(frozen=True)
class DatasetDescription:
    source: Path
    root: Path
    list_path: Path
    depth_scale: float
    intrinsics: tuple[float, float, float, float] | None
    frames: tuple[LabelledFrame, ...]
    val_frames: tuple[LabelledFrame, ...] = ()


def is_description(path: str | Path) -> bool:
    return Path(path).suffix.lower() in (".yaml", ".yml")


def _intrinsics(values, where: str) -> tuple[float, float, float, float]:
    """`checked_intrinsics`, as a ConfigError: in a description they are a setting of the dataset."""
    try:
        return checked_intrinsics(values, where)
    except UserInputError as err:
        raise ConfigError(str(err)) from None


def read_description(path: str | Path) -> DatasetDescription:
    """Parses a dataset description and its list (not the files it names: `spd data check` reads those)."""
    source = Path(path)
    if not source.is_file():
        raise DataLayoutError(f"{source}: dataset description not found")
    try:
        data = yaml.safe_load(read_text(source))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{source}: not valid YAML ({' '.join(str(err).split())[:200]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with keys {sorted(DESCRIPTION_KEYS)}")
    unknown = set(data) - DESCRIPTION_KEYS
    if unknown:
        raise ConfigError(f"{source}: unknown keys {sorted(unknown)}; allowed: {sorted(DESCRIPTION_KEYS)}")
    if "list" not in data:
        raise ConfigError(f"{source}: no 'list' (the file of 'rgb label [fx fy cx cy]' lines)")
    root = source.parent / str(data.get("root", "."))
    if not root.is_dir():
        raise DataLayoutError(f"{source}: root {root} is not a folder")
    depth_scale = data.get("depth_scale", 1000.0)
    if isinstance(depth_scale, bool) or not isinstance(depth_scale, (int, float)) or not 0 < depth_scale < float("inf"):
        raise ConfigError(f"{source}: depth_scale must be a finite number > 0 (label PNG units per metre), got {depth_scale!r}")
    default = _intrinsics(data["intrinsics"], f"{source}: intrinsics") if data.get("intrinsics") is not None else None
    list_path = root / str(data["list"])
    frames = tuple(_read_list(list_path, root, default))
    if not frames:
        raise DataLayoutError(f"{list_path}: no samples listed")
    val_frames = tuple(_read_list(root / str(data["val_list"]), root, default)) if data.get("val_list") else ()
    return DatasetDescription(source, root, list_path, float(depth_scale), default, frames, val_frames)


def _read_list(list_path: Path, root: Path, default) -> list[LabelledFrame]:
    if not list_path.is_file():
        raise DataLayoutError(f"{list_path}: sample list not found")
    frames = []
    for number, line in enumerate(read_text(list_path).splitlines(), start=1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        where = f"{list_path}:{number}"
        if len(parts) not in (2, 6):
            raise DataError(where, f"expected 'rgb label' or 'rgb label fx fy cx cy', got {line.strip()!r}")
        intrinsics = _intrinsics(parts[2:], where) if len(parts) == 6 else default
        frames.append(LabelledFrame(root / parts[0], root / parts[1], intrinsics, where, parts[0]))  # absolute paths stay
    return frames


def read_label(
    frame: LabelledFrame, depth_scale: float, image_hw: tuple[int, int]
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(dense depth (H, W) metres or None, sparse points (N, 3) u, v, depth_m or None); DataError
    naming the file (and the row of a point list) for anything unusable."""
    path, suffix = frame.label, frame.label.suffix.lower()
    if not path.is_file():
        raise DataError(path, "label file not found")
    if suffix in DENSE_SUFFIXES:
        depth = read_depth_png(path) * (1000.0 / depth_scale)  # read_depth_png gives value / 1000
        return _checked_dense(depth, path, image_hw), None
    if suffix in SPARSE_SUFFIXES:
        return None, _checked_points(_read_csv(path), path, image_hw)
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise DataError(path, f"unreadable .npy ({err})") from None
        if not np.issubdtype(array.dtype, np.floating):
            raise DataError(path, f"expected float metres, got dtype {array.dtype}")
        if array.shape == tuple(image_hw):
            return _checked_dense(array.astype(np.float32), path, image_hw), None
        if array.ndim == 2 and array.shape[1] == 3:
            return None, _checked_points(array.astype(np.float64), path, image_hw)
        raise DataError(path, f"shape {array.shape} is neither the image's {tuple(image_hw)} nor (N, 3) points")
    raise DataError(path, f"unknown label kind {suffix!r}: use .png / .npy depth maps or .csv / .npy point lists")


def _checked_dense(depth: np.ndarray, path: Path, image_hw) -> np.ndarray:
    if depth.shape != tuple(image_hw):
        raise DataError(path, f"depth is {depth.shape[1]}x{depth.shape[0]} but the RGB is {image_hw[1]}x{image_hw[0]}")
    return np.where(np.isfinite(depth) & (depth > 0), depth, 0.0).astype(np.float32)


def _read_csv(path: Path) -> np.ndarray:
    lines = read_text(path).splitlines()
    rows, bad = parse_number_rows(lines, 3)
    if bad is not None:
        raise DataError(path, f"line {bad} is not 'u,v,depth_m': {lines[bad - 1].strip()!r}")
    return np.array(rows, dtype=np.float64).reshape(-1, 3)


def _checked_points(points: np.ndarray, path: Path, image_hw) -> np.ndarray:
    height, width = image_hw
    for row, (u, v, depth) in enumerate(points):
        if not (math.isfinite(u) and math.isfinite(v) and math.isfinite(depth)) or depth <= 0:
            raise DataError(path, f"point {row} ({u}, {v}, {depth}) needs finite u, v and depth > 0")
        if not (-0.5 <= u <= width - 0.5 and -0.5 <= v <= height - 0.5):
            raise DataError(path, f"point {row} ({u}, {v}) lies outside the {width}x{height} image")
    return points


def load_frame(frame: LabelledFrame, depth_scale: float) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """rgb (H, W, 3) uint8, dense depth or None, sparse points or None."""
    rgb = read_rgb(frame.rgb)
    depth, points = read_label(frame, depth_scale, rgb.shape[:2])
    return rgb, depth, points


class DescribedDepth(DepthDataset):
    """A dataset description as a `DepthDataset` (the sample dict of `spd.data.nyu`).

    `which="list"` reads the description's samples, `"val_list"` its validation samples. `focal` is
    each frame's fx, or None when the description gives no intrinsics (the model's canonical camera is
    then assumed, spd.camera). Evaluation queries use no crop:
    the Eigen / Garg crops are NYU's."""

    def __init__(self, description: str | Path | DatasetDescription, split: Split = "train", which: str = "list",
                 **kwargs) -> None:
        kwargs["eval_crop"] = "none"
        super().__init__(split, **kwargs)
        self.description = description if isinstance(description, DatasetDescription) else read_description(description)
        self.frames = self.description.frames if which == "list" else self.description.val_frames
        if not self.frames:
            raise ConfigError(f"{self.description.source}: no '{which}' samples (add a {which}: file of samples)")

    def __len__(self) -> int:
        return len(self.frames)

    def load(self, index: int) -> tuple:
        frame = self.frames[index]
        rgb, depth, points = load_frame(frame, self.description.depth_scale)
        focal = frame.intrinsics[0] if frame.intrinsics is not None else None
        return rgb, depth, focal, frame.id, frame.where, points
