"""Projection neck and the once-per-image projections of L3/L4 for canvas and seed (DESIGN.md §3)."""

from __future__ import annotations

import torch
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of an NCHW map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNorm(nn.Sequential):
    """Conv1x1 + LayerNorm over channels: the neck's projection of one level."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(nn.Conv2d(in_dim, out_dim, kernel_size=1), LayerNorm2d(out_dim))


class Neck(nn.Module):
    """L1, L2 -> d with Conv1x1 + LN; L3, L4 stay native unless an ablation asks otherwise.

    Args:
        in_dims: encoder channels of L1..L4.
        d_model: query width d.
        l3_dim: None keeps L3 native; an int projects it ("L3 at 256" ablation).
        global_projection: v14-style, L3 and L4 both projected to d.

    Shape:
        forward: four maps (B, C_l, H/s, W/s) -> four maps; `out_dims` gives their channels.
    """

    def __init__(
        self, in_dims: tuple[int, ...], d_model: int, l3_dim: int | None = None, global_projection: bool = False
    ) -> None:
        super().__init__()
        c1, c2, c3, c4 = in_dims
        if global_projection:
            l3_dim, l4_dim = d_model, d_model
        else:
            l4_dim = None
        self.proj_l1 = ConvNorm(c1, d_model)
        self.proj_l2 = ConvNorm(c2, d_model)
        self.proj_l3 = ConvNorm(c3, l3_dim) if l3_dim is not None else nn.Identity()
        self.proj_l4 = ConvNorm(c4, l4_dim) if l4_dim is not None else nn.Identity()
        self.out_dims = (d_model, d_model, l3_dim or c3, l4_dim or c4)

    def forward(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        l1, l2, l3, l4 = levels
        return [self.proj_l1(l1), self.proj_l2(l2), self.proj_l3(l3), self.proj_l4(l4)]


class L4SelfAttention(nn.Module):
    """v14-style self-attention over L4 tokens (ablation only; v15 has none).

    Shape:
        forward: (B, C, h, w) -> (B, C, h, w).
    """

    def __init__(self, dim: int, num_layers: int, num_heads: int) -> None:
        super().__init__()
        # FFN 4 x dim as every FFN of the plan: its §9 counts 886 K for v14's two layers at d = 192
        layer = nn.TransformerEncoderLayer(
            dim, num_heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
        return self.layers(tokens).transpose(1, 2).reshape(batch, channels, height, width)


class CoarseProjection(nn.Module):
    """Once per image: L3 and L4 projected to d, the canvas's initial L3/L4 maps and the seed's reads.

    Shape:
        forward: l3 (B, C3, H/16, W/16), l4 (B, C4, H/32, W/32) -> proj_l3 (B, d, H/16, W/16),
        proj_l4 (B, d, H/32, W/32).
    """

    def __init__(self, l3_dim: int, l4_dim: int, d_model: int) -> None:
        super().__init__()
        self.proj_l3 = nn.Conv2d(l3_dim, d_model, kernel_size=1)  # = Linear(384 -> 192) per pixel
        self.proj_l4 = nn.Conv2d(l4_dim, d_model, kernel_size=1)

    def forward(self, l3: torch.Tensor, l4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.proj_l3(l3), self.proj_l4(l4)
