"""NYU Depth V2 datasets: the BTS file layout and the official labeled .mat (DESIGN.md §7).

Both give the same sample dict:
    image (3, H, W) float, ImageNet-normalised; depth (1, H, W) metres (0 = no measurement);
    valid (1, H, W) bool (min_depth < depth <= max_depth); focal (pixels); id (str);
    and, when `num_queries` is set, queries (K, 2) pixel (u, v) and query_mask (K,) bool.

Randomness (augmentation, training queries) comes from a per-sample seed derived from
(seed, epoch, index), so a sample is the same whatever the worker count or a resume point.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from spd.data.io import NYU_FOCAL, DataError, read_depth_png, read_rgb, read_text
from spd.data.queries import CropName, sample_eval_queries, sample_uniform_queries
from spd.data.transforms import (
    NYU_BTS_BOX, NYU_FRAME_SIZE, apply, crop_box, random_zoom, rasterise_points, test_transform, train_transform,
)

Split = Literal["train", "test"]


@dataclass(frozen=True)
class SplitEntry:
    rgb: Path
    depth: Path
    focal: float
    id: str


SPLIT_LISTS = resources.files("spd.data.splits")
NYU_TRAIN_LIST = SPLIT_LISTS / "nyudepthv2_train_files_with_gt.txt"  # relative to <nyu>/sync
NYU_TEST_LIST = SPLIT_LISTS / "nyudepthv2_test_files_with_gt.txt"  # relative to <nyu>/official_splits/test


def resolve_split_list(root: str | Path, explicit: str | Path | None, split: Literal["train", "test"]) -> Path:
    """The split list of a dataset root, one rule for every command: `explicit` when given, else
    ROOT/{split}_files.txt (what `spd synth` writes) when present, else the bundled NYU list
    (BTS / ZoeDepth / Depth Anything's Eigen split)."""
    if explicit:
        return Path(explicit)
    beside = Path(root) / f"{split}_files.txt"
    if beside.is_file():
        return beside
    return Path(str(NYU_TRAIN_LIST if split == "train" else NYU_TEST_LIST))


def read_filelist(root: str | Path, filelist: str | Path) -> list[SplitEntry]:
    """Parses a BTS split list: `rgb_path depth_path focal` per line, paths relative to `root`
    (a leading '/' is stripped). Raises DataError naming the list and line when a line is malformed."""
    root, filelist = Path(root), Path(filelist)
    if not filelist.is_file():
        raise DataError(filelist, "split list not found")
    entries = []
    for number, line in enumerate(read_text(filelist).splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) not in (2, 3):
            raise DataError(filelist, f"line {number}: expected 'rgb depth [focal]', got {line!r}")
        try:
            focal = float(parts[2]) if len(parts) == 3 else NYU_FOCAL
        except ValueError:
            raise DataError(filelist, f"line {number}: focal {parts[2]!r} is not a number") from None
        rgb, depth = (root / p.lstrip("/") for p in parts[:2])
        entries.append(SplitEntry(rgb, depth, focal, str(Path(parts[0].lstrip("/")).with_suffix(""))))
    if not entries:
        raise DataError(filelist, "split list is empty")
    return entries


def sample_seed(seed: int, epoch: int, index: int, draw: str | None = None) -> int:
    """The seed of one sample's augmentation and queries; `draw` (a mixed run's "part:position") makes
    each draw of the sample its own (without it, the seed of every earlier run)."""
    key = f"{seed}:{epoch}:{index}" if draw is None else f"{seed}:{epoch}:{index}@{draw}"
    return zlib.crc32(key.encode())


class DepthDataset(Dataset):
    """Shared sample logic; subclasses implement `__len__` and `load(index)`."""

    def __init__(
        self,
        split: Split = "train",
        num_queries: int | None = None,
        crop_size: tuple[int, int] | None = (416, 544),
        rotation_deg: float = 2.5,
        color_p: float = 0.5,
        min_depth: float = 1e-3,
        max_depth: float = 10.0,
        seed: int = 0,
        eval_crop: CropName = "eigen",
        valid_box: tuple[int, int, int, int] | None = None,
        zoom: float = 1.0,
    ) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.split, self.num_queries = split, num_queries
        self.crop_size = tuple(crop_size) if crop_size else None
        self.min_depth, self.max_depth = min_depth, max_depth
        self.seed, self.eval_crop = seed, eval_crop
        self.epoch = 0
        self.zoom = zoom if split == "train" else 1.0
        self.transform = train_transform(self.crop_size, rotation_deg, color_p) if split == "train" else test_transform()
        # The NYU recipe (BTS): training frames of NYU's size are first cut to the box that holds
        # registered depth, then rotated, then randomly cropped. Other sizes: the generic order.
        self.valid_box = valid_box if split == "train" else None
        self.box_transform = train_transform(self.crop_size, rotation_deg, color_p, rotate_first=True) if self.valid_box else None

    def set_epoch(self, epoch: int) -> None:
        """New augmentation and query draws each epoch (call before iterating, like DistributedSampler)."""
        self.epoch = epoch

    def load(self, index: int) -> tuple:
        """Returns rgb (H, W, 3) uint8, depth (H, W) float32 metres, focal, id, and a path for errors;
        sparse-label datasets return depth None and a sixth item, points (N, 3) u, v, depth_m."""
        raise NotImplementedError

    def __getitem__(self, key: int | tuple[int, str]) -> dict:
        """Sample `key`: an index, or (index, draw) from `MixedDataset` (the draw seeds its randomness too)."""
        index, draw = key if isinstance(key, tuple) else (key, None)
        rgb, depth, focal, sample_id, where, *rest = self.load(index)
        points = torch.from_numpy(rest[0]).float() if rest and rest[0] is not None else None
        if depth is None:
            depth = np.zeros(rgb.shape[:2], dtype=np.float32)  # sparse labels: the map is written after augmentation
        if rgb.shape[:2] != depth.shape:
            raise DataError(where, f"depth is {depth.shape[1]}x{depth.shape[0]} but the RGB is {rgb.shape[1]}x{rgb.shape[0]}")
        image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 255.0
        depth_t = torch.from_numpy(np.ascontiguousarray(depth))[None]
        image, depth_t, uv, generator, zoomed = self._augment(index, image, depth_t, points, where, draw)
        if focal is not None:
            focal = focal * zoomed  # an enlarged image is a longer lens (spd.camera)
        if points is not None:
            depth_t = rasterise_points(uv, points[:, 2], tuple(image.shape[-2:]))
        valid = (depth_t > self.min_depth) & (depth_t <= self.max_depth)
        sample = {"image": image, "depth": depth_t, "valid": valid, "focal": focal, "id": sample_id}
        if self.num_queries is not None:
            if self.split == "train":
                queries, mask = sample_uniform_queries(valid[0], self.num_queries, generator)
            else:
                queries, mask = sample_eval_queries(valid[0], self.num_queries, self.seed, sample_id, self.eval_crop)
            sample["queries"], sample["query_mask"] = queries, mask
        return sample

    def _augment(self, index: int, image, depth_t, points, where: str, draw: str | None = None):
        """(image, depth, moved points (N, 2) or None, the sample's query generator or None, the zoom
        factor applied to the focal length)."""
        uv = points[:, :2] if points is not None else None
        if self.split != "train":
            return *apply(self.transform, image, depth_t, uv), None, 1.0
        transform = self.transform
        if self.valid_box is not None and tuple(image.shape[1:]) == NYU_FRAME_SIZE:
            image, depth_t = crop_box(image, depth_t, self.valid_box)
            if uv is not None:
                uv = uv - torch.tensor([float(self.valid_box[0]), float(self.valid_box[1])])
            transform = self.box_transform
        seed = sample_seed(self.seed, self.epoch, index, draw)
        zoomed = 1.0
        if self.zoom > 1:  # its own generator: the other draws stay those of a run without zoom
            image, depth_t, uv, zoomed = random_zoom(image, depth_t, uv, self.zoom, torch.Generator().manual_seed(seed + 1))
        if self.crop_size and (image.shape[1] < self.crop_size[0] or image.shape[2] < self.crop_size[1]):
            raise DataError(where, f"image {image.shape[2]}x{image.shape[1]} is smaller than the crop {self.crop_size}")
        with torch.random.fork_rng(devices=[]):  # v2 transforms draw from the global RNG
            torch.manual_seed(seed)
            image, depth_t, uv = apply(transform, image, depth_t, uv)
        return image, depth_t, uv, torch.Generator().manual_seed(seed), zoomed


class NYUDepth(DepthDataset):
    """NYU Depth V2 in the BTS layout: `root` + a split list of `rgb depth focal` lines.

    Example:
        NYUDepth("nyu/sync", "train_files.txt", split="train", num_queries=256)
        NYUDepth("nyu/official_splits/test", spd.data.NYU_TEST_LIST, split="test")
    """

    def __init__(self, root: str | Path, filelist: str | Path, split: Split = "train",
                 valid_box: tuple[int, int, int, int] | None = NYU_BTS_BOX, **kwargs) -> None:
        super().__init__(split, valid_box=valid_box, **kwargs)
        self.root = Path(root)
        self.entries = read_filelist(root, filelist)

    def __len__(self) -> int:
        return len(self.entries)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, float, str, str]:
        entry = self.entries[index]
        return read_rgb(entry.rgb), read_depth_png(entry.depth), entry.focal, entry.id, str(entry.depth)


