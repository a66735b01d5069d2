"""One decoder layer: pre-LN residual sublayers `h += CrossAttn(LN h); h += Canvas(LN h); h += FFN(LN h)`."""

from __future__ import annotations

import torch
from torch import nn

from spd.models.canvas import CanvasSublayer
from spd.models.feedforward import FeedForward
from spd.models.query_self_attn import QuerySelfAttention
from spd.models.rows import QueryRows
from spd.models.splat import SplatPlan


class DecoderLayer(nn.Module):
    """Args:
        cross_attention: `MSDeformableAttention` (local, multi-scale) or `GlobalCrossAttention`
            (B3b, all L4 tokens); both are called as `(h, grid, memory)` and `forward_rows(h, plan, memory)`.
        d_model: query width d.
        n_heads: heads of the optional query self-attention.
        ffn_dim: feed-forward hidden width.
        q2q_self_attn: v14 ablation; adds query self-attention between canvas and FFN.

    Shape:
        forward: h (B, K, d), grid (B, K, 2) normalised, mask (B, K), canvas [3 maps], splat plans,
        memory (what the cross-attention reads: MSDA's four value maps, or B3b's (keys, values))
        -> (h (B, K, d), canvas). `forward_rows`: the inference path on the row table.
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
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = h + self.cross(self.norm_cross(h), grid, memory)
        read, canvas = self.canvas(self.norm_canvas(h), grid, plans, canvas)
        h = h + read
        return self._query_sublayers(h, mask), canvas

    def forward_rows(
        self,
        h: torch.Tensor,
        plan: QueryRows,
        canvas: torch.Tensor,
        canvas_maps: list[torch.Tensor],
        mask: torch.Tensor,
        memory,
    ) -> torch.Tensor:
        """`forward` for inference on the row table: `plan` is the call's `QueryRows`, `canvas` the
        (R_canvas, d) buffer that `canvas_maps` view, updated in place. -> h (B, K, d)."""
        h = h + self.cross.forward_rows(self.norm_cross(h), plan, memory)
        h = h + self.canvas.forward_rows(self.norm_canvas(h), plan, canvas, canvas_maps)
        return self._query_sublayers(h, mask)

    def _query_sublayers(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.q2q is not None:
            h = h + self.q2q(self.norm_q2q(h), mask)
        return h + self.ffn(self.norm_ffn(h))
