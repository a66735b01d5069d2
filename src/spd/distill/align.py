"""A relative teacher made metric, one image at a time: least-squares scale and shift against sparse
metric points, fitted in the space the teacher predicts in (DESIGN.md §12).

A relative teacher's map `p` is affine-invariant in its own space: `s * p + t` is the true inverse
depth ("disparity", MiDaS / DPT / Depth Anything relative) or the true depth ("affine-depth") for an
unknown (s, t) per image. Fitting in that space (not on depth after inverting) is what makes the
problem linear and the fit unbiased: minimise sum_i (s p(u_i, v_i) + t - y_i)^2, y = 1 / d or d.

The points come from a dataset description (`spd.data.described`: LiDAR, SfM or hand-measured
`u, v, depth_m` rows, or depth maps) whose RGB paths name the images being labelled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spd.errors import DataLayoutError

MIN_POINTS = 3  # two unknowns, and one more so that a fit is not an interpolation of two points


@dataclass(frozen=True)
class Fit:
    scale: float
    shift: float
    points: int
    ok: bool  # False: too few points, a constant map, or a scale <= 0 (the map runs the wrong way)


def fit_scale_shift(predicted: np.ndarray, target: np.ndarray) -> Fit:
    """Least-squares (s, t) of s * predicted + t = target over 1-D arrays of matched values."""
    keep = np.isfinite(predicted) & np.isfinite(target)
    p, y = predicted[keep].astype(np.float64), target[keep].astype(np.float64)
    if p.size < MIN_POINTS or np.ptp(p) == 0:
        return Fit(float("nan"), float("nan"), int(p.size), False)
    (scale, shift), *_ = np.linalg.lstsq(np.stack([p, np.ones_like(p)], 1), y, rcond=None)
    return Fit(float(scale), float(shift), int(p.size), bool(scale > 0))


def aligned_depth(relative: np.ndarray, points: np.ndarray, space: str) -> tuple[np.ndarray, Fit]:
    """(H, W) metres from a relative map and (N, 3) `u, v, depth_m` points of the same image; a failed
    fit gives an all-zero map ("no label"). Values whose aligned disparity is <= 0 are no label."""
    height, width = relative.shape
    u = np.clip(np.round(points[:, 0]).astype(int), 0, width - 1)
    v = np.clip(np.round(points[:, 1]).astype(int), 0, height - 1)
    depth = points[:, 2]
    valid = np.isfinite(depth) & (depth > 0)
    target = 1.0 / depth[valid] if space == "disparity" else depth[valid]
    fit = fit_scale_shift(relative[v[valid], u[valid]], target)
    if not fit.ok:
        return np.zeros_like(relative, dtype=np.float32), fit
    mapped = fit.scale * relative.astype(np.float64) + fit.shift
    if space == "disparity":
        with np.errstate(divide="ignore"):
            metric = np.where(mapped > 0, 1.0 / mapped, 0.0)
    else:
        metric = np.where(mapped > 0, mapped, 0.0)
    return metric.astype(np.float32), fit


class AlignmentPoints:
    """The metric points of an alignment description, by image path (resolved)."""

    def __init__(self, description_path: str | Path) -> None:
        from spd.data.described import read_description

        self.description = read_description(description_path)
        self.frames = {frame.rgb.resolve(): frame for frame in self.description.frames + self.description.val_frames}

    def missing(self, images: list[Path]) -> list[Path]:
        """The images the description gives no labels for."""
        return [image for image in images if image.resolve() not in self.frames]

    def points_for(self, image: Path, image_hw: tuple[int, int]) -> np.ndarray:
        """(N, 3) `u, v, depth_m` of one image: its point list, or its depth map's labelled pixels."""
        from spd.data.described import read_label

        frame = self.frames.get(image.resolve())
        if frame is None:
            raise DataLayoutError(f"{image}: no alignment labels in {self.description.source}")
        depth, points = read_label(frame, self.description.depth_scale, image_hw)
        if points is not None:
            return points
        v, u = np.nonzero(depth > 0)
        return np.stack([u, v, depth[v, u]], 1).astype(np.float64)
