"""Coordinate conventions (DESIGN.md §2), in one place.

A query is `(u, v)` = (column, row) in pixels of the image as the user gave it, integer values at
pixel centres. Images are padded bottom/right to a multiple of 32 inside the model; coordinates do
not change. Every feature level of stride `s` covers the padded image exactly, so cell `j` spans
pixels `[s*j, s*j + s)` and the normalised `grid_sample` coordinate (align_corners=False) of a
query is the same at every level: `x_n = (2u + 1) / W_pad - 1`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PAD_MULTIPLE = 32


def padded_size(height: int, width: int, multiple: int = PAD_MULTIPLE) -> tuple[int, int]:
    """Smallest (H, W) >= the input whose sides are multiples of `multiple`."""
    return -(-height // multiple) * multiple, -(-width // multiple) * multiple


def pad_image(images: torch.Tensor, multiple: int = PAD_MULTIPLE) -> torch.Tensor:
    """Zero-pads (B, C, H, W) bottom/right to multiples of `multiple` (zero = the normalised mean)."""
    height, width = images.shape[-2:]
    pad_h, pad_w = padded_size(height, width, multiple)
    if (pad_h, pad_w) == (height, width):
        return images
    return F.pad(images, (0, pad_w - width, 0, pad_h - height))


def pixel_to_grid(queries: torch.Tensor, padded_hw: tuple[int, int]) -> torch.Tensor:
    """Pixel (u, v) -> normalised grid_sample coordinates on any level of the padded image.

    Shape:
        queries: (..., 2) pixels, xy order. Returns (..., 2) in [-1, 1] for points inside.
    """
    height, width = padded_hw
    # Per axis with Python scalars: no small tensor is built on the host and copied to the device.
    x = (2.0 * queries[..., 0] + 1.0) / width - 1.0
    y = (2.0 * queries[..., 1] + 1.0) / height - 1.0
    return torch.stack([x, y], -1)


def bilinear_corners(grid: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The four cells that bilinear sampling reads (align_corners=False, zeros outside), computed as
    `F.grid_sample` computes them.

    Shape:
        grid: (..., 2) normalised; size: (h, w). Returns index (..., 4) long flat cell indices
        `y * w + x` (clamped onto the map) and weight (..., 4), 0 for corners outside the map.
    """
    height, width = size
    # Continuous cell coordinates: cell centres at integers.
    x = ((grid[..., 0] + 1.0) * width - 1.0) / 2.0
    y = ((grid[..., 1] + 1.0) * height - 1.0) / 2.0
    return bilinear_corners_at_cells(x, y, size)


def bilinear_corners_at_cells(x: torch.Tensor, y: torch.Tensor, size: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """`bilinear_corners` for continuous cell coordinates (cell centres at integers), shape (...).

    `size` (h, w) may hold ints or integer tensors that broadcast against x[..., None] (several
    maps at once, e.g. one size per level). Corners come in the order (x0, y0), (x1, y0), (x0, y1),
    (x1, y1).
    """
    height, width = size
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = x - x0, y - y0
    # Stacked along a last dim of 4 (contiguous): much faster on CPU than broadcasting 2 x 2.
    cx = torch.stack([x0, x0 + 1, x0, x0 + 1], -1).long()
    cy = torch.stack([y0, y0, y0 + 1, y0 + 1], -1).long()
    weight = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], -1)
    inside = (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)
    weight = weight * inside
    index = cy.clamp(min=0).clamp(max=height - 1) * width + cx.clamp(min=0).clamp(max=width - 1)
    return index, weight
