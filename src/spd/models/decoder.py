"""One decoder layer: pre-LN residual sublayers `h += CrossAttn(LN h); h += Canvas(LN h); h += FFN(LN h)`."""

from __future__ import annotations

import torch
from torch import nn

from spd.models.canvas import CanvasSublayer
from spd.models.feedforward import FeedForward
from spd.models.query_self_attn import QuerySelfAttention
from spd.models.splat import SplatPlan


class DecoderLayer(nn.Module):
    """Args:
        cross_attention: `MSDeformableAttention` (local, multi-scale) or `GlobalCrossAttention`
            (B3b, all L4 tokens); both are called as `(h, grid, memory, fast)`.
        d_model: query width d.
        n_heads: heads of the optional query self-attention.
        ffn_dim: feed-forward hidden width.
        q2q_self_attn: v14 ablation; adds query self-attention between canvas and FFN.

    Shape:
        forward: h (B, K, d), grid (B, K, 2) normalised, mask (B, K), canvas [3 maps], splat plans,
        memory (what the cross-attention reads: MSDA's four value maps, or B3b's (keys, values));
        `fast` selects the inference paths (no autograd) -> (h (B, K, d), canvas).
    """

    def __init__(
        self, cross_attention: nn.Module, *, d_model: int, n_heads: int, ffn_dim: int, q2q_self_attn: bool = False
    ) -> None:
        super().__init__()
        self.norm_cross = nn.LayerNorm(d_model)
        self.cross = cross_attention
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
        plans: list[SplatPlan],
        memory,
        fast: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = h + self.cross(self.norm_cross(h), grid, memory, fast=fast)
        read, canvas = self.canvas(self.norm_canvas(h), grid, plans, canvas, fast=fast)
        h = h + read
        if self.q2q is not None:
            h = h + self.q2q(self.norm_q2q(h), mask)
        h = h + self.ffn(self.norm_ffn(h))
        return h, canvas
