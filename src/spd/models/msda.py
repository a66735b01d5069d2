"""Multi-scale deformable cross-attention with per-head L3/L4 value projections (DESIGN.md §3).

Deformable-DETR style: each head predicts `n_points` offsets per level around the query's own
position and a softmax over (levels x points). L1/L2 values are identity maps (head i reads
channels [32i, 32i+32)); L3/L4 use per-head bias-free Linear(C_l -> 32). Because bilinear sampling
and a bias-free linear map commute, the projection can be applied to the whole map first or to
the sampled points afterwards (same result). `value_maps` runs once per image inside `SPD.encode`:
with "auto" / "project_first" it projects the whole L3/L4 maps there (~0.3 GMACs per image at
480x640 for all three layers, ~1 % of the encoder), so no decode call pays for projection at any K;
"sample_first" keeps the raw maps and projects the K*H*P samples in every call (the reference).

Two paths give the same numbers: `forward` (per-level `F.grid_sample` in `aggregate`, any values,
differentiable; training and the reference) and `forward_rows` (inference: each head's levels x
points x 4 corners as one bag of one weighted `embedding_bag` over the row table).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from spd.models.onednn import Linear
from spd.models.precision import keep_fp32
from spd.models.rows import LevelIndex, QueryRows, bag_sum, corner_rows, product_in

ValueProjOrder = Literal["auto", "project_first", "sample_first"]


class MSDeformableAttention(nn.Module):
    """Args:
        d_model: query width d; n_heads: heads of d / n_heads channels.
        level_dims: channels of each value map; a level whose channels equal d and that is not
            in `projected_levels` is an identity map.
        n_points: sampling points per head per level.
        projected_levels: indices of levels that get per-head bias-free value projections.
        value_proj_order: "auto" = "project_first" (whole maps, once per image in `value_maps`);
            "sample_first" projects the sampled points in every call (reference, tests).

    Shape:
        value_maps: maps [(B, C_l, h_l, w_l)] -> values [(B, d or C_l, h_l, w_l)], channels-last.
        forward: h (B, K, d), grid (B, K, 2) normalised query positions, values (from `value_maps`)
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
        self.sampling_offsets = Linear(d_model, n_heads * self.n_levels * n_points * 2)
        self.attention_weights = Linear(d_model, n_heads * self.n_levels * n_points)
        keep_fp32(self.sampling_offsets, self.attention_weights)  # they run with autocast off
        self.value_proj = nn.ModuleList(
            Linear(dim, d_model, bias=False) if level in projected_levels else nn.Identity()
            for level, dim in enumerate(level_dims)
        )
        for level, dim in enumerate(level_dims):
            if level not in projected_levels and dim != d_model:
                raise ValueError(f"level {level} has {dim} channels; an identity value map needs {d_model}")
        self.output_proj = Linear(d_model, d_model)
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
        offsets, weights = self._offsets_and_weights(h)
        locations = []
        for level, (height, width) in enumerate(level_sizes):
            # Offsets are in cells of this level; a cell spans 2/w in normalised units.
            cell = h.new_tensor([2.0 / width, 2.0 / height])
            locations.append(grid[:, :, None, None, :] + offsets[:, :, :, level] * cell)  # (B, K, H, P, 2)
        return locations, weights

    def _offsets_and_weights(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """offsets (B, K, H, L, P, 2) in cells of each level; weights (B, K, H, L, P), softmax over L*P per
        head; both fp32."""
        batch, num_queries, _ = h.shape
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        # Sampling positions and the softmax stay fp32 under autocast: a bf16 offset would move a
        # sample by up to ~0.4 % of its distance, and these two projections are tiny.
        with torch.autocast(h.device.type, enabled=False):
            h = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
            offsets = self.sampling_offsets(h).view(batch, num_queries, heads, levels, points, 2)
            weights = self.attention_weights(h).view(batch, num_queries, heads, levels * points).softmax(-1)
        return offsets, weights.view(batch, num_queries, heads, levels, points)

    @property
    def samples_raw_maps(self) -> bool:
        """True when projected levels stay raw in `value_maps` and are projected after sampling."""
        return self.value_proj_order == "sample_first"

    @property
    def identity_levels(self) -> tuple[bool, ...]:
        """Per level: is the value map the input map itself (no projection in `value_maps`)?"""
        return tuple(not (isinstance(p, nn.Linear) and not self.samples_raw_maps) for p in self.value_proj)

    def value_maps(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Once per image: the maps `forward` samples, in channels-last memory (one row per cell)."""
        values = []
        for proj, value in zip(self.value_proj, maps, strict=True):
            if isinstance(proj, nn.Linear) and not self.samples_raw_maps:
                value = F.conv2d(value, proj.weight[:, :, None, None])  # (B, d, h, w)
            values.append(value.contiguous(memory_format=torch.channels_last))
        return values

    def aggregate(
        self, values: list[torch.Tensor], locations: list[torch.Tensor], weights: torch.Tensor
    ) -> torch.Tensor:
        """Weighted sum of the sampled per-head values, with `F.grid_sample` per level.

        Returns (B, K, d) before output_proj.
        """
        batch, num_queries, heads, _, points = weights.shape
        head_dim = self.d_model // heads
        out = None
        for level, (value, location) in enumerate(zip(values, locations)):
            proj = self.value_proj[level]
            if isinstance(proj, nn.Identity) or not self.samples_raw_maps:
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

    def forward(self, h: torch.Tensor, grid: torch.Tensor, values: list[torch.Tensor]) -> torch.Tensor:
        """The reference path (any values, differentiable)."""
        locations, weights = self.sampling(h, grid, [tuple(m.shape[-2:]) for m in values])
        return self.output_proj(self.aggregate(values, locations, weights))

    def forward_rows(self, h: torch.Tensor, plan: QueryRows, memory: tuple[torch.Tensor, LevelIndex]) -> torch.Tensor:
        """`forward` for inference on the row table, where this layer's four d-wide value maps live
        (`memory` = (table (R, d), their LevelIndex)). Every head's levels x points x 4 corners are one
        bag of one `embedding_bag`: row `r * heads + head` of the (R * heads, d_head) view of the table
        holds head `head`'s channels of table row r. Sample points are the query's own cell on each
        level (`plan.cells`, the same point as `sampling`'s) plus the predicted offsets.
        h (B, K, d) -> (B, K, d)."""
        table, index = memory
        batch, num_queries, _ = h.shape
        heads = self.n_heads
        offsets, weights = self._offsets_and_weights(h)  # (B, K, H, L, P, 2), (B, K, H, L, P)
        bags, corner_weight = corner_rows(plan.cells + offsets, index)  # (B, K, H, 4, L, P) rows of the per-head view
        bags = bags.view(-1)  # bags of 4*L*P per (query, head), flat
        weight = product_in(table.dtype, corner_weight, weights.unsqueeze(-3)).view(-1)  # fp32 product, stored as the table
        sampled = bag_sum(table.view(-1, self.d_model // heads), bags, weight, plan.starts_msda)  # (B*K*H, d_head)
        return self.output_proj(sampled.view(batch, num_queries, self.d_model))


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
