"""Depth metrics with one definition (BTS / ZoeDepth, DESIGN.md §5): per image, then the mean.

    abs_rel  = mean(|d - g| / g)          sq_rel = mean((d - g)^2 / g)
    rmse     = sqrt(mean((d - g)^2))      rmse_log = sqrt(mean((ln d - ln g)^2))
    log10    = mean(|log10 d - log10 g|)  silog = 100 * sqrt(mean(e^2) - mean(e)^2), e = ln d - ln g
    delta_n  = mean(max(d/g, g/d) < 1.25^n), n = 1, 2, 3

Evaluated where min_depth < g < max_depth (BTS's strict bounds) and inside the optional mask;
predictions are clamped to [min_depth, max_depth] (NaN -> min, inf -> max) first.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from spd.errors import DataLayoutError

class NoValidGroundTruth(DataLayoutError):
    """An evaluation found no valid ground-truth pixel in any image."""


METRIC_NAMES = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog", "delta1", "delta2", "delta3")
LOWER_IS_BETTER = {"abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog"}


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def depth_metrics(pred, gt, mask=None, min_depth: float = 1e-3, max_depth: float = 10.0) -> dict[str, float] | None:
    """The nine metrics for one image. pred, gt: same shape, metres (arrays or tensors).

    Returns None when no pixel is valid (the image then does not enter a dataset mean).
    """
    pred, gt = _as_numpy(pred), _as_numpy(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} must have the same shape")
    valid = (gt > min_depth) & (gt < max_depth)
    if mask is not None:
        valid &= _as_numpy(mask).astype(bool)
    if not valid.any():
        return None
    pred = np.nan_to_num(pred, nan=min_depth, posinf=max_depth, neginf=min_depth)
    d = np.clip(pred[valid], min_depth, max_depth)
    g = gt[valid]
    ratio = np.maximum(d / g, g / d)
    log_err = np.log(d) - np.log(g)
    return {
        "abs_rel": float(np.mean(np.abs(d - g) / g)),
        "sq_rel": float(np.mean((d - g) ** 2 / g)),
        "rmse": float(np.sqrt(np.mean((d - g) ** 2))),
        "rmse_log": float(np.sqrt(np.mean(log_err**2))),
        "log10": float(np.mean(np.abs(np.log10(d) - np.log10(g)))),
        "silog": float(100.0 * math.sqrt(max(np.mean(log_err**2) - np.mean(log_err) ** 2, 0.0))),
        "delta1": float(np.mean(ratio < 1.25)),
        "delta2": float(np.mean(ratio < 1.25**2)),
        "delta3": float(np.mean(ratio < 1.25**3)),
    }


class MetricAccumulator:
    """Sums per-image metrics; `compute()` gives the mean over images.

    Exact across distributed ranks: each rank evaluates its own disjoint share of the images (no
    padding, no drops) and `all_reduce()` adds the sums and counts.
    """

    def __init__(self) -> None:
        self.sums = np.zeros(len(METRIC_NAMES), dtype=np.float64)
        self.count = 0
        self.skipped = 0  # images with no valid pixel

    def update(self, metrics: dict[str, float] | None) -> None:
        if metrics is None:
            self.skipped += 1
            return
        self.sums += np.array([metrics[name] for name in METRIC_NAMES])
        self.count += 1

    def all_reduce(self) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        backend_cuda = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if backend_cuda else torch.device("cpu")
        packed = torch.tensor([*self.sums, self.count, self.skipped], dtype=torch.float64, device=device)
        dist.all_reduce(packed)
        values = packed.cpu().numpy()
        self.sums, self.count, self.skipped = values[:-2], int(round(values[-2])), int(round(values[-1]))

    def compute(self) -> dict[str, float]:
        if self.count == 0:  # a label-content problem, reported in one line (DataLayoutError is a ValueError)
            raise NoValidGroundTruth(f"none of the {self.skipped} evaluated images had a ground-truth label inside the "
                                     "evaluation depth range: nothing to average (check the labels' unit, e.g. a "
                                     "description's depth_scale, and --min-depth / --max-depth)")
        return {name: float(v) for name, v in zip(METRIC_NAMES, self.sums / self.count)}


def format_metrics(rows: dict[str, dict[str, float]]) -> str:
    """A table: one row per model (name -> metrics), one column per metric."""
    header = f"{'':<12}" + "".join(f"{name:>10}" for name in METRIC_NAMES)
    lines = [header]
    for label, metrics in rows.items():
        lines.append(f"{label:<12}" + "".join(f"{metrics[name]:>10.4f}" for name in METRIC_NAMES))
    return "\n".join(lines)
