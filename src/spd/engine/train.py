"""The training loop (DESIGN.md §4), readable top to bottom: data -> model -> optimiser -> steps.

One process or many under torchrun (DDP); stop it at any moment (SIGTERM or kill -9) and
`resume=True` continues exactly: per-sample randomness comes from (seed, epoch, index), and the
checkpoint holds model, optimiser, step, epoch, position in the epoch and RNG states.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from spd.data import NYU_TEST_LIST, NYU_TRAIN_LIST, NYUDepth, collate
from spd.engine import distributed as dist_utils
from spd.engine.checkpoint import (
    find_resumable, load_checkpoint_weights, load_training_state, rng_state, save_checkpoint, set_rng_state,
)
from spd.engine.evaluate import evaluate
from spd.losses import baseline_losses, spd_losses
from spd.models.spd import SPD
from spd.train_config import TrainConfig, save_config


def lr_schedule(total_steps: int, warmup_steps: int, kind: str = "cosine", min_ratio: float = 0.01) -> np.ndarray:
    """Per-step LR multiplier: linear warm-up to 1, then cosine or poly (power 0.9) decay to `min_ratio`."""
    steps = np.arange(total_steps, dtype=np.float64)
    warmup = max(1, min(warmup_steps, total_steps))
    progress = np.clip((steps - warmup) / max(1, total_steps - warmup), 0, 1)
    decay = 0.5 * (1 + np.cos(np.pi * progress)) if kind == "cosine" else (1 - progress) ** 0.9
    after = min_ratio + (1 - min_ratio) * decay
    return np.where(steps < warmup, (steps + 1) / warmup, after)


def resolve_data(cfg: TrainConfig, data_root: str | Path) -> tuple[NYUDepth, NYUDepth]:
    """Train and validation datasets. Lists default to ROOT/{train,test}_files.txt (what `spd synth`
    writes), else the bundled NYU lists."""
    root = Path(data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root not found: {root}")
    d, e = cfg.data, cfg.eval
    train_list = Path(d.train_list) if d.train_list else root / "train_files.txt"
    test_list = Path(d.test_list) if d.test_list else root / "test_files.txt"
    train_list = train_list if train_list.is_file() or d.train_list else Path(str(NYU_TRAIN_LIST))
    test_list = test_list if test_list.is_file() or d.test_list else Path(str(NYU_TEST_LIST))
    train = NYUDepth(
        root / d.train_dir, train_list, split="train", num_queries=d.num_queries, crop_size=d.crop_size,
        rotation_deg=d.rotation_deg, color_p=d.color_p, min_depth=d.min_depth, max_depth=d.max_depth, seed=cfg.seed,
    )
    val = NYUDepth(
        root / d.test_dir, test_list, split="test", num_queries=e.num_queries, min_depth=e.min_depth,
        max_depth=e.max_depth, seed=e.seed, eval_crop=e.crop,
    )
    return train, val


class _Preemption:
    """SIGTERM (what schedulers send before pre-emption) sets a flag; the loop saves and exits."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


