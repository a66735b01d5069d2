"""Bilinear reads and writes at the queries: `grid_sample` reads, gather-based reads, and the
splat plans the canvas writes with (DESIGN.md §3 canvas, §6 fast paths)."""

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


def channels_last_rows(maps: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B*h*w, C), one row per cell; a view (no copy) of a channels-last map."""
    return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])


def weighted_gather(table: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_j weight[..., j] * table[rows[..., j]] in one `embedding_bag` call: bilinear sampling (four
    corners) or a whole deformable-attention head (levels x points x corners) without materialising
    the gathered rows. The fast path beside `F.grid_sample`; tests hold them equal.

    Shape: table (N, C); rows (..., J) long; weight (..., J) -> (..., C).
    """
    bags = rows.reshape(-1, rows.shape[-1])
    out = F.embedding_bag(bags, table, per_sample_weights=weight.reshape(bags.shape).to(table.dtype), mode="sum")
    return out.view(*rows.shape[:-1], table.shape[-1])


@dataclass
class SplatPlan:
    """Where and how strongly each query reads from and writes into one map: the four bilinear
    corners of its position (the weights `sample_at` uses), computed once per decode call and
    reused by every decoder layer, since the queries do not move.

    Shape:
        index (B, 4K) flat cell indices; beta (B, 4K) weights, 0 for corners outside the map and for
        masked queries; weight_sum (B, 1, h, w) = the sum of beta per cell; rows (B, K, 4) the
        corners' rows in `channels_last_rows` of a (B, C, h, w) map; soft_beta (B, K, 4) =
        beta / (weight_sum of its cell + 1), the canvas soft-mean weights.
    """

    index: torch.Tensor
    beta: torch.Tensor
    size: tuple[int, int]
    weight_sum: torch.Tensor
    rows: torch.Tensor
    soft_beta: torch.Tensor

    def splat(self, values: torch.Tensor) -> torch.Tensor:
        """Sum of beta * value per cell. values (B, K, C) -> (B, C, h, w) in channels-last memory."""
        batch, num_queries, channels = values.shape
        height, width = self.size
        contributions = (values.unsqueeze(2) * self.beta.view(batch, num_queries, 4, 1)).view(batch, -1, channels)
        flat = contributions.new_zeros(batch, height * width, channels)
        flat.scatter_add_(1, self.index.unsqueeze(-1).expand(-1, -1, channels), contributions)
        return flat.view(batch, height, width, channels).permute(0, 3, 1, 2)  # a view, no copy

    def add_soft_mean_(self, level: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """In place: `level += splat(values) / (weight_sum + 1)`, touching only the written cells.

        The fast path of the canvas write (no dense zero map, division or addition); `level` must be
        a channels-last (B, C, h, w) map owned by the caller. values (B, K, C). Returns `level`.
        """
        if not level.is_contiguous(memory_format=torch.channels_last):
            raise ValueError("add_soft_mean_ needs a channels-last map (it writes through a row view)")
        contributions = (values.unsqueeze(2) * self.soft_beta.unsqueeze(-1)).to(level.dtype)  # (B, K, 4, C)
        channels_last_rows(level).index_add_(0, self.rows.reshape(-1), contributions.reshape(-1, values.shape[-1]))
        return level

    def read(self, level: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Bilinear samples of a channels-last (B, C, h, w) map at the queries -> (B, K, C), each
        query's sample multiplied by `scale` (B, K) when given.

        Equals `sample_at(level, grid)` for real queries; masked queries read 0.
        """
        beta = self.beta.view(self.rows.shape)
        if scale is not None:
            beta = beta * scale.unsqueeze(-1)
        return weighted_gather(channels_last_rows(level), self.rows, beta)


def make_splat_plan(grid: torch.Tensor, mask: torch.Tensor, size: tuple[int, int]) -> SplatPlan:
    """Shape: grid (B, K, 2) normalised, mask (B, K) bool, size (h, w) -> SplatPlan."""
    batch, num_queries = grid.shape[:2]
    height, width = size
    corner_index, beta = bilinear_corners(grid, size)  # (B, K, 4)
    beta = beta * mask.unsqueeze(-1)
    index, beta = corner_index.view(batch, -1), beta.view(batch, -1)
    weight_sum = beta.new_zeros(batch, height * width).scatter_add_(1, index, beta)
    soft_beta = beta / (torch.gather(weight_sum, 1, index) + 1.0)
    rows = corner_index + (torch.arange(batch, device=grid.device) * (height * width)).view(batch, 1, 1)
    return SplatPlan(
        index, beta, size, weight_sum.view(batch, 1, height, width), rows, soft_beta.view(batch, num_queries, 4)
    )


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
