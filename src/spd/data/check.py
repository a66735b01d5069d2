"""`spd data check`: validate a BTS-layout dataset before training, reporting every problem at once."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spd.data.io import DataError, read_depth_png, read_rgb
from spd.data.nyu import read_filelist


@dataclass
class CheckReport:
    entries: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    sizes: Counter = field(default_factory=Counter)
    valid_fractions: list[float] = field(default_factory=list)
    depth_min: float = float("inf")
    depth_max: float = 0.0
    depth_medians: list[float] = field(default_factory=list)
    label_medians: list[float] = field(default_factory=list)  # every label > 0 of a frame, before the range filter
    labels_in_range: int = 0  # labels (pixels or points) inside (min_depth, max_depth]
    labels_total: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        lines = [f"entries: {self.entries}", f"sizes (WxH: count): {dict(self.sizes)}"]
        if self.valid_fractions:
            vf = np.array(self.valid_fractions)
            lines.append(f"valid pixels per image: mean {vf.mean():.1%}, min {vf.min():.1%}, max {vf.max():.1%}")
            lines.append(
                f"valid depth [m]: min {self.depth_min:.3f}, median of medians {np.median(self.depth_medians):.3f}, "
                f"max {self.depth_max:.3f}"
            )
        if self.label_medians:
            lines.append(f"labels [m]: median of medians {np.median(self.label_medians):.3f} over "
                         f"{len(self.label_medians)} labelled frames; {self.labels_in_range / max(self.labels_total, 1):.1%} "
                         "of labels inside the valid range")
        lines += [f"WARNING {w}" for w in self.warnings]
        lines += [f"ERROR {e}" for e in self.errors]
        lines.append("OK" if self.ok else f"{len(self.errors)} error(s)")
        return "\n".join(lines)


PLAUSIBLE_MEDIAN_M = (0.05, 100.0)  # a scene's median depth outside this is a unit mistake, not a scene
# Labels are measurements a user meant to train on: when under this share of them lies inside the
# training range, the unit is wrong even if the median looks like a scene (`depth_scale: 100` over
# millimetre PNGs: median 31 m, 0.2 % inside (0.1, 10] m). NYU's raw Kinect labels: ~100 %.
MIN_IN_RANGE_SHARE = 0.10


def label_values(depth: np.ndarray | None, points: np.ndarray | None) -> np.ndarray:
    """A frame's labels in metres: its depth map's pixels > 0 (finite), or its points' depths."""
    values = depth[depth > 0] if depth is not None else np.asarray(points)[:, 2]
    return values[np.isfinite(values) & (values > 0)]


def add_labels(report: CheckReport, values: np.ndarray, min_depth: float, max_depth: float) -> None:
    """Counts one frame's labels (metres) into the report's unit statistics."""
    report.labels_total += int(values.size)
    report.labels_in_range += int(((values > min_depth) & (values <= max_depth)).sum())
    if values.size:
        report.label_medians.append(float(np.median(values)))


def label_unit_problem(report: CheckReport, units: str, min_depth: float, max_depth: float) -> str | None:
    """Why the labels look like the wrong unit (`units` says how they were read), or None."""
    if report.labels_in_range == 0:
        seen = f" (median {np.median(report.label_medians):.4g} m)" if report.label_medians else ""
        return f"no label lies in ({min_depth}, {max_depth}] m{seen}: check {units}"
    median = float(np.median(report.label_medians))
    low, high = PLAUSIBLE_MEDIAN_M
    if not low <= median <= high:
        return (f"the labels' median depth is {median:.4g} m, implausible for a scene (expected {low} to {high} m): "
                f"check {units}")
    share = report.labels_in_range / max(report.labels_total, 1)
    if share < MIN_IN_RANGE_SHARE:
        return (f"only {share:.1%} of the labels lie in ({min_depth}, {max_depth}] m (median {median:.4g} m; a correct "
                f"unit puts most of them there): check {units}")
    return None


