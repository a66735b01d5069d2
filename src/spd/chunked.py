"""Decoding a large point set of one image in chunks padded to fixed sizes: the one rule the
predictor and the dense evaluation share.

Queries meet through SPD's canvas, so a point's depth depends slightly on the points decoded with
it. A large set is therefore decoded in chunks of the training K (every chunk looks like a training
query set), optionally after a shuffle with a fixed seed (so that neighbouring points do not all land
in one chunk, and the same inputs always give the same outputs).

Each chunk can be padded up to a fixed K bucket with masked queries. That is exact (a masked query
writes nothing into the canvas and reads nothing back) and gives a compiled decoder a handful of
static shapes to compile once (and CUDA graphs to capture once) instead of one per K.
"""

from __future__ import annotations

from typing import Callable

import torch

K_BUCKETS = (16, 64, 256, 1024, 4096)  # decode sizes a compiled decoder sees; larger sets go in chunks


def bucket_size(count: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds `count` queries (callers chunk to at most the largest)."""
    for size in buckets:
        if size >= count:
            return size
    raise ValueError(f"{count} queries exceed the largest bucket {buckets[-1]}: decode them in chunks")


def pad_queries(sets: list[torch.Tensor], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's (N_b, 2) query set per row -> (B, size, 2) queries and (B, size) mask, each set's
    tail (size - N_b) masked padding at pixel 0."""
    padded = sets[0].new_zeros(len(sets), size, 2)
    for row, queries in enumerate(sets):
        padded[row, : queries.shape[0]] = queries
    counts = torch.tensor([q.shape[0] for q in sets], device=padded.device)
    return padded, torch.arange(size, device=padded.device) < counts[:, None]


def decode_padded(decode: Callable, features, queries: torch.Tensor, size: int) -> torch.Tensor:
    """Depth at (N, 2) already-validated queries, decoded as one call of `size` >= N queries whose
    tail is masked padding. Returns (N,)."""
    padded, mask = pad_queries([queries], size)
    # Validated by the caller: skip the value checks (they sync with the device, and break graphs).
    return decode(features, padded, mask, check_values=False)[0, : queries.shape[0]]


@torch.inference_mode()
def decode_in_chunks(
    model,
    features,
    queries: torch.Tensor,
    chunk_size: int = 256,
    shuffle_seed: int | None = None,
    buckets: tuple[int, ...] | None = None,
    decode: Callable | None = None,
) -> torch.Tensor:
    """Depth at (N, 2) valid pixel queries of one encoded image, `chunk_size` queries per decode call.

    Args:
        model: anything with `decode(features, queries (1, K, 2), mask, check_values)` (SPD, the baseline).
        queries: (N, 2) pixel (u, v), already checked by the caller (`validate_queries`).
        shuffle_seed: when given and N > chunk_size, chunks follow a fixed-seed permutation (results
            come back in the input order).
        buckets: pad every chunk up to the smallest of these sizes (None: decode at its own size).
        decode: the decode callable to use (e.g. a compiled `model.decode`); default `model.decode`.

    Returns (N,) on the queries' device.
    """
    count = queries.shape[0]
    if count == 0:
        return queries.new_zeros(0)
    decode = decode or model.decode
    if shuffle_seed is not None and count > chunk_size:
        order = torch.randperm(count, generator=torch.Generator().manual_seed(shuffle_seed)).to(queries.device)
    else:
        order = torch.arange(count, device=queries.device)
    parts = queries[order].split(chunk_size)
    depth = torch.cat([
        decode_padded(decode, features, part, part.shape[0] if buckets is None else bucket_size(part.shape[0], buckets))
        for part in parts
    ])
    out = torch.empty_like(depth)
    out[order] = depth
    return out
