"""B3b: global cross-attention from each query to every L4 token (DESIGN.md §3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GlobalCrossAttention(nn.Module):
    """Q = Linear(d -> d)(h); K/V are the per-head L4 projections made once per image (PreCompute).

    Shape:
        forward: h (B, K, d), keys/values (B, heads, N_L4, d_head) -> (B, K, d).
    """

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.query_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)

    def forward(self, h: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        batch, num_queries, d_model = h.shape
        query = self.query_proj(h).view(batch, num_queries, self.n_heads, -1).transpose(1, 2)  # (B, H, K, dh)
        attended = F.scaled_dot_product_attention(query, keys, values)  # (B, H, K, dh)
        return self.output_proj(attended.transpose(1, 2).reshape(batch, num_queries, d_model))


class QuerySelfAttention(nn.Module):
    """v14-style query-to-query self-attention (ablation only); padded queries are never attended.

    Shape:
        forward: h (B, K, d), mask (B, K) True = real -> (B, K, d).
    """

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_heads, batch_first=True)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out, _ = self.attn(h, h, h, key_padding_mask=~mask, need_weights=False)
        return out


class FeedForward(nn.Sequential):
    """d -> 4d -> d with GELU."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model))
