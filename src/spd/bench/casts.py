"""Counting dtype conversions: a proxy, measurable on any CPU, for the cast kernels a bf16 graph launches.

On a GPU every cast is a kernel launch (~5-10 µs at batch 1, more than the math of most decoder ops),
so bf16 pays only when the values are cast once, not per layer. `count_casts` counts the ATen
`to` / `_to_copy` calls a block of code makes, seen below autocast (autocast's own casts included) by a
`TorchDispatchMode`. A no-op `.to` (same dtype, same device) is counted too where it still dispatches
(under `inference_mode`, as the predictor runs).

Several casts are removed by writing a value in the dtype its consumer reads, by the op that makes it
(`out=` of another dtype: `spd.models.rows.product_in`, `cat_in`). On a GPU that is one kernel, which
converts as it stores; on a CPU PyTorch computes into a temporary and copies, inside the op, so
there it saves a dispatch, not a pass over memory.
`spd bench` records the counts of one `Predictor(dtype="bf16")` encode and decode(K);
`tests/test_casts.py` holds them to their budget.
"""

from __future__ import annotations

import collections
import traceback
from contextlib import contextmanager
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_CASTS = (torch.ops.aten.to, torch.ops.aten._to_copy)


class CastCounter(TorchDispatchMode):
    """Counts `aten.to` / `aten._to_copy` calls; with `where=True` also by the innermost SPD source
    line that made them (for finding them: `counter.sites.most_common()`)."""

    def __init__(self, where: bool = False) -> None:
        super().__init__()
        self.count = 0
        self.where = where
        self.sites: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in _CASTS:
            self.count += 1
            if self.where:
                self.sites[_caller()] += 1
        return func(*args, **(kwargs or {}))


def _caller() -> str:
    frames = [f for f in traceback.extract_stack() if "/spd/" in f.filename and not f.filename.endswith("casts.py")]
    return f"{frames[-1].filename.rsplit('/spd/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"


@contextmanager
def count_casts(where: bool = False) -> Iterator[CastCounter]:
    """with count_casts() as casts: ...; casts.count is the number of dtype conversions made inside."""
    with CastCounter(where) as counter:
        yield counter


def predictor_casts(predictor, image, points) -> dict[str, int]:
    """Casts of one `predictor.encode(image)` and one `decode(features, points)`, after one warm-up call
    of each (first calls build caches). -> {"encode": n, "decode": m}."""
    features = predictor.encode(image)
    predictor.decode(features, points)
    with count_casts() as encode:
        features = predictor.encode(image)
    with count_casts() as decode:
        predictor.decode(features, points)
    return {"encode": encode.count, "decode": decode.count}
