"""Query sampling, supervision crops and batching (DESIGN.md §4, §5).

Queries are integer pixel centres (u, v), so the ground truth at a query is exactly the GT pixel.
"""

from __future__ import annotations

import zlib
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F


CropName = Literal["eigen", "garg", "none"]
EIGEN_CROP = (45, 471, 41, 601)  # rows, cols (end exclusive) of a 480 x 640 NYU frame (BTS / ZoeDepth)
GARG_CROP_FRACTIONS = (0.40810811, 0.99189189, 0.03594771, 0.96405229)  # ZoeDepth's garg_crop, any size


def crop_mask(height: int, width: int, crop: CropName) -> torch.Tensor:
    """(H, W) bool: True inside the evaluation crop (same definitions as BTS / ZoeDepth)."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    if crop == "none":
        mask[:] = True
    elif crop == "eigen":
        if (height, width) != (480, 640):
            raise ValueError(f"the Eigen crop is defined for 480x640 NYU frames; got {height}x{width} (use crop='none')")
        top, bottom, left, right = EIGEN_CROP
        mask[top:bottom, left:right] = True
    elif crop == "garg":
        top, bottom, left, right = GARG_CROP_FRACTIONS
        mask[int(top * height) : int(bottom * height), int(left * width) : int(right * width)] = True
    else:
        raise ValueError(f"unknown crop {crop!r}; choose eigen, garg or none")
    return mask


def sample_uniform_queries(
    valid: torch.Tensor, k: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """K queries uniformly among valid pixels, without replacement.

    Shape:
        valid: (H, W) bool. Returns queries (K, 2) float pixel (u, v) and mask (K,) bool; when fewer
        than K pixels are valid, all of them are taken and the rest is padding (mask False, (0, 0)).
    """
    rows, cols = torch.nonzero(valid, as_tuple=True)
    count = min(k, rows.numel())
    pick = torch.randperm(rows.numel(), generator=generator)[:count]
    queries = torch.zeros(k, 2)
    queries[:count, 0] = cols[pick].float()
    queries[:count, 1] = rows[pick].float()
    mask = torch.zeros(k, dtype=torch.bool)
    mask[:count] = True
    return queries, mask


def eval_seed(seed: int, sample_id: str) -> int:
    """Per-image seed from a global seed and the image id: stable across runs, machines, orders."""
    return (seed * 1_000_003 + zlib.crc32(sample_id.encode())) % (2**63)


def sample_eval_queries(
    valid: torch.Tensor, k: int, seed: int, sample_id: str, crop: CropName = "eigen"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse protocol's K points: valid pixels inside the crop, drawn with numpy's PCG64.

    numpy's PCG64 stream is fixed across platforms, so the same (seed, id) gives the same points on
    every machine. Shapes as `sample_uniform_queries`.
    """
    region = valid & crop_mask(*valid.shape, crop)
    rows, cols = np.nonzero(region.numpy())
    count = min(k, rows.size)
    pick = np.random.Generator(np.random.PCG64(eval_seed(seed, sample_id))).permutation(rows.size)[:count]
    queries = torch.zeros(k, 2)
    queries[:count, 0] = torch.from_numpy(cols[pick].astype(np.float32))
    queries[:count, 1] = torch.from_numpy(rows[pick].astype(np.float32))
    mask = torch.zeros(k, dtype=torch.bool)
    mask[:count] = True
    return queries, mask


def downsample_valid_mean(depth: torch.Tensor, valid: torch.Tensor, stride: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid-aware stride-`stride` GT: the mean over each block's valid pixels only.

    Holes never enter a mean; a block with no valid pixel is invalid. Sides are padded up to a
    multiple of `stride`, matching the model's `canvas_depth` size ceil(H/stride) x ceil(W/stride).

    Shape:
        depth (B, 1, H, W) metres, valid (B, 1, H, W) bool -> (depth, valid), each (B, 1, ceil(H/s), ceil(W/s)).
    """
    height, width = depth.shape[-2:]
    pad = (0, -width % stride, 0, -height % stride)
    weights = F.pad(valid.to(depth.dtype), pad)
    total = F.avg_pool2d(F.pad(depth * valid, pad), stride) * stride * stride
    count = F.avg_pool2d(weights, stride) * stride * stride
    block_valid = count > 0.5
    return torch.where(block_valid, total / count.clamp(min=1), torch.zeros_like(total)), block_valid


def collate(samples: list[dict]) -> dict:
    """Stacks samples; query sets of different K are padded to the largest with mask False. `focal`
    (B,) px, NaN where a frame's camera is unknown (spd.camera)."""
    batch: dict = {}
    for key in ("image", "depth", "valid"):
        batch[key] = torch.stack([s[key] for s in samples])
    batch["focal"] = torch.tensor([float("nan") if s["focal"] is None else float(s["focal"]) for s in samples])
    batch["id"] = [s["id"] for s in samples]
    if "queries" in samples[0]:
        k = max(s["queries"].shape[0] for s in samples)
        queries = torch.zeros(len(samples), k, 2)
        mask = torch.zeros(len(samples), k, dtype=torch.bool)
        for i, s in enumerate(samples):
            n = s["queries"].shape[0]
            queries[i, :n] = s["queries"]
            mask[i, :n] = s["query_mask"]
        batch["queries"], batch["query_mask"] = queries, mask
    return batch
