"""Decoding a large point set of one image in chunks: the one rule the predictor and the dense
evaluation share.

Queries meet through SPD's canvas, so a point's depth depends slightly on the points decoded with
it. A large set is therefore decoded in chunks of the training K (every chunk looks like a training
query set), optionally after a shuffle with a fixed seed (so that neighbouring points do not all land
in one chunk, and the same inputs always give the same outputs).
"""

from __future__ import annotations

import torch


@torch.inference_mode()
def decode_in_chunks(
    model, features, queries: torch.Tensor, chunk_size: int = 256, shuffle_seed: int | None = None
) -> torch.Tensor:
    """Depth at (N, 2) pixel queries of one encoded image, `chunk_size` queries per decode call.

    `shuffle_seed`: when given and N > chunk_size, the queries are split into chunks in the order of
    a fixed-seed permutation (results are returned in the input order). Works with any model that
    has `decode(features, queries (1, K, 2))` (SPD, the baseline). Returns (N,) on the queries' device.
    """
    count = queries.shape[0]
    if count == 0:
        return queries.new_zeros(0)
    if shuffle_seed is not None and count > chunk_size:
        order = torch.randperm(count, generator=torch.Generator().manual_seed(shuffle_seed)).to(queries.device)
    else:
        order = torch.arange(count, device=queries.device)
    depth = torch.cat([model.decode(features, part[None])[0] for part in queries[order].split(chunk_size)])
    out = torch.empty_like(depth)
    out[order] = depth
    return out
