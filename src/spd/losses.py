"""Training losses (DESIGN.md §4): per-image SILog on the queries plus two dense auxiliary SILogs."""

from __future__ import annotations

import torch

from spd.data.queries import downsample_valid_mean
from spd.geometry.windows import gather_windows


def silog_per_image(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor, lam: float = 0.5) -> torch.Tensor:
    """sqrt(mean d^2 - lam * (mean d)^2), d = ln pred - ln gt over each image's valid entries,
    averaged over the images that have at least one valid entry.

    Shape:
        pred, gt, mask: (B, ...) with the same shape; mask bool. Returns a scalar.
    """
    batch = pred.shape[0]
    pred, gt, mask = pred.reshape(batch, -1), gt.reshape(batch, -1), mask.reshape(batch, -1)
    weights = mask.to(pred.dtype)
    # Masked entries may hold 0 (holes): keep their logs finite so 0 * log never makes NaN.
    diff = (torch.log(pred.clamp_min(1e-6)) - torch.log(torch.where(mask, gt, torch.ones_like(gt)))) * weights
    count = weights.sum(1)
    has_valid = count > 0
    count = count.clamp_min(1)
    mean = diff.sum(1) / count
    mean_sq = diff.square().sum(1) / count
    per_image = torch.sqrt((mean_sq - lam * mean.square()).clamp_min(0) + 1e-8)
    return (per_image * has_valid).sum() / has_valid.sum().clamp_min(1)


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
) -> dict[str, torch.Tensor]:
    """The weighted total and each term.

    Args:
        out: model output with `return_aux=True`.
        batch: `depth` (B, 1, H, W) m, `valid` (B, 1, H, W), `queries` (B, K, 2), `query_mask` (B, K).
        patch_origin: (B, K, 2) top-left pixel of each query's LDRM patch (None without LDRM).
    """
    depth, valid, queries, query_mask = batch["depth"], batch["valid"], batch["queries"], batch["query_mask"]
    query_valid = query_mask & depth_at_queries(valid.to(depth.dtype), queries).bool()
    terms = {"sparse": silog_per_image(out["depth"], depth_at_queries(depth, queries), query_valid, lam)}
    canvas_gt, canvas_valid = downsample_valid_mean(depth, valid, stride=4)
    terms["canvas"] = silog_per_image(out["canvas_depth"], canvas_gt, canvas_valid, lam)
    total = terms["sparse"] + canvas_weight * terms["canvas"]
    if "ldrm_patch_depth" in out and patch_origin is not None:
        size = out["ldrm_patch_depth"].shape[-1]
        gt = gather_windows(torch.cat([depth, valid.to(depth.dtype)], 1), patch_origin, size)  # (B, K, 2, S, S)
        patch_valid = (gt[:, :, 1] > 0.5) & query_mask[..., None, None]
        terms["patch"] = silog_per_image(out["ldrm_patch_depth"], gt[:, :, 0], patch_valid, lam)
        total = total + patch_weight * terms["patch"]
    terms["total"] = total
    return terms


def baseline_losses(
    out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], dense_weight: float = 1.0, lam: float = 0.5
) -> dict[str, torch.Tensor]:
    """The dense baseline's loss: the same per-image SILog on the K queries as SPD, plus
    `dense_weight` x SILog of its full map against every valid GT pixel (its native supervision).

    Args:
        out: `DepthAnythingBaseline` output with `return_aux=True` (`depth` (B, K), `dense_depth` (B, 1, H, W)).
        batch: as for `spd_losses`.
    """
    depth, valid, queries, query_mask = batch["depth"], batch["valid"], batch["queries"], batch["query_mask"]
    query_valid = query_mask & depth_at_queries(valid.to(depth.dtype), queries).bool()
    terms = {"sparse": silog_per_image(out["depth"], depth_at_queries(depth, queries), query_valid, lam)}
    terms["dense"] = silog_per_image(out["dense_depth"], depth, valid.bool(), lam)
    terms["total"] = terms["sparse"] + dense_weight * terms["dense"]
    return terms
