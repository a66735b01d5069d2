"""v14-style query-to-query self-attention (the `q2q_self_attn` ablation; v15 has none)."""

from __future__ import annotations

import torch
from torch import nn


class QuerySelfAttention(nn.Module):
    """Padded queries are never attended.

    Shape:
        forward: h (B, K, d), mask (B, K) True = real -> (B, K, d).
    """

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_heads, batch_first=True)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out, _ = self.attn(h, h, h, key_padding_mask=~mask, need_weights=False)
        return out
