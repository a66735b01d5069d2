"""Integer-aligned windows of a map: LDRM's L1 patches and the GT crops that supervise them."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_windows(maps: torch.Tensor, origin: torch.Tensor, size: int) -> torch.Tensor:
    """`size` x `size` windows of a map at integer top-left cells; zeros outside (origins may lie up
    to `size` cells outside the map). Window (j, i) of query k is map cell (origin_x + i, origin_y + j).

    Used by LDRM to gather L1 patches, and for its GT: crops of the depth map at the same origins as
    the model's `ldrm_patch_depth`.

    Shape:
        maps: (B, C, H, W); origin: (B, K, 2) long pixel (x, y). Returns (B, K, C, size, size).
    """
    batch, channels, height, width = maps.shape
    num_queries = origin.shape[1]
    padded = F.pad(maps, (size, size, size, size))
    steps = torch.arange(size, device=maps.device)
    cols = (origin[..., 0, None] + size + steps).clamp(0, width + 2 * size - 1)  # (B, K, size)
    rows = (origin[..., 1, None] + size + steps).clamp(0, height + 2 * size - 1)
    index = rows[..., :, None] * (width + 2 * size) + cols[..., None, :]  # (B, K, size, size)
    flat = padded.flatten(2)
    out = torch.gather(flat, 2, index.view(batch, 1, -1).expand(-1, channels, -1))
    return out.view(batch, channels, num_queries, size, size).transpose(1, 2)
