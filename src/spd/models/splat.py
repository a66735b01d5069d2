"""The reference paths' bilinear reads and writes at the queries: `grid_sample` reads and the dense
splat plans the canvas writes with (DESIGN.md §3 canvas). Differentiable; training runs them. The
inference paths beside them live in `spd.models.rows`; tests hold the two equal."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spd.geometry.coords import bilinear_corners


def sample_at(feature: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of a map at normalised points, zeros outside.

    Shape:
        feature: (B, C, h, w); grid: (B, K, 2) normalised. Returns (B, K, C).
    """
    sampled = F.grid_sample(feature, grid.unsqueeze(2), mode="bilinear", padding_mode="zeros", align_corners=False)
    return sampled.squeeze(3).transpose(1, 2)  # (B, C, K, 1) -> (B, K, C)


@dataclass
class SplatPlan:
    """Where and how strongly each query reads from and writes into one map: the four bilinear
    corners of its position (the weights `sample_at` uses), computed once per decode call and
    reused by every decoder layer, since the queries do not move.

    Shape:
        index (B, 4K) flat cell indices; beta (B, 4K) weights, 0 for corners outside the map and for
        masked queries; weight_sum (B, 1, h, w) = the sum of beta per cell.
    """

    index: torch.Tensor
    beta: torch.Tensor
    size: tuple[int, int]
    weight_sum: torch.Tensor

    def splat(self, values: torch.Tensor) -> torch.Tensor:
        """Sum of beta * value per cell. values (B, K, C) -> (B, C, h, w) in channels-last memory."""
        batch, num_queries, channels = values.shape
        height, width = self.size
        contributions = (values.unsqueeze(2) * self.beta.view(batch, num_queries, 4, 1)).view(batch, -1, channels)
        flat = contributions.new_zeros(batch, height * width, channels)
        flat.scatter_add_(1, self.index.unsqueeze(-1).expand(-1, -1, channels), contributions)
        return flat.view(batch, height, width, channels).permute(0, 3, 1, 2)  # a view, no copy


def make_splat_plan(grid: torch.Tensor, mask: torch.Tensor, size: tuple[int, int]) -> SplatPlan:
    """Shape: grid (B, K, 2) normalised, mask (B, K) bool, size (h, w) -> SplatPlan."""
    batch, num_queries = grid.shape[:2]
    height, width = size
    corner_index, beta = bilinear_corners(grid, size)  # (B, K, 4)
    beta = beta * mask.unsqueeze(-1)
    index, beta = corner_index.view(batch, -1), beta.view(batch, -1)
    weight_sum = beta.new_zeros(batch, height * width).scatter_add_(1, index, beta)
    return SplatPlan(index, beta, size, weight_sum.view(batch, 1, height, width))


def bilinear_splat(
    values: torch.Tensor, grid: torch.Tensor, weights_mask: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adjoint of `sample_at`: scatters per-query values into a map with bilinear weights.

    Shape:
        values: (B, K, C); grid: (B, K, 2) normalised; weights_mask: (B, K) bool; size: (h, w).
        Returns (weighted_sum (B, C, h, w), weight_sum (B, 1, h, w)).
    """
    plan = make_splat_plan(grid, weights_mask, size)
    return plan.splat(values), plan.weight_sum