def official_labeled_indices(split: Split) -> list[int]:
    """0-based indices of the official labeled-set split (795 train / 654 test)."""
    data = json.loads(resources.files("spd.data.splits").joinpath("nyu_labeled_official_splits.json").read_text())
    return [i - data["index_base"] for i in data[split]]


class NYULabeled(DepthDataset):
    """The official `nyu_depth_v2_labeled.mat` (HDF5, read with h5py) with the official split.

    Args:
        mat_path: the .mat file.
        depth_key: "depths" (the in-painted maps the toolbox ships) or "rawDepths".
    """

    def __init__(self, mat_path: str | Path, split: Split = "test", depth_key: str = "depths", **kwargs) -> None:
        super().__init__(split, **kwargs)
        import h5py

        self.mat_path = Path(mat_path)
        if not self.mat_path.is_file():
            raise DataError(self.mat_path, "labeled .mat file not found")
        try:
            with h5py.File(self.mat_path, "r") as f:
                missing = [k for k in ("images", depth_key) if k not in f]
                count = f["images"].shape[0] if "images" in f else 0
        except OSError as err:
            raise DataError(self.mat_path, f"not a readable HDF5 (v7.3) .mat file ({err})") from err
        if missing:
            raise DataError(self.mat_path, f"missing datasets {missing}")
        self.depth_key = depth_key
        self.indices = [i for i in official_labeled_indices(split) if i < count]
        if len(self.indices) == 0:
            raise DataError(self.mat_path, f"holds {count} frames, none of the official {split} indices")
        self._file = None  # opened lazily: h5py handles must not cross a fork into workers

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, float, str, str]:
        if self._file is None:
            import h5py

            self._file = h5py.File(self.mat_path, "r")
        frame = self.indices[index]
        rgb = np.asarray(self._file["images"][frame]).transpose(2, 1, 0)  # MATLAB (3, W, H) -> (H, W, 3)
        depth = np.asarray(self._file[self.depth_key][frame], dtype=np.float32).T  # (W, H) -> (H, W), metres
        return rgb, depth, NYU_FOCAL, f"labeled_{frame:05d}", f"{self.mat_path}[{frame}]"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"] = None
        return state
