"""Training on several datasets at once (your data plus NYU, so that the model does not forget):
one `MixedDataset`, and a sampler that draws each epoch's samples with per-dataset weights."""

from __future__ import annotations

import bisect

import numpy as np
import torch
from torch.utils.data import Dataset


class MixedDataset(Dataset):
    """Several training datasets as one: index i of the mix is sample `i - offset_d` of dataset d.
    `set_epoch` reaches every part (their per-sample augmentation seeds).

    A key may also be (index, draw): the position of this draw in the epoch's `WeightedEpochSampler`
    draw. The part then seeds the sample's augmentation and queries from (part, draw) as well, so an
    image drawn twice in one epoch gets two different crops and query sets, and sample i of one part
    never shares its seed with sample i of another."""

    def __init__(self, parts: list[Dataset]) -> None:
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def set_epoch(self, epoch: int) -> None:
        for part in self.parts:
            part.set_epoch(epoch)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, draw = key if isinstance(key, tuple) else (key, None)
        part = bisect.bisect_right(self.offsets, index) - 1
        local = index - self.offsets[part]
        return self.parts[part][local if draw is None else (local, f"{part}:{draw}")]


class WeightedEpochSampler:
    """Each epoch, `len(dataset)` indices drawn with replacement so that dataset d supplies a share
    weight_d / sum(weights) of them (uniform within it), from a generator seeded by (seed, epoch):
    the same order on every machine and after a resume; rank r takes every world_size-th index of
    the draw (the ragged end dropped), as DistributedSampler shards. Yields (index, draw position)
    keys for `MixedDataset`: the position (in the whole draw, not the rank's share) seeds each draw."""

    def __init__(self, mixed: MixedDataset, weights: list[float], seed: int, rank: int, world_size: int) -> None:
        sizes = [len(p) for p in mixed.parts]
        self.probabilities = torch.cat([torch.full((n,), w / n, dtype=torch.float64) for n, w in zip(sizes, weights)])
        self.total, self.seed, self.rank, self.world_size, self.epoch = len(mixed), seed, rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.total // self.world_size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        draw = torch.multinomial(self.probabilities, self.total, replacement=True, generator=generator).tolist()
        keys = list(enumerate(draw))[self.rank : len(self) * self.world_size : self.world_size]
        return iter([(index, position) for position, index in keys])
