"""Coordinate conventions (DESIGN.md §2), in one place.

A query is `(u, v)` = (column, row) in pixels of the image as the user gave it, integer values at
pixel centres. Images are padded bottom/right to a multiple of 32 inside the model; coordinates do
not change. Every feature level of stride `s` covers the padded image exactly, so cell `j` spans
pixels `[s*j, s*j + s)` and the normalised `grid_sample` coordinate (align_corners=False) of a
query is the same at every level: `x_n = (2u + 1) / W_pad - 1`.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    scale = queries.new_tensor([2.0 / width, 2.0 / height])
    return (2.0 * queries + 1.0) * (scale / 2.0) - 1.0


def sample_at(feature: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of a map at normalised points, zeros outside.

    Shape:
        feature: (B, C, h, w); grid: (B, K, 2) normalised. Returns (B, K, C).
    """
    sampled = F.grid_sample(feature, grid.unsqueeze(2), mode="bilinear", padding_mode="zeros", align_corners=False)
    return sampled.squeeze(3).transpose(1, 2)  # (B, C, K, 1) -> (B, K, C)


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


def channels_last_rows(maps: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B*h*w, C), one row per cell; a view (no copy) of a channels-last map."""
    return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])


def weighted_gather(table: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_j weight[..., j] * table[rows[..., j]] in one `embedding_bag` call: bilinear sampling (four
    corners) or a whole deformable-attention head (levels x points x corners) without materialising
    the gathered rows. The fast path beside `F.grid_sample`; tests hold them equal.

    Shape: table (N, C); rows (..., J) long; weight (..., J) -> (..., C).
    """
    bags = rows.reshape(-1, rows.shape[-1])
    out = F.embedding_bag(bags, table, per_sample_weights=weight.reshape(bags.shape).to(table.dtype), mode="sum")
    return out.view(*rows.shape[:-1], table.shape[-1])


