"""Training losses (DESIGN.md §4): per-image SILog on the queries plus two dense auxiliary SILogs."""

from __future__ import annotations

import torch

from spd.data.queries import downsample_valid_mean
from spd.geometry.windows import gather_windows


def silog_per_image(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor, lam: float = 0.5,
                    trim: float = 0.0) -> torch.Tensor:
    """sqrt(mean d^2 - lam * (mean d)^2), d = ln pred - ln gt over each image's valid entries,
    averaged over the images that have at least one valid entry. `trim` > 0 first leaves out each
    image's floor(trim x count) valid entries of largest |d - mean d| (`largest_error_mask`).

    Shape:
        pred, gt, mask: (B, ...) with the same shape; mask bool. Returns a scalar.
    """
    batch = pred.shape[0]
    pred, gt, mask = pred.reshape(batch, -1), gt.reshape(batch, -1), mask.reshape(batch, -1)
    # Masked entries may hold 0 (holes): keep their logs finite so 0 * log never makes NaN.
    log_error = torch.log(pred.clamp_min(1e-6)) - torch.log(torch.where(mask, gt, torch.ones_like(gt)))
    if trim > 0:
        mask = mask & ~largest_error_mask(log_error.detach(), mask, trim)
    weights = mask.to(pred.dtype)
    diff = log_error * weights
    count = weights.sum(1)
    has_valid = count > 0
    count = count.clamp_min(1)
    mean = diff.sum(1) / count
    mean_sq = diff.square().sum(1) / count
    per_image = torch.sqrt((mean_sq - lam * mean.square()).clamp_min(0) + 1e-8)
    return (per_image * has_valid).sum() / has_valid.sum().clamp_min(1)


def largest_error_mask(log_error: torch.Tensor, mask: torch.Tensor, trim: float) -> torch.Tensor:
    """(B, N) bool: per image, the floor(trim x valid count) valid entries farthest from the image's
    mean log error (ties broken by position), the share a pseudo-label loss ignores.

    Shape: log_error, mask (B, N) -> (B, N)."""
    count = mask.sum(1, keepdim=True)
    mean = (log_error * mask).sum(1, keepdim=True) / count.clamp_min(1)
    distance = torch.where(mask, (log_error - mean).abs(), torch.full_like(log_error, -1.0))  # invalid: last
    rank = distance.argsort(dim=1, descending=True, stable=True).argsort(dim=1)  # 0 = the largest error
    return mask & (rank < (count.to(log_error.dtype) * trim).floor().long())


def depth_at_queries(depth: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """GT at integer pixel queries. depth (B, 1, H, W), queries (B, K, 2) -> (B, K)."""
    u = queries[..., 0].round().long().clamp(0, depth.shape[-1] - 1)
    v = queries[..., 1].round().long().clamp(0, depth.shape[-2] - 1)
    flat = depth[:, 0].flatten(1)
    return torch.gather(flat, 1, v * depth.shape[-1] + u)


def spd_losses(
    out: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    patch_origin: torch.Tensor | None,
    canvas_weight: float = 0.5,
    patch_weight: float = 0.3,
    lam: float = 0.5,
    trim: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The weighted total and each term.

    Args:
        out: model output with `return_aux=True`.
        batch: `depth` (B, 1, H, W) m, `valid` (B, 1, H, W), `queries` (B, K, 2), `query_mask` (B, K).
        patch_origin: (B, K, 2) top-left pixel of each query's LDRM patch (None without LDRM).
        trim: the share of each term's largest errors left out (`silog_per_image`; 0 = none).
    """
    depth, valid, queries, query_mask = batch["depth"], batch["valid"], batch["queries"], batch["query_mask"]
    query_valid = query_mask & depth_at_queries(valid.to(depth.dtype), queries).bool()
    terms = {"sparse": silog_per_image(out["depth"], depth_at_queries(depth, queries), query_valid, lam, trim)}
    canvas_gt, canvas_valid = downsample_valid_mean(depth, valid, stride=4)
    terms["canvas"] = silog_per_image(out["canvas_depth"], canvas_gt, canvas_valid, lam, trim)
    total = terms["sparse"] + canvas_weight * terms["canvas"]
    if "ldrm_patch_depth" in out and patch_origin is not None:
        size = out["ldrm_patch_depth"].shape[-1]
        gt = gather_windows(torch.cat([depth, valid.to(depth.dtype)], 1), patch_origin, size)  # (B, K, 2, S, S)
        patch_valid = (gt[:, :, 1] > 0.5) & query_mask[..., None, None]
        terms["patch"] = silog_per_image(out["ldrm_patch_depth"], gt[:, :, 0], patch_valid, lam, trim)
        total = total + patch_weight * terms["patch"]
    terms["total"] = total
    return terms


def baseline_losses(
    out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], dense_weight: float = 1.0, lam: float = 0.5,
    trim: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The dense baseline's loss: the same per-image SILog on the K queries as SPD, plus
    `dense_weight` x SILog of its full map against every valid GT pixel (its native supervision).

    Args:
        out: `DepthAnythingBaseline` output with `return_aux=True` (`depth` (B, K), `dense_depth` (B, 1, H, W)).
        batch: as for `spd_losses`.
    """
    depth, valid, queries, query_mask = batch["depth"], batch["valid"], batch["queries"], batch["query_mask"]
    query_valid = query_mask & depth_at_queries(valid.to(depth.dtype), queries).bool()
    terms = {"sparse": silog_per_image(out["depth"], depth_at_queries(depth, queries), query_valid, lam, trim)}
    terms["dense"] = silog_per_image(out["dense_depth"], depth, valid.bool(), lam, trim)
    terms["total"] = terms["sparse"] + dense_weight * terms["dense"]
    return terms
