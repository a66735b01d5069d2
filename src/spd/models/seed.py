"""B1: the multi-scale query seed (DESIGN.md §3)."""

from __future__ import annotations

import math

import torch
from torch import nn

from spd.models.onednn import Linear, compute_dtype
from spd.models.rows import QueryRows, bag_sum, cat_in
from spd.models.splat import sample_at


def fourier_encoding(positions: torch.Tensor, num_freqs: int) -> torch.Tensor:
    """sin/cos of 2^f * pi * p for f = 0..num_freqs-1 on each coordinate.

    Shape:
        positions: (B, K, 2) in [0, 1] (query position / image size). Returns (B, K, 4 * num_freqs).
    """
    freqs = (2.0 ** torch.arange(num_freqs, device=positions.device, dtype=positions.dtype)) * math.pi
    angles = positions.unsqueeze(-1) * freqs  # (B, K, 2, F)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(2)  # (B, K, 4F)


class QuerySeed(nn.Module):
    """h0 = LN(Linear([L1; L2; proj_L3; proj_L4 sampled at the query; Fourier(pos)])).

    Shape:
        forward: four d-channel maps, grid (B, K, 2) normalised, positions (B, K, 2) in [0, 1]
        -> h0 (B, K, d).
    """

    def __init__(self, d_model: int, num_freqs: int) -> None:
        super().__init__()
        self.num_freqs = num_freqs
        self.proj = Linear(4 * d_model + 4 * num_freqs, d_model)  # 800 -> 192
        self.norm = nn.LayerNorm(d_model)

    def forward(self, maps: list[torch.Tensor], grid: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        samples = [sample_at(level, grid) for level in maps]
        features = torch.cat([*samples, fourier_encoding(positions, self.num_freqs)], dim=-1)
        return self.norm(self.proj(features))

    def forward_rows(self, table: torch.Tensor, plan: QueryRows, positions: torch.Tensor) -> torch.Tensor:
        """`forward` for inference: the four levels read with one `embedding_bag` over the row table
        (padded queries read zeros; nothing reads their seeds). table (R, d) -> h0 (B, K, d)."""
        batch, num_queries = positions.shape[:2]
        samples = bag_sum(table, plan.seed_rows, plan.seed_weights, plan.starts4).view(batch, num_queries, -1)  # L1..proj_L4
        # Stored in the matmul's dtype: the bf16 samples are not cast up to meet the fp32 encoding.
        features = cat_in(compute_dtype(samples), [samples, fourier_encoding(positions, self.num_freqs)])
        return self.norm(self.proj(features))
