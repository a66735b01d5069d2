"""A constant-depth predictor with the same encode/decode interface as SPD: the floor a trained model must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class _ImageInfo:
    batch_size: int
    image_size: tuple[int, int]


class ConstantDepth(nn.Module):
    """Predicts one depth everywhere, e.g. the training set's median depth (the "median" row of the demo)."""

    def __init__(self, depth_m: float) -> None:
        super().__init__()
        self.depth_m = float(depth_m)

    def encode(self, images: torch.Tensor) -> _ImageInfo:
        return _ImageInfo(images.shape[0], (images.shape[-2], images.shape[-1]))

    def decode(
        self, features: _ImageInfo, queries: torch.Tensor, mask: torch.Tensor | None = None, check_values: bool = True
    ) -> torch.Tensor:
        return torch.full(queries.shape[:2], self.depth_m, device=queries.device)


def median_training_depth(dataset, limit: int | None = None) -> float:
    """Median of all valid GT pixels over (the first `limit` images of) a dataset, in metres."""
    values = []
    count = len(dataset) if limit is None else min(limit, len(dataset))
    for index in range(count):
        sample = dataset[index]
        values.append(sample["depth"][sample["valid"]])
    return float(torch.cat(values).median())
