"""Multi-scale deformable cross-attention with per-head L3/L4 value projections (DESIGN.md §3).

Deformable-DETR style: each head predicts `n_points` offsets per level around the query's own
position and a softmax over (levels x points). L1/L2 values are identity maps (head i reads
channels [32i, 32i+32)); L3/L4 use per-head bias-free Linear(C_l -> 32). Because bilinear sampling
and a bias-free linear map commute, the projection can be applied to the whole map first or to
the sampled points afterwards; `value_proj_order` picks the cheaper one (same result).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

ValueProjOrder = Literal["auto", "project_first", "sample_first"]
PROJECT_FIRST_FACTOR = 8  # "auto" projects the whole map first when h*w <= 8 * K * points


class MSDeformableAttention(nn.Module):
    """Args:
        d_model: query width d; n_heads: heads of d / n_heads channels.
        level_dims: channels of each value map; a level whose channels equal d and that is not
            in `projected_levels` is an identity map.
        n_points: sampling points per head per level.
        projected_levels: indices of levels that get per-head bias-free value projections.
        value_proj_order: "auto" picks by cost, the others force one order (tests, benchmarks).

    Shape:
        forward: h (B, K, d), grid (B, K, 2) normalised query positions, maps [(B, C_l, h_l, w_l)]
        -> (B, K, d).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        level_dims: tuple[int, ...],
        n_points: int,
        projected_levels: tuple[int, ...],
        value_proj_order: ValueProjOrder = "auto",
    ) -> None:
        super().__init__()
        self.d_model, self.n_heads, self.n_points = d_model, n_heads, n_points
        self.n_levels = len(level_dims)
        self.value_proj_order = value_proj_order
        self.sampling_offsets = nn.Linear(d_model, n_heads * self.n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * self.n_levels * n_points)
        self.value_proj = nn.ModuleList(
            nn.Linear(dim, d_model, bias=False) if level in projected_levels else nn.Identity()
            for level, dim in enumerate(level_dims)
        )
        for level, dim in enumerate(level_dims):
            if level not in projected_levels and dim != d_model:
                raise ValueError(f"level {level} has {dim} channels; an identity value map needs {d_model}")
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Deformable-DETR initialisation: zero offset weights and a bias that places head i's
        # points on a ray at angle 2*pi*i/H, point p at distance p+1 cells. Convergence depends on it.
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in self.value_proj:
            if isinstance(proj, nn.Linear):
                nn.init.xavier_uniform_(proj.weight)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def sampling(
        self, h: torch.Tensor, grid: torch.Tensor, level_sizes: list[tuple[int, int]]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Sampling locations per level and attention weights.

        Returns:
            locations: per level (B, K, H, P, 2) normalised grid coordinates.
            weights: (B, K, H, L, P), softmax over L*P per head.
        """
        batch, num_queries, _ = h.shape
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        offsets = self.sampling_offsets(h).view(batch, num_queries, heads, levels, points, 2)
        weights = self.attention_weights(h).view(batch, num_queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, num_queries, heads, levels, points)
        locations = []
        for level, (height, width) in enumerate(level_sizes):
            # Offsets are in cells of this level; a cell spans 2/w in normalised units.
            cell = h.new_tensor([2.0 / width, 2.0 / height])
            locations.append(grid[:, :, None, None, :] + offsets[:, :, :, level] * cell)  # (B, K, H, P, 2)
        return locations, weights

    def _use_project_first(self, level: int, value: torch.Tensor, num_queries: int) -> bool:
        if self.value_proj_order != "auto":
            return self.value_proj_order == "project_first"
        # MACs: project-first h*w*C*d once; sample-first K*P*C*d (every head samples P points).
        # But sample-first also bilinearly samples all C channels at K*H*P points, which costs far
        # more time per MAC on CPU than a dense projection (measured by `spd bench`: at K=256 on
        # 480x640, project-first decodes 1.15x faster for L3), hence the factor.
        height, width = value.shape[-2:]
        return height * width <= PROJECT_FIRST_FACTOR * num_queries * self.n_points

    def aggregate(
        self, maps: list[torch.Tensor], locations: list[torch.Tensor], weights: torch.Tensor
    ) -> torch.Tensor:
        """Weighted sum of the sampled per-head values. Returns (B, K, d) before output_proj."""
        batch, num_queries, heads, _, points = weights.shape
        head_dim = self.d_model // heads
        out = None
        for level, (value, location) in enumerate(zip(maps, locations)):
            proj = self.value_proj[level]
            if isinstance(proj, nn.Identity) or self._use_project_first(level, value, num_queries):
                if isinstance(proj, nn.Linear):
                    value = F.conv2d(value, proj.weight[:, :, None, None])  # (B, d, h, w)
                # Head i reads its own channel window: (B*H, d_head, h, w).
                per_head = value.reshape(batch * heads, head_dim, *value.shape[-2:])
                grid = location.permute(0, 2, 1, 3, 4).reshape(batch * heads, num_queries, points, 2)
                sampled = F.grid_sample(per_head, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
                sampled = sampled.view(batch, heads, head_dim, num_queries, points)
            else:
                channels = value.shape[1]
                grid = location.reshape(batch, num_queries, heads * points, 2)
                raw = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
                raw = raw.view(batch, channels, num_queries, heads, points)  # (B, C, K, H, P)
                weight = proj.weight.view(heads, head_dim, channels)
                sampled = torch.einsum("bckhp,hdc->bhdkp", raw, weight)
            level_weights = weights[:, :, :, level].permute(0, 2, 1, 3).unsqueeze(2)  # (B, H, 1, K, P)
            contribution = (sampled * level_weights).sum(-1)  # (B, H, d_head, K)
            out = contribution if out is None else out + contribution
        return out.permute(0, 3, 1, 2).reshape(batch, num_queries, self.d_model)

    def forward(self, h: torch.Tensor, grid: torch.Tensor, maps: list[torch.Tensor]) -> torch.Tensor:
        locations, weights = self.sampling(h, grid, [tuple(m.shape[-2:]) for m in maps])
        return self.output_proj(self.aggregate(maps, locations, weights))


def msda_aggregate_reference(
    module: MSDeformableAttention, maps: list[torch.Tensor], locations: list[torch.Tensor], weights: torch.Tensor
) -> torch.Tensor:
    """Plain per-level, per-head, per-point `grid_sample` loop; the reference `aggregate` must match."""
    batch, num_queries, heads, _, points = weights.shape
    head_dim = module.d_model // heads
    out = weights.new_zeros(batch, num_queries, module.d_model)
    for level, value in enumerate(maps):
        proj = module.value_proj[level]
        for head in range(heads):
            window = slice(head * head_dim, (head + 1) * head_dim)
            if isinstance(proj, nn.Linear):
                head_value = torch.einsum("bchw,dc->bdhw", value, proj.weight[window])
            else:
                head_value = value[:, window]
            for point in range(points):
                grid = locations[level][:, :, head, point].unsqueeze(2)  # (B, K, 1, 2)
                sample = F.grid_sample(head_value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
                sample = sample[..., 0].transpose(1, 2)  # (B, K, d_head)
                out[:, :, window] += sample * weights[:, :, head, level, point].unsqueeze(-1)
    return out
