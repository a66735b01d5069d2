"""B1: the multi-scale query seed (DESIGN.md §3)."""

from __future__ import annotations

import math

import torch
from torch import nn

from spd.models.splat import SplatPlan, sample_at


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
        forward: four d-channel maps, grid (B, K, 2) normalised, positions (B, K, 2) in [0, 1],
        optional `plans` (one per map: read by gathers, the inference path) -> h0 (B, K, d).
    """

    def __init__(self, d_model: int, num_freqs: int) -> None:
        super().__init__()
        self.num_freqs = num_freqs
        self.proj = nn.Linear(4 * d_model + 4 * num_freqs, d_model)  # 800 -> 192
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self,
        maps: list[torch.Tensor],
        grid: torch.Tensor,
        positions: torch.Tensor,
        plans: list[SplatPlan] | None = None,
    ) -> torch.Tensor:
        if plans is None:
            samples = [sample_at(level, grid) for level in maps]
        else:
            samples = [plan.read(level) for level, plan in zip(maps, plans, strict=True)]
        features = torch.cat([*samples, fourier_encoding(positions, self.num_freqs)], dim=-1)
        return self.norm(self.proj(features))
