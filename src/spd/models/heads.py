"""Depth head and the two training-only heads (DESIGN.md §3)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from spd.models.onednn import Linear


def exp_fp32(log_depth: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """exp(log_depth * scale) in fp32, whatever autocast made of log_depth: bf16 keeps 8 bits of
    mantissa, so exp in bf16 would round every depth by up to ~0.4-0.8 %. Returns float32 metres.

    scale: a 0-dim factor. The product is computed as `log_depth * scale` would be (in log_depth's
    dtype) and, at inference, written to fp32 by the multiply itself rather than by a cast after it."""
    if scale is not None and (log_depth.dtype == torch.float32 or torch.is_grad_enabled()):  # `out=`: no gradient
        log_depth, scale = log_depth * scale, None
    if scale is None:
        return torch.exp(log_depth if log_depth.dtype == torch.float32 else log_depth.float())
    return torch.exp(torch.mul(log_depth, scale, out=log_depth.new_empty(log_depth.shape, dtype=torch.float32)))


class DepthHead(nn.Module):
    """depth = exp(MLP([h; local_feat]) * exp(s)), in metres.

    `s` (a learnt log-scale, init 0) sharpens or flattens the log-depth range as a whole; the last
    bias starts at ln(init_depth) so an untrained model predicts a plausible indoor depth.

    Shape:
        forward: features (B, K, in_dim) -> depth (B, K) metres.
    """

    def __init__(self, in_dim: int, hidden: int, init_depth: float = 2.5) -> None:
        super().__init__()
        self.mlp = nn.Sequential(Linear(in_dim, hidden), nn.GELU(), Linear(hidden, 1))
        self.log_scale = nn.Parameter(torch.zeros(()))
        nn.init.constant_(self.mlp[-1].bias, math.log(init_depth))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return exp_fp32(self.mlp(features).squeeze(-1), self.log_scale.exp())


class CanvasHead(nn.Module):
    """Training-only: final canvas L2 (stride 8) -> x2 -> Conv3x3 + GELU + Conv1x1 -> exp: stride-4 depth.

    Shape:
        forward: canvas_l2 (B, d, H/8, W/8) -> (B, 1, H/4, W/4) metres.
    """

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(d_model, hidden, kernel_size=3, padding=1)
        self.out = nn.Conv2d(hidden, 1, kernel_size=1)

    def forward(self, canvas_l2: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(canvas_l2, scale_factor=2, mode="bilinear", align_corners=False)
        return exp_fp32(self.out(F.gelu(self.conv(up))))


class PatchDenseHead(nn.Module):
    """Training-only LDRM dense head: the plan's Conv1x1 over [h broadcast; feat_28].

    Computed as Linear(h) + Conv1x1(feat_28): the same maths without a (d, 28, 28) broadcast.

    Shape:
        forward: h (B, K, d), feat_28 (B, K, D, S, S) -> (B, K, S, S) metres.
    """

    def __init__(self, d_model: int, local_dim: int) -> None:
        super().__init__()
        self.from_query = Linear(d_model, 1)
        self.from_patch = Linear(local_dim, 1, bias=False)

    def forward(self, h: torch.Tensor, feat_patch: torch.Tensor) -> torch.Tensor:
        patch_term = torch.einsum("bkdyx,d->bkyx", feat_patch, self.from_patch.weight[0])
        return exp_fp32(patch_term + self.from_query(h)[..., None])
