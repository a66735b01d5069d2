"""`spd distill label`: a teacher's depth maps on unlabelled images, written as a dataset description.

    OUT/manifest.json       the teacher (path, kind, config and weights SHA-256), the images, the camera,
                            the settings and the command: what the labels are and how to make them again
    OUT/labels/<name>.npy   one (H, W) float16 map per image, metres, 0 = no label (or a uint16 mm .png)
    OUT/train.txt, val.txt  `rgb label` lines (RGB paths absolute)
    OUT/labels.yaml         the description `spd train --data-root`, `spd data check`, `spd eval` and
                            `data.mix` take (DESIGN.md §9), with the images' intrinsics when given

The unit of work is one batch of images: batch j is images [j B, (j + 1) B) of the sorted list,
whatever the sharding, and shard I of N takes the batches j with j mod N = I (torchrun ranks
subdivide a shard). A teacher's output depends on its batch only, so the union of the shards is
exactly one process's output, bitwise. A batch is done when all its label files exist; each file is
written to a temporary name and renamed (`atomic_write`), so Ctrl-C, a kill or a full disk never
leaves a partial file under a label's name, and a rerun of the same command labels only what is
missing (a half-done batch is recomputed whole: its finished files are rewritten with the same bits).
The lists and the description are written by whichever process finds every label present.

The teacher's invalid outputs (non-finite, <= 0, above `max_depth`) are stored as 0, "no label".
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from spd.data.io import read_rgb
from spd.distill.align import AlignmentPoints, aligned_depth
from spd.distill.images import ImageSet
from spd.errors import DataLayoutError, UserInputError
from spd.models.folder import atomic_write

MANIFEST = "manifest.json"
DESCRIPTION = "labels.yaml"
FORMAT_VERSION = "spd-distill-labels/1"
LABEL_FORMATS = ("npy", "png")
PNG_MAX_M = 65.535  # uint16 millimetres


@dataclass(frozen=True)
class LabelSettings:
    max_depth: float = 10.0
    label_format: str = "npy"
    batch_size: int = 4
    dtype: str = "fp32"
    val_fraction: float = 0.05
    intrinsics: tuple[float, float, float, float] | None = None

    def check(self) -> None:
        if self.label_format not in LABEL_FORMATS:
            raise UserInputError(f"--format must be one of {LABEL_FORMATS}, got {self.label_format!r}")
        if not (0 < self.max_depth < float("inf")):
            raise UserInputError(f"--max-depth must be a positive number of metres, got {self.max_depth}")
        if self.label_format == "png" and self.max_depth > PNG_MAX_M:
            raise UserInputError(f"--format png holds at most {PNG_MAX_M} m (uint16 millimetres); --max-depth "
                                 f"{self.max_depth:g} needs --format npy")
        if not 0 <= self.val_fraction < 1:
            raise UserInputError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    def batches(self, total: int) -> list[int]:
        return [j for j in range(total) if j % self.count == self.index]


def parse_shard(text: str) -> Shard:
    """'I/N' -> Shard(I, N), 0 <= I < N."""
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserInputError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= index < count:
        raise UserInputError(f"--shard {text}: needs 0 <= I < N")
    return Shard(index, count)


def label_name(name: str, label_format: str) -> str:
    return str(Path("labels") / Path(name).with_suffix(f".{label_format}"))


def is_validation(name: str, fraction: float) -> bool:
    """A stable share of the images for validation, by a hash of the name (independent of the order,
    of the sharding and of which other images are in the set)."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def manifest_for(images: ImageSet, teacher_info, settings: LabelSettings, alignment: str | None, command: str) -> dict:
    """The manifest; `identity` holds what two runs into one folder must share to be one run."""
    identity = {
        "format": FORMAT_VERSION,
        "teacher": teacher_info.identity(),
        "images": {"source": str(images.source.resolve()), "count": len(images.images), "size_hw": list(images.size),
                   "skipped": [name for name, _ in images.skipped]},
        "alignment": str(Path(alignment).resolve()) if alignment else None,
        "settings": {"max_depth": settings.max_depth, "label_format": settings.label_format,
                     "batch_size": settings.batch_size, "dtype": settings.dtype, "val_fraction": settings.val_fraction,
                     "intrinsics": list(settings.intrinsics) if settings.intrinsics else None},
    }
    return {"identity": identity,
            "teacher": {"path": teacher_info.path, **teacher_info.identity(), **teacher_info.details},
            "intrinsics": list(settings.intrinsics) if settings.intrinsics else None,
            "skipped_unreadable": [{"image": name, "why": why} for name, why in images.skipped],
            "command": command}


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def claim_output(out: Path, manifest: dict, write: bool) -> None:
    """Makes `out` this run's folder: new (manifest written when `write`), or one whose manifest has
    the same identity (a rerun resumes it). Refuses a file, a folder of other things, or another run."""
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out}: is a file; give a folder")
    if not out.parent.is_dir():
        raise UserInputError(f"--out {out}: folder {out.parent} does not exist (create it first)")
    path = out / MANIFEST
    if path.is_file():
        try:
            old = json.loads(path.read_text())["identity"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise DataLayoutError(f"--out {out}: {MANIFEST} is not a labelling manifest; use another --out") from None
        differing = _differences(old, manifest["identity"])
        if differing:
            raise DataLayoutError(f"--out {out}: holds another run's labels (differs in {', '.join(differing[:6])}); "
                                  "use a new --out, or delete it to relabel")
        return
    if out.is_dir() and any(out.iterdir()):
        raise DataLayoutError(f"--out {out}: not empty and holds no {MANIFEST} (not a labelling folder); use a new --out")
    if write:
        (out / "labels").mkdir(parents=True, exist_ok=True)
        text = json.dumps(manifest, indent=2)
        atomic_write(path, lambda p: p.write_text(text))


def clean_labels(teacher_map: np.ndarray, max_depth: float) -> np.ndarray:
    """Metres with the teacher's invalid outputs (non-finite, <= 0, > max_depth) as 0 = no label."""
    keep = np.isfinite(teacher_map) & (teacher_map > 0) & (teacher_map <= max_depth)
    return np.where(keep, teacher_map, 0.0).astype(np.float32)


def write_label(path: Path, depth_m: np.ndarray, label_format: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if label_format == "npy":
        values = depth_m.astype(np.float16)

        def save(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # np.save on a path would add ".npy" to the temporary name
                np.save(f, values, allow_pickle=False)

        atomic_write(path, save)
    else:
        atomic_write(path, lambda tmp: write_depth_png_to(tmp, depth_m))


def write_depth_png_to(tmp: Path, depth_m: np.ndarray) -> None:
    """`spd.data.io.write_depth_png`'s millimetres (the same rounding), to a temporary name whose
    suffix is not .png: the format is named, not taken from the suffix."""
    from PIL import Image

    millimetres = np.clip(np.round(depth_m * 1000.0), 0, 65535).astype(np.uint16)
    with open(tmp, "wb") as f:
        Image.fromarray(millimetres).save(f, format="PNG")


@dataclass
class LabelSummary:
    total: int
    labelled_now: int
    present: int
    failed_alignment: list[str]
    complete: bool
    description: Path | None


class LabelJob:
    """One labelling run over `images` into `out` (see the module docstring)."""

    def __init__(self, images: ImageSet, teacher, out: Path, settings: LabelSettings, shard: Shard = Shard(),
                 alignment: str | None = None, command: str = "", rank: int = 0, world_size: int = 1) -> None:
        settings.check()
        if teacher.space != "metric" and alignment is None:
            raise UserInputError(f"--teacher {teacher.info.path}: predicts relative {teacher.space} (affine-invariant, "
                                 "no metres); give --align DESCRIPTION.yaml with metric points for each image (LiDAR, "
                                 "SfM), or use a metric teacher")
        self.images, self.teacher, self.out, self.settings = images, teacher, Path(out), settings
        self.alignment = AlignmentPoints(alignment) if alignment and teacher.space != "metric" else None
        if alignment and teacher.space == "metric":
            raise UserInputError(f"--align: the teacher {teacher.info.path} is metric already; drop --align")
        if self.alignment is not None:
            missing = self.alignment.missing([image.path for image in images.images])
            if missing:
                raise DataLayoutError(f"--align {alignment}: no metric points for {len(missing)} of "
                                      f"{len(images.images)} images (e.g. {missing[0]})")
        names = [label_name(image.name, settings.label_format) for image in images.images]
        if len(set(names)) != len(names):
            clash = next(n for n in names if names.count(n) > 1)
            raise DataLayoutError(f"--images {images.source}: two images would share the label {clash} (same name, "
                                  "other suffix): rename one")
        self.label_paths = [self.out / name for name in names]
        # torchrun ranks split each --shard further: global shard = shard.index * world + rank
        self.shard = Shard(shard.index * world_size + rank, shard.count * world_size)
        self.rank = rank
        self.manifest = manifest_for(images, teacher.info, settings, alignment, command)
        self.failed_alignment: list[str] = []

    def batches(self) -> list[list[int]]:
        size = self.settings.batch_size
        count = len(self.images.images)
        return [list(range(start, min(start + size, count))) for start in range(0, count, size)]

    def _todo(self) -> list[list[int]]:
        all_batches = self.batches()
        mine = [all_batches[j] for j in self.shard.batches(len(all_batches))]
        return [batch for batch in mine if not all(self.label_paths[i].is_file() for i in batch)]

    def _teacher_maps(self, rgbs: list[np.ndarray], batch: list[int]) -> list[np.ndarray]:
        maps = self.teacher.predict(rgbs)
        if self.alignment is None:
            return maps
        aligned = []
        for index, relative in zip(batch, maps):
            image = self.images.images[index]
            points = self.alignment.points_for(image.path, relative.shape)
            depth, fit = aligned_depth(relative, points, self.teacher.space)
            if not fit.ok:
                self.failed_alignment.append(image.name)
            aligned.append(depth)
        return aligned

    def run(self, progress: bool = True) -> LabelSummary:
        from tqdm import tqdm

        todo = self._todo()
        bar = tqdm(total=sum(len(b) for b in todo), desc="spd distill label", unit="img",
                   disable=not (progress and todo), file=sys.stderr)
        labelled = 0
        # the next batch's files decode in a thread while the teacher runs (PIL releases the GIL)
        with ThreadPoolExecutor(max_workers=1) as reader:
            pending = reader.submit(self._read, todo[0]) if todo else None
            for position, batch in enumerate(todo):
                rgbs = pending.result()
                pending = reader.submit(self._read, todo[position + 1]) if position + 1 < len(todo) else None
                for index, teacher_map in zip(batch, self._teacher_maps(rgbs, batch)):
                    write_label(self.label_paths[index], clean_labels(teacher_map, self.settings.max_depth),
                                self.settings.label_format)
                labelled += len(batch)
                bar.update(len(batch))
        bar.close()
        present = sum(path.is_file() for path in self.label_paths)
        complete = present == len(self.label_paths)
        description = self.write_description() if complete and self.rank == 0 else None
        return LabelSummary(len(self.label_paths), labelled, present, self.failed_alignment, complete, description)

    def _read(self, batch: list[int]) -> list[np.ndarray]:
        rgbs = []
        for index in batch:
            image = self.images.images[index]
            rgb = read_rgb(image.path)  # DataError naming the file: a file broken after the header check
            if rgb.shape[:2] != self.images.size:
                raise DataLayoutError(f"{image.path}: is {rgb.shape[1]}x{rgb.shape[0]}, the set is "
                                      f"{self.images.size[1]}x{self.images.size[0]}")
            rgbs.append(rgb)
        return rgbs

    def write_description(self) -> Path:
        """train.txt, val.txt and labels.yaml (each atomically; the same bytes from any process)."""
        train, val = [], []
        for image, path in zip(self.images.images, self.label_paths):
            line = f"{image.path} {path.relative_to(self.out).as_posix()}"
            (val if is_validation(image.name, self.settings.val_fraction) else train).append(line)
        if not val and self.settings.val_fraction > 0 and len(train) > 1:
            val.append(train.pop())  # a small set: one validation image rather than none
        description = {"root": ".", "list": "train.txt", "depth_scale": 1000.0}
        if val:
            description["val_list"] = "val.txt"
        if self.settings.intrinsics is not None:
            description["intrinsics"] = list(self.settings.intrinsics)
        files = {"train.txt": "\n".join(train) + "\n", "val.txt": "\n".join(val) + ("\n" if val else ""),
                 DESCRIPTION: "# written by `spd distill label` (manifest.json says from which teacher)\n"
                              + yaml.safe_dump(description, sort_keys=False)}
        for name, text in files.items():
            if name == "val.txt" and not val:
                continue
            atomic_write(self.out / name, lambda p, text=text: p.write_text(text))
        return self.out / DESCRIPTION


def command_line(argv: list[str]) -> str:
    """`spd` + the command's arguments as given, without `--shard` (the same for every shard of a job)."""
    words, skip = [], False
    for word in argv:
        if skip or word.startswith("--shard="):
            skip = False
            continue
        skip = word == "--shard"
        if not skip:
            words.append(word)
    return " ".join(["spd", *words])


def environment_rank() -> tuple[int, int]:
    """(rank, world size) under torchrun, (0, 1) otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
