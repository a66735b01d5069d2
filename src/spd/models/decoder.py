"""One decoder layer: pre-LN residual sublayers `h += CrossAttn(LN h); h += Canvas(LN h); h += FFN(LN h)`."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from spd.models.canvas import CanvasSublayer
from spd.models.global_attn import FeedForward, GlobalCrossAttention, QuerySelfAttention
from spd.models.msda import MSDeformableAttention, ValueProjOrder


class DecoderLayer(nn.Module):
    """Args:
        kind: "msda" (deformable, multi-scale) or "global" (B3b, all L4 tokens).
        q2q_self_attn: v14 ablation; adds query self-attention between canvas and FFN.

    Shape:
        forward: h (B, K, d), grid (B, K, 2), mask (B, K), canvas [3 maps], splat plans, plus
        `values` (4 value maps from `MSDeformableAttention.value_maps`) for "msda" or `global_kv`
        (keys, values) for "global"; `fast` selects the inference paths (no autograd)
        -> (h (B, K, d), canvas).
    """

    def __init__(
        self,
        kind: Literal["msda", "global"],
        d_model: int,
        n_heads: int,
        ffn_dim: int,
        level_dims: tuple[int, ...] = (),
        projected_levels: tuple[int, ...] = (),
        n_points: int = 4,
        q2q_self_attn: bool = False,
        value_proj_order: ValueProjOrder = "auto",
    ) -> None:
        super().__init__()
        self.kind = kind
        self.norm_cross = nn.LayerNorm(d_model)
        if kind == "msda":
            self.cross = MSDeformableAttention(
                d_model, n_heads, level_dims, n_points, projected_levels, value_proj_order
            )
        else:
            self.cross = GlobalCrossAttention(d_model, n_heads)
        self.norm_canvas = nn.LayerNorm(d_model)
        self.canvas = CanvasSublayer(d_model)
        self.norm_q2q = nn.LayerNorm(d_model) if q2q_self_attn else None
        self.q2q = QuerySelfAttention(d_model, n_heads) if q2q_self_attn else None
        self.norm_ffn = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, ffn_dim)

    def forward(
        self,
        h: torch.Tensor,
        grid: torch.Tensor,
        mask: torch.Tensor,
        canvas: list[torch.Tensor],
        plans: list,
        values: list[torch.Tensor] | None = None,
        global_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        fast: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.kind == "msda":
            h = h + self.cross(self.norm_cross(h), grid, values, fast=fast)
        else:
            h = h + self.cross(self.norm_cross(h), *global_kv)
        read, canvas = self.canvas(self.norm_canvas(h), grid, plans, canvas, fast=fast)
        h = h + read
        if self.q2q is not None:
            h = h + self.q2q(self.norm_q2q(h), mask)
        h = h + self.ffn(self.norm_ffn(h))
        return h, canvas
