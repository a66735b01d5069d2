"""The decoder layers' position-wise feed-forward block."""

from __future__ import annotations

from torch import nn


class FeedForward(nn.Sequential):
    """d -> hidden (4d) -> d with GELU.

    Shape: (..., d) -> (..., d).
    """

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model))
