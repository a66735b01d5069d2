"""Evaluation on NYU-layout data with the two protocols of DESIGN.md §5.

- sparse: K valid points per image inside the crop, drawn with a fixed seed (same points on every
  run and machine), decoded in one call.
- dense: every valid pixel of the crop, shuffled with a fixed seed and decoded in chunks of the
  training K with the encoder run once per image; comparable with published dense tables.

Works with any model that has `encode(images)` and `decode(features, queries, mask)` (SPD, the
baseline, an oracle in tests). Distributed: each rank takes a disjoint share of the images (no
padding, no drops) and the metric sums are added across ranks.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from spd.cameras.canonical import canonical_focal_of, prediction_to_metric
from spd.cameras.scale import long_side_of, resize_for_model, to_model_pixels
from spd.chunked import decode_in_chunks
from spd.data.queries import crop_mask, eval_seed
from spd.metrics import MetricAccumulator, depth_metrics

Protocol = Literal["sparse", "dense"]


def dense_query_order(valid: torch.Tensor, seed: int, sample_id: str) -> torch.Tensor:
    """All True pixels of (H, W) `valid` as (N, 2) pixel (u, v), shuffled with a fixed seed."""
    rows, cols = np.nonzero(valid.numpy())
    order = np.random.Generator(np.random.PCG64(eval_seed(seed, sample_id))).permutation(rows.size)
    return torch.from_numpy(np.stack([cols[order], rows[order]], -1).astype(np.float32))


@torch.inference_mode()
def evaluate(
    model,
    dataset: Dataset,
    protocol: Protocol = "sparse",
    num_queries: int = 256,
    chunk: int = 256,
    crop: Literal["eigen", "garg", "none"] = "eigen",
    seed: int = 0,
    min_depth: float = 1e-3,
    max_depth: float = 10.0,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    limit: int | None = None,
    progress: bool = True,
) -> tuple[dict[str, float], MetricAccumulator]:
    """Mean metrics over the dataset's images, in metres: each image is resized to the model's pixel
    scale (`spd.cameras.scale`; the points and focal length with it) and predictions are converted
    from the model's canonical camera by each sample's `focal` (spd.cameras.canonical). The dataset yields `image`, `depth`, `valid`, `id`;
    for the sparse protocol it must also yield the fixed-seed `queries` / `query_mask`."""
    from tqdm import tqdm

    count = len(dataset) if limit is None else min(limit, len(dataset))
    indices = range(rank, count, world_size)
    accumulator = MetricAccumulator()
    canonical_focal, long_side = canonical_focal_of(model), long_side_of(model)
    for index in tqdm(indices, desc=f"eval ({protocol})", disable=not progress or rank != 0):
        sample = dataset[index]
        image, scale = resize_for_model(sample["image"][None], long_side)  # the model's pixel scale (spd.cameras.scale)
        gt = sample["depth"][0]
        features = model.encode(image.to(device))
        focal = sample.get("focal")
        if focal is not None:
            focal = focal * scale[0]  # fx on the image the model saw
        if protocol == "sparse":
            queries, mask = sample["queries"], sample["query_mask"]
            seen = to_model_pixels(queries, scale)[None].to(device)
            pred = model.decode(features, seen, mask[None].to(device))[0].cpu()
            pred = prediction_to_metric(pred, focal, canonical_focal)
            u, v = queries[mask].long().unbind(-1)
            metrics = depth_metrics(pred[mask], gt[v, u], min_depth=min_depth, max_depth=max_depth)
        else:
            region = (gt > min_depth) & (gt < max_depth) & crop_mask(*gt.shape, crop)
            queries = dense_query_order(region, seed, sample["id"])
            seen = to_model_pixels(queries, scale).to(device)
            pred = prediction_to_metric(decode_in_chunks(model, features, seen, chunk).cpu(), focal, canonical_focal)
            u, v = queries.long().unbind(-1)
            metrics = depth_metrics(pred, gt[v, u], min_depth=min_depth, max_depth=max_depth)
        accumulator.update(metrics)
    accumulator.all_reduce()
    return accumulator.compute(), accumulator
