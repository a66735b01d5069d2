"""The one rule for user queries: shapes, finiteness and the image area (DESIGN.md §2)."""

from __future__ import annotations

import torch

from spd.errors import UserInputError


def validate_queries(
    queries: torch.Tensor,
    image_hw: tuple[int, int],
    mask: torch.Tensor | None = None,
    batch: int | None = None,
    check_values: bool = True,
    noun: str = "query",
) -> torch.Tensor:
    """Checks queries and returns the (B, K) bool mask of real queries.

    Valid real queries are finite and lie on the image: -0.5 <= u <= W - 0.5 and
    -0.5 <= v <= H - 0.5 (the area covered by the pixels under the pixel-centre convention).
    Masked (padding) queries are not checked. Raises ValueError naming the first offending index
    ("query 3 of image 1", or "point 3" for a single image with `noun="point"`).

    `check_values=False` checks shapes and dtypes only: the value checks read the tensors on the
    host (a device sync), which callers that validated once already (training, the predictor's
    padded buckets) skip.

    Shape: queries (B, K, 2) pixel (u, v); mask (B, K) bool or None (all real).
    """
    if queries.dim() != 3 or queries.shape[-1] != 2:
        raise UserInputError(f"queries must have shape (B, K, 2) in pixel (u, v); got {tuple(queries.shape)}")
    if batch is not None and queries.shape[0] != batch:
        raise UserInputError(f"queries hold {queries.shape[0]} images but the features hold {batch}")
    if not queries.is_floating_point():
        raise UserInputError(f"queries must be a floating-point tensor; got {queries.dtype}")
    if mask is None:
        mask = torch.ones(queries.shape[:2], dtype=torch.bool, device=queries.device)
    elif mask.shape != queries.shape[:2] or mask.dtype != torch.bool:
        raise UserInputError(
            f"mask must be a bool tensor of shape {tuple(queries.shape[:2])}; got {mask.dtype} {tuple(mask.shape)}"
        )
    if check_values:
        _check_values(queries, image_hw, mask, noun)
    return mask


def _check_values(queries: torch.Tensor, image_hw: tuple[int, int], mask: torch.Tensor, noun: str) -> None:
    height, width = image_hw
    u, v = queries[..., 0], queries[..., 1]

    def name(b: int, k: int) -> str:
        return f"{noun} {k}" + ("" if queries.shape[0] == 1 else f" of image {b}")

    bad_nan = ~torch.isfinite(queries).all(-1) & mask
    if bad_nan.any():
        b, k = (int(i) for i in bad_nan.nonzero()[0])
        raise UserInputError(f"{name(b, k)} is not finite: {queries[b, k].tolist()}")
    outside = ((u < -0.5) | (u > width - 0.5) | (v < -0.5) | (v > height - 0.5)) & mask
    if outside.any():
        b, k = (int(i) for i in outside.nonzero()[0])
        raise UserInputError(
            f"{name(b, k)} = (u={u[b, k].item():g}, v={v[b, k].item():g}) is outside the "
            f"{width}x{height} image (valid: -0.5 <= u <= {width - 0.5}, -0.5 <= v <= {height - 0.5})"
        )
