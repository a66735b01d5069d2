"""B3b: global cross-attention from each query to every L4 token (DESIGN.md §3), and the per-image
pre-compute of its keys and values."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spd.models.onednn import Linear

KeyValues = tuple[torch.Tensor, torch.Tensor]  # keys, values: each (B, heads, N_L4, d_head)


class GlobalKeyValues(nn.Module):
    """Once per image: every B3b layer's per-head keys and values of the L4 tokens.

    Each layer's "6 x Linear(768 -> 32)" is one Linear(768 -> d) whose rows [32i, 32i+32) belong to
    head i.

    Shape:
        forward: l4 (B, C4, H/32, W/32) -> per B3b layer (keys, values), each (B, heads, N_L4, d/heads).
    """

    def __init__(self, l4_dim: int, d_model: int, n_heads: int, n_layers: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.global_k = nn.ModuleList(Linear(l4_dim, d_model) for _ in range(n_layers))
        self.global_v = nn.ModuleList(Linear(l4_dim, d_model) for _ in range(n_layers))

    def forward(self, l4: torch.Tensor) -> list[KeyValues]:
        tokens = l4.flatten(2).transpose(1, 2)  # (B, N_L4, C4)
        batch, num_tokens, _ = tokens.shape
        per_head = lambda x: x.view(batch, num_tokens, self.n_heads, -1).transpose(1, 2)  # noqa: E731 - (B, heads, N, d_head)
        return [(per_head(k(tokens)), per_head(v(tokens))) for k, v in zip(self.global_k, self.global_v)]


class GlobalCrossAttention(nn.Module):
    """Q = Linear(d -> d)(h); K/V are the per-head L4 projections made once per image (GlobalKeyValues).

    Shares the decoder's cross-attention interface (`forward(h, grid, memory)`, `forward_rows(h, plan,
    memory)`) with `MSDeformableAttention`; attending to every token, it needs no query positions.

    Shape:
        forward: h (B, K, d), memory = (keys, values) each (B, heads, N_L4, d_head) -> (B, K, d).
    """

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.query_proj = Linear(d_model, d_model)
        self.output_proj = Linear(d_model, d_model)

    def forward(self, h: torch.Tensor, grid: torch.Tensor, memory: KeyValues) -> torch.Tensor:
        return self.forward_rows(h, None, memory)

    def forward_rows(self, h: torch.Tensor, plan, memory: KeyValues) -> torch.Tensor:
        """The same maths on either path: every query attends to every L4 token."""
        keys, values = memory
        batch, num_queries, d_model = h.shape
        query = self.query_proj(h).view(batch, num_queries, self.n_heads, -1).transpose(1, 2)  # (B, H, K, dh)
        attended = F.scaled_dot_product_attention(query, keys, values)  # (B, H, K, dh)
        return self.output_proj(attended.transpose(1, 2).reshape(batch, num_queries, d_model))
