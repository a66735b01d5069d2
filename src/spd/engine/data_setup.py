"""The datasets and loaders a training run reads (DESIGN.md §4 data)."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import DataLoader, DistributedSampler

from spd.data import NYUDepth, collate, resolve_split_list
from spd.data.described import DescribedDepth, is_description
from spd.engine.distributed import DistInfo
from spd.errors import ConfigError, DataLayoutError
from spd.train_config import TrainConfig


def resolve_data(cfg: TrainConfig, data_root: str | Path) -> tuple[NYUDepth, NYUDepth]:
    """Train and validation datasets under a dataset root (NYU's BTS layout or `spd synth` output);
    split lists by `resolve_split_list`."""
    root = Path(data_root)
    d, e = cfg.data, cfg.eval
    if is_description(root):  # your own data: a dataset description with a `list` and a `val_list`
        train = DescribedDepth(root, "train", num_queries=d.num_queries, crop_size=d.crop_size, rotation_deg=d.rotation_deg,
                               color_p=d.color_p, min_depth=d.min_depth, max_depth=d.max_depth, seed=cfg.seed)
        val = DescribedDepth(train.description, "test", "val_list", num_queries=e.num_queries, min_depth=e.min_depth,
                             max_depth=e.max_depth, seed=e.seed)
        return train, val
    if not root.is_dir():
        raise DataLayoutError(f"data root not found: {root}")
    train = NYUDepth(
        root / d.train_dir, resolve_split_list(root, d.train_list, "train"), split="train", num_queries=d.num_queries,
        crop_size=d.crop_size, rotation_deg=d.rotation_deg, color_p=d.color_p, min_depth=d.min_depth,
        max_depth=d.max_depth, seed=cfg.seed,
    )
    val = NYUDepth(
        root / d.test_dir, resolve_split_list(root, d.test_list, "test"), split="test", num_queries=e.num_queries,
        min_depth=e.min_depth, max_depth=e.max_depth, seed=e.seed, eval_crop=e.crop,
    )
    return train, val


class EpochPlan:
    """Which samples each epoch reads, in which order, on this rank: a DistributedSampler that drops
    the ragged end, cut to whole optimiser steps, resumable from any micro-batch."""

    def __init__(self, train_set: NYUDepth, cfg: TrainConfig, info: DistInfo) -> None:
        self.train_set, self.cfg, self.info = train_set, cfg, info
        self.sampler = DistributedSampler(
            train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
        self.micro_per_epoch = len(self.sampler) // cfg.batch_size
        self.steps_per_epoch = self.micro_per_epoch // cfg.accum_steps
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"{len(train_set)} training images are too few for batch {cfg.batch_size} x accum {cfg.accum_steps} "
                f"x {info.world_size} processes"
            )

    def batches(self, epoch: int, skip_micro: int):
        """An iterator over the epoch's batches, after skipping `skip_micro` already-consumed ones
        (without loading them)."""
        self.sampler.set_epoch(epoch)
        self.train_set.set_epoch(epoch)
        batch_size = self.cfg.batch_size
        order = list(self.sampler)[: self.micro_per_epoch * batch_size][skip_micro * batch_size :]
        loader = DataLoader(
            self.train_set, batch_size=batch_size, sampler=order, num_workers=self.cfg.data.workers,
            collate_fn=collate, drop_last=True, pin_memory=self.info.device.type == "cuda",
        )
        return iter(loader)