@dataclass
class SplatPlan:
    """Where and how strongly each query reads from and writes into one map: the four bilinear
    corners of its position (the weights `sample_at` uses), computed once per decode call and
    reused by every decoder layer, since the queries do not move.

    Shape:
        index (B, 4K) flat cell indices; beta (B, 4K) weights, 0 for corners outside the map and for
        masked queries; weight_sum (B, 1, h, w) = the sum of beta per cell; rows (B, K, 4) the
        corners' rows in `channels_last_rows` of a (B, C, h, w) map; soft_beta (B, K, 4) =
        beta / (weight_sum of its cell + 1), the canvas soft-mean weights.
    """

    index: torch.Tensor
    beta: torch.Tensor
    size: tuple[int, int]
    weight_sum: torch.Tensor
    rows: torch.Tensor
    soft_beta: torch.Tensor

    def splat(self, values: torch.Tensor) -> torch.Tensor:
        """Sum of beta * value per cell. values (B, K, C) -> (B, C, h, w) in channels-last memory."""
        batch, num_queries, channels = values.shape
        height, width = self.size
        contributions = (values.unsqueeze(2) * self.beta.view(batch, num_queries, 4, 1)).view(batch, -1, channels)
        flat = contributions.new_zeros(batch, height * width, channels)
        flat.scatter_add_(1, self.index.unsqueeze(-1).expand(-1, -1, channels), contributions)
        return flat.view(batch, height, width, channels).permute(0, 3, 1, 2)  # a view, no copy

    def add_soft_mean_(self, level: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """In place: `level += splat(values) / (weight_sum + 1)`, touching only the written cells.

        The fast path of the canvas write (no dense zero map, division or addition); `level` must be
        a channels-last (B, C, h, w) map owned by the caller. values (B, K, C). Returns `level`.
        """
        if not level.is_contiguous(memory_format=torch.channels_last):
            raise ValueError("add_soft_mean_ needs a channels-last map (it writes through a row view)")
        contributions = (values.unsqueeze(2) * self.soft_beta.unsqueeze(-1)).to(level.dtype)  # (B, K, 4, C)
        channels_last_rows(level).index_add_(0, self.rows.reshape(-1), contributions.reshape(-1, values.shape[-1]))
        return level

    def read(self, level: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Bilinear samples of a channels-last (B, C, h, w) map at the queries -> (B, K, C), each
        query's sample multiplied by `scale` (B, K) when given.

        Equals `sample_at(level, grid)` for real queries; masked queries read 0.
        """
        beta = self.beta.view(self.rows.shape)
        if scale is not None:
            beta = beta * scale.unsqueeze(-1)
        return weighted_gather(channels_last_rows(level), self.rows, beta)


def make_splat_plan(grid: torch.Tensor, mask: torch.Tensor, size: tuple[int, int]) -> SplatPlan:
    """Shape: grid (B, K, 2) normalised, mask (B, K) bool, size (h, w) -> SplatPlan."""
    batch, num_queries = grid.shape[:2]
    height, width = size
    corner_index, beta = bilinear_corners(grid, size)  # (B, K, 4)
    beta = beta * mask.unsqueeze(-1)
    index, beta = corner_index.view(batch, -1), beta.view(batch, -1)
    weight_sum = beta.new_zeros(batch, height * width).scatter_add_(1, index, beta)
    soft_beta = beta / (torch.gather(weight_sum, 1, index) + 1.0)
    rows = corner_index + (torch.arange(batch, device=grid.device) * (height * width)).view(batch, 1, 1)
    return SplatPlan(
        index, beta, size, weight_sum.view(batch, 1, height, width), rows, soft_beta.view(batch, num_queries, 4)
    )


def bilinear_splat(
    values: torch.Tensor, grid: torch.Tensor, weights_mask: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adjoint of `sample_at`: scatters per-query values into a map with bilinear weights.

    Shape:
        values: (B, K, C); grid: (B, K, 2) normalised; weights_mask: (B, K) bool; size: (h, w).
        Returns (weighted_sum (B, C, h, w), weight_sum (B, 1, h, w)).
    """
    plan = make_splat_plan(grid, weights_mask, size)
    return plan.splat(values), plan.weight_sum


def validate_queries(
    queries: torch.Tensor, image_hw: tuple[int, int], mask: torch.Tensor | None, batch: int
) -> torch.Tensor:
    """Checks user queries and returns the (B, K) bool mask of real queries.

    Valid real queries are finite and lie on the image: -0.5 <= u <= W - 0.5 and
    -0.5 <= v <= H - 0.5 (the area covered by the pixels under the pixel-centre convention).
    Masked (padding) queries are not checked. Raises ValueError naming the first offending index.
    """
    if queries.dim() != 3 or queries.shape[-1] != 2:
        raise ValueError(f"queries must have shape (B, K, 2) in pixel (u, v); got {tuple(queries.shape)}")
    if queries.shape[0] != batch:
        raise ValueError(f"queries hold {queries.shape[0]} images but the features hold {batch}")
    if not queries.is_floating_point():
        raise ValueError(f"queries must be a floating-point tensor; got {queries.dtype}")
    if mask is None:
        mask = torch.ones(queries.shape[:2], dtype=torch.bool, device=queries.device)
    elif mask.shape != queries.shape[:2] or mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be a bool tensor of shape {tuple(queries.shape[:2])}; got {mask.dtype} {tuple(mask.shape)}"
        )
    height, width = image_hw
    u, v = queries[..., 0], queries[..., 1]
    bad_nan = ~torch.isfinite(queries).all(-1) & mask
    if bad_nan.any():
        b, k = (int(i) for i in bad_nan.nonzero()[0])
        raise ValueError(f"query (b={b}, k={k}) is not finite: {queries[b, k].tolist()}")
    outside = ((u < -0.5) | (u > width - 0.5) | (v < -0.5) | (v > height - 0.5)) & mask
    if outside.any():
        b, k = (int(i) for i in outside.nonzero()[0])
        raise ValueError(
            f"query (b={b}, k={k}) = (u={u[b, k].item():.3f}, v={v[b, k].item():.3f}) is outside the "
            f"{width}x{height} image (valid: -0.5 <= u <= {width - 0.5}, -0.5 <= v <= {height - 0.5})"
        )
    return mask


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

