"""The datasets and loaders a training run reads (DESIGN.md §4 data)."""

from __future__ import annotations

import os
from pathlib import Path

from torch.utils.data import DataLoader, DistributedSampler

from spd.data import NYUDepth, collate, resolve_split_list
from spd.data.described import DescribedDepth, is_description
from spd.data.mix import MixedDataset, WeightedEpochSampler
from spd.engine.distributed import DistInfo
from spd.errors import ConfigError, DataLayoutError
from spd.config.training import TrainConfig


def resolve_data(cfg: TrainConfig, data_root: str | Path) -> tuple[NYUDepth, NYUDepth | None]:
    """Train and validation datasets of a dataset root (NYU's BTS layout or `spd synth` output; split
    lists by `resolve_split_list`) or a dataset description .yaml; with `data.mix`, the training set
    is a `MixedDataset` of it and the mixed-in ones (validation stays on the --data-root dataset). The
    validation set is None for a description without `val_list` when eval.every_steps is 0."""
    root = Path(data_root)
    d, e = cfg.data, cfg.eval
    train = training_set(root, cfg)
    if d.mix:
        parts = [train, *(training_set(Path(entry["dataset"]), cfg) for entry in d.mix)]
        check_one_pixel_scale(parts, [str(root), *(str(entry["dataset"]) for entry in d.mix)])
        train = MixedDataset(parts)
    if is_description(root):  # your own data: validation on the description's `val_list`
        description = (train.parts[0] if d.mix else train).description
        if not description.val_frames:
            return train, _no_validation(description.source, e.every_steps)
        val = DescribedDepth(description, "test", "val_list", num_queries=e.num_queries, min_depth=e.min_depth,
                             max_depth=e.max_depth, seed=e.seed)
        return train, val
    val = NYUDepth(
        root / d.test_dir, resolve_split_list(root, d.test_list, "test"), split="test", num_queries=e.num_queries,
        min_depth=e.min_depth, max_depth=e.max_depth, seed=e.seed, eval_crop=e.crop,
    )
    return train, val


def check_one_pixel_scale(parts: list, names: list[str]) -> None:
    """Mixed sets must share one image size: a model is metric at the pixel scale it trained at and
    records one (`spd.engine.train.record_pixel_scale`), so 96x128 frames beside 192x256 ones would
    teach two scales and record either. ConfigError naming every set and its size, before training.
    Each set's first frame stands for it (`spd data check` holds a set to one size)."""
    sizes = [tuple(part.load(0)[0].shape[:2]) for part in parts]
    if len(set(sizes)) > 1:
        listed = ", ".join(f"{name} {w}x{h}" for name, (h, w) in zip(names, sizes))
        raise ConfigError(f"data.mix: the mixed sets' images differ in size ({listed}): a model is metric at one pixel "
                          "scale, so resize the sets to one size first (e.g. `spd distill label` on resized images)")


def _no_validation(source, every_steps: int) -> None:
    """A description without `val_list`: training runs without validation when it is off
    (eval.every_steps=0), and says so once; with periodic validation asked for, a clear error."""
    if every_steps:
        raise ConfigError(f"{source}: no 'val_list' samples for validation every {every_steps} steps: add a "
                          "val_list: file of samples, or --set eval.every_steps=0 to train without validation")
    if os.environ.get("RANK", "0") == "0":  # once, not once per torchrun process
        print(f"{source} has no val_list: no validation will run (checkpoints/last is the model; no checkpoints/best)")
    return None


def training_set(root: Path, cfg: TrainConfig):
    """The training split of one dataset: a description .yaml (its `list`) or a dataset root (NYU's
    BTS layout or `spd synth` output), with the run's augmentation and query settings."""
    d = cfg.data
    common = dict(num_queries=d.num_queries, crop_size=d.crop_size, rotation_deg=d.rotation_deg, color_p=d.color_p,
                  zoom=d.zoom, min_depth=d.min_depth, max_depth=d.max_depth, seed=cfg.seed)
    if is_description(root):
        return DescribedDepth(root, "train", **common)
    if not root.is_dir():
        raise DataLayoutError(f"data root not found: {root}")
    if not (root / d.train_dir).is_dir() and d.train_list is None and not (root / "train_files.txt").is_file():
        raise DataLayoutError(f"{root}: not an NYU-layout dataset (no {d.train_dir}/ folder, no train_files.txt): for "
                              "your own images with depth labels write a dataset description (.yaml, docs/own-data.md); "
                              "for images without labels, `spd distill label` makes one from a teacher")
    return NYUDepth(root / d.train_dir, resolve_split_list(root, d.train_list, "train"), split="train", **common)


class EpochPlan:
    """Which samples each epoch reads, in which order, on this rank: a DistributedSampler that drops
    the ragged end, cut to whole optimiser steps, resumable from any micro-batch."""

    def __init__(self, train_set: NYUDepth, cfg: TrainConfig, info: DistInfo) -> None:
        self.train_set, self.cfg, self.info = train_set, cfg, info
        if isinstance(train_set, MixedDataset):
            weights = [cfg.data.weight, *(entry["weight"] for entry in cfg.data.mix)]
            self.sampler = WeightedEpochSampler(train_set, weights, cfg.seed, info.rank, info.world_size)
        else:
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