def check_dataset(
    root: str | Path, filelist: str | Path, min_depth: float = 1e-3, max_depth: float = 10.0, progress: bool = True
) -> CheckReport:
    """Reads every file of the list; collects missing/unreadable files, RGB-depth size mismatches,
    wrong depth dtypes and frames whose size differs from the rest, plus valid-pixel statistics."""
    from tqdm import tqdm

    report = CheckReport()
    try:
        entries = read_filelist(root, filelist)
    except DataError as err:
        report.errors.append(str(err))
        return report
    report.entries = len(entries)
    frame_sizes: dict[str, tuple[int, int]] = {}
    for entry in tqdm(entries, desc="spd data check", disable=not progress):
        rgb = depth = None
        try:
            rgb = read_rgb(entry.rgb)
        except DataError as err:
            report.errors.append(str(err))
        try:
            depth = read_depth_png(entry.depth)
        except DataError as err:
            report.errors.append(str(err))
        if rgb is None or depth is None:
            continue
        if rgb.shape[:2] != depth.shape:
            report.errors.append(
                f"{entry.depth}: depth is {depth.shape[1]}x{depth.shape[0]} but its RGB {entry.rgb.name} is "
                f"{rgb.shape[1]}x{rgb.shape[0]}"
            )
            continue
        size = (depth.shape[1], depth.shape[0])
        frame_sizes[str(entry.depth)] = size
        report.sizes[f"{size[0]}x{size[1]}"] += 1
        valid = (depth > min_depth) & (depth <= max_depth)
        report.valid_fractions.append(float(valid.mean()))
        add_labels(report, label_values(depth, None), min_depth, max_depth)
        if not valid.any():
            report.warnings.append(f"{entry.depth}: no valid depth in ({min_depth}, {max_depth}] m")
            continue
        values = depth[valid]
        report.depth_min = min(report.depth_min, float(values.min()))
        report.depth_max = max(report.depth_max, float(values.max()))
        report.depth_medians.append(float(np.median(values)))
    if len(report.sizes) > 1:
        common = max(set(frame_sizes.values()), key=list(frame_sizes.values()).count)
        for path, size in frame_sizes.items():
            if size != common:
                report.errors.append(f"{path}: frame is {size[0]}x{size[1]}, the rest of the set is {common[0]}x{common[1]}")
    _add_unit_problem(report, "the depth PNGs' unit (they are read as millimetres, value / 1000)", min_depth, max_depth)
    return report


def _add_unit_problem(report: CheckReport, units: str, min_depth: float, max_depth: float) -> None:
    if report.valid_fractions:  # some frame was read: its labels say something about their unit
        problem = label_unit_problem(report, units, min_depth, max_depth)
        if problem is not None:
            report.errors.append(problem)


def check_description(path: str | Path, min_depth: float = 1e-3, max_depth: float = 10.0, progress: bool = True) -> CheckReport:
    """`check_dataset` for a dataset description (`spd.data.described`): its list and val_list, every
    missing or unreadable RGB or label, label of the wrong dtype or size, and point outside its image
    or not finite, each named with the list line that names the file."""
    from tqdm import tqdm

    from spd.data.described import load_frame, read_description
    from spd.errors import SPDError

    report = CheckReport()
    try:
        description = read_description(path)
    except SPDError as err:
        report.errors.append(str(err))
        return report
    frames = description.frames + description.val_frames
    report.entries = len(frames)
    for frame in tqdm(frames, desc="spd data check", disable=not progress):
        try:
            rgb, depth, points = load_frame(frame, description.depth_scale)
        except DataError as err:
            report.errors.append(f"{frame.where}: {err}")
            continue
        report.sizes[f"{rgb.shape[1]}x{rgb.shape[0]}"] += 1
        add_labels(report, label_values(depth, points), min_depth, max_depth)
        values = depth[depth > 0] if depth is not None else points[:, 2]
        labelled = (depth > 0).mean() if depth is not None else len(points) / (rgb.shape[0] * rgb.shape[1])
        in_range = values[(values > min_depth) & (values <= max_depth)]
        report.valid_fractions.append(float(labelled))
        if in_range.size == 0:
            report.warnings.append(f"{frame.where}: {frame.label} has no label in ({min_depth}, {max_depth}] m")
            continue
        report.depth_min = min(report.depth_min, float(in_range.min()))
        report.depth_max = max(report.depth_max, float(in_range.max()))
        report.depth_medians.append(float(np.median(in_range)))
    _add_unit_problem(report, f"depth_scale ({description.depth_scale:g} label PNG units per metre in {path}; "
                              "millimetre PNGs need 1000)", min_depth, max_depth)
    return report


def check_training_labels(dataset, min_depth: float, max_depth: float, count: int = 8, what: str = "training") -> None:
    """The unit check of `spd data check` on `count` frames spread over a training (or validation) set,
    each part of a mixed one: DataLayoutError naming the likely cause, before the first step."""
    from spd.errors import DataLayoutError

    for part in getattr(dataset, "parts", [dataset]):
        report = CheckReport(entries=len(part))
        for index in np.linspace(0, len(part) - 1, min(count, len(part))).round().astype(int):
            rgb, depth, _, _, where, *rest = part.load(int(index))
            add_labels(report, label_values(depth, rest[0] if rest else None), min_depth, max_depth)
        units = (f"depth_scale ({part.description.depth_scale:g}) in {part.description.source}"
                 if hasattr(part, "description") else "the depth PNGs' unit (read as millimetres)")
        problem = label_unit_problem(report, units, min_depth, max_depth)
        if problem is not None:
            raise DataLayoutError(f"{what} labels, {len(report.label_medians)} frames sampled: {problem}")