class RunLogger:
    """Rank 0 only: metrics.jsonl (one JSON object per line) and TensorBoard scalars."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"))
        except ImportError:
            print("tensorboard is not installed: curves go to metrics.jsonl only (pip install tensorboard)")

    def log(self, step: int, kind: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.writer is not None:
                self.writer.close()


def build_training_model(cfg: TrainConfig) -> torch.nn.Module:
    """The model a config trains: SPD (its preset + overrides) or the DAv2-S baseline."""
    if cfg.architecture == "dav2-small":
        from spd.models.baseline import DepthAnythingBaseline

        return DepthAnythingBaseline(cfg.baseline.weights, cfg.baseline.input_mode, cfg.baseline.max_depth)
    return SPD(cfg.model_config())


def compute_losses(model: torch.nn.Module, out: dict, batch: dict, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """SPD's losses (sparse + canvas + LDRM patches) or the baseline's (sparse + dense)."""
    if not isinstance(model, SPD):
        return baseline_losses(out, batch, cfg.loss.dense_weight, cfg.loss.silog_lambda)
    origin = model.ldrm_patch_origin(batch["queries"]) if model.ldrm is not None else None
    return spd_losses(out, batch, origin, cfg.loss.canvas_weight, cfg.loss.patch_weight, cfg.loss.silog_lambda)


def train(cfg: TrainConfig, data_root: str | Path, run_dir: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Trains and returns {"step", "best_abs_rel", "last_val", "stopped"}; see module docstring."""
    from tqdm import tqdm

    info = dist_utils.init_distributed()
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if info.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank

    model = build_training_model(cfg).to(info.device)
    train_set, val_set = resolve_data(cfg, data_root)
    sampler = DistributedSampler(
        train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg.seed, drop_last=True
    )
    micro_per_epoch = len(sampler) // cfg.batch_size
    steps_per_epoch = micro_per_epoch // cfg.accum_steps
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(train_set)} training images are too few for batch {cfg.batch_size} x accum {cfg.accum_steps} "
            f"x {info.world_size} processes"
        )
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    schedule = lr_schedule(total_steps, cfg.optim.warmup_steps, cfg.optim.schedule, cfg.optim.min_lr_ratio)
    optimizer = torch.optim.AdamW(
        model.param_groups(cfg.optim.lr, cfg.optim.encoder_lr_scale, cfg.optim.weight_decay),
        lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
    )
    scaler = torch.amp.GradScaler(enabled=False)  # bf16 needs no loss scaling; kept for fp16 checkpoints
    state = {"step": 0, "epoch": 0, "micro_in_epoch": 0, "best_abs_rel": math.inf, "nonfinite_total": 0}

    resume_from = find_resumable(ckpt_dir) if resume else None
    if resume_from is not None:
        saved = load_training_state(resume_from)
        load_checkpoint_weights(model, resume_from)
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        state.update(saved["progress"])
        set_rng_state(saved["rng"])
        if info.is_main:
            print(f"resumed from {resume_from} at step {state['step']} (epoch {state['epoch']})")
    elif resume and info.is_main:
        print(f"--resume: no checkpoint in {ckpt_dir}; starting from scratch")

    net = DistributedDataParallel(model) if info.distributed else model
    if cfg.compile:
        net = torch.compile(net)
    use_bf16 = cfg.amp == "bf16" or (cfg.amp == "auto" and info.device.type == "cuda")
    autocast = torch.autocast(info.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    if info.is_main:
        save_config(cfg, run_dir / "config.yaml")
    logger = RunLogger(run_dir, info.is_main)
    preemption = _Preemption()
    bar = tqdm(total=total_steps, initial=state["step"], desc="train", disable=not (progress and info.is_main))
    last_val: dict[str, float] | None = None
    consecutive_nonfinite = 0
    stopped = "finished"

    def checkpoint(name: str) -> None:
        if not info.is_main:
            return
        training_state = {
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "progress": dict(state),
            "rng": rng_state(), "total_steps": total_steps,
        }
        save_checkpoint(ckpt_dir / name, model, training_state)
        if name == "last" and cfg.keep_last > 0:
            shutil.copytree(ckpt_dir / "last", ckpt_dir / f"step_{state['step']:07d}", dirs_exist_ok=True)
            for old in sorted(ckpt_dir.glob("step_*"))[: -cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)

    def validate() -> dict[str, float]:
        model.eval()
        metrics, _ = evaluate(
            model, val_set, "sparse", cfg.eval.num_queries, crop=cfg.eval.crop, seed=cfg.eval.seed,
            min_depth=cfg.eval.min_depth, max_depth=cfg.eval.max_depth, device=info.device, rank=info.rank,
            world_size=info.world_size, limit=cfg.eval.limit, progress=False,
        )
        model.train()
        logger.log(state["step"], "val", metrics)
        if metrics["abs_rel"] < state["best_abs_rel"]:
            state["best_abs_rel"] = metrics["abs_rel"]
            checkpoint("best")
        return metrics

    model.train()
    try:
        while state["step"] < total_steps and stopped == "finished":
            sampler.set_epoch(state["epoch"])
            train_set.set_epoch(state["epoch"])
            # Skip what this epoch already consumed before a resume, without loading it.
            order = list(sampler)[: micro_per_epoch * cfg.batch_size][state["micro_in_epoch"] * cfg.batch_size :]
            loader = DataLoader(
                train_set, batch_size=cfg.batch_size, sampler=order, num_workers=cfg.data.workers,
                collate_fn=collate, drop_last=True, pin_memory=info.device.type == "cuda",
            )
            batches = iter(loader)
            while state["micro_in_epoch"] + cfg.accum_steps <= steps_per_epoch * cfg.accum_steps:
                if state["step"] >= total_steps:
                    break
                tick = time.perf_counter()
                lr_factor = float(schedule[state["step"]])
                for group in optimizer.param_groups:
                    group["lr"] = cfg.optim.lr * group["lr_scale"] * lr_factor
                step_terms: dict[str, float] = {}
                skipped = False
                for micro in range(cfg.accum_steps):
                    batch = {k: v.to(info.device, non_blocking=True) if torch.is_tensor(v) else v
                             for k, v in next(batches).items()}
                    state["micro_in_epoch"] += 1
                    sync = nullcontext() if (micro == cfg.accum_steps - 1 or not info.distributed) else net.no_sync()
                    with sync:
                        with autocast:
                            out = net(batch["image"], batch["queries"], batch["query_mask"], return_aux=True)
                        out = {k: v.float() for k, v in out.items()}
                        terms = compute_losses(model, out, batch, cfg)
                        if dist_utils.any_true(not bool(torch.isfinite(terms["total"])), info):
                            skipped = True
                            break
                        (terms["total"] / cfg.accum_steps).backward()
                    for name, value in terms.items():
                        step_terms[name] = step_terms.get(name, 0.0) + float(value.detach()) / cfg.accum_steps
                grad_norm = torch.tensor(float("nan"))
                if not skipped:
                    if cfg.save_first_step_grads and state["step"] == 0 and info.is_main:
                        grads = {n: p.grad.detach().cpu().contiguous() for n, p in model.named_parameters() if p.grad is not None}
                        save_file(grads, str(run_dir / "first_step_grads.safetensors"))
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                    skipped = dist_utils.any_true(not bool(torch.isfinite(grad_norm)), info)
                if skipped:
                    optimizer.zero_grad(set_to_none=True)
                    consecutive_nonfinite += 1
                    state["nonfinite_total"] += 1
                    if consecutive_nonfinite >= cfg.max_nonfinite:
                        raise FloatingPointError(
                            f"{consecutive_nonfinite} consecutive non-finite losses or gradients at step {state['step']}; "
                            "stopping. Lower optim.lr, check the data (spd data check) or resume from checkpoints/last"
                        )
                    continue
                consecutive_nonfinite = 0
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                step = state["step"]
                images_per_s = cfg.batch_size * cfg.accum_steps * info.world_size / (time.perf_counter() - tick)
                bar.update(1)
                if step % cfg.log_every == 0 or step == 1:
                    mean_terms = {
                        k: float(dist_utils.all_reduce_mean(torch.tensor(v, device=info.device), info))
                        for k, v in step_terms.items()
                    }
                    logger.log(step, "train", {**{f"loss_{k}": v for k, v in mean_terms.items()},
                                               "lr": cfg.optim.lr * lr_factor, "grad_norm": float(grad_norm),
                                               "images_per_s": images_per_s, "epoch": state["epoch"]})
                    bar.set_postfix(loss=f"{mean_terms['total']:.4f}", lr=f"{cfg.optim.lr * lr_factor:.2e}",
                                    img_s=f"{images_per_s:.1f}")
                if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < total_steps:
                    last_val = validate()
                if step % cfg.ckpt_every == 0:
                    checkpoint("last")
                if dist_utils.any_true(preemption.requested, info):
                    stopped = "preempted"
                    break
            else:
                state["epoch"] += 1
                state["micro_in_epoch"] = 0
        if stopped == "finished":
            last_val = validate()
        checkpoint("last")
        if stopped == "preempted" and info.is_main:
            print(f"SIGTERM: saved {ckpt_dir / 'last'} at step {state['step']}; continue with --resume")
    finally:
        bar.close()
        logger.close()
        preemption.restore()
        dist_utils.cleanup(info)
    return {"step": state["step"], "best_abs_rel": state["best_abs_rel"], "last_val": last_val, "stopped": stopped}
