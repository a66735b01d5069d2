"""The decoder layers' position-wise feed-forward block."""

from __future__ import annotations

import torch
from torch import nn

from spd.models.onednn import Linear, linear


class FeedForward(nn.Sequential):
    """d -> hidden (4d) -> d with the exact GELU, fused into the first matmul at CPU inference
    (`spd.models.onednn.linear`).

    Shape: (..., d) -> (..., d).
    """

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__(Linear(d_model, hidden), nn.GELU(), Linear(hidden, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expand, _, contract = self
        return contract(linear(x, expand.weight, expand.bias, gelu=True))
