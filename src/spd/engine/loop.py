"""The training loop's parts, in the torchvision-references shape: a small `TrainState`, the
`Session` that holds what every step uses, `train_step` (one optimiser step over the micro-batches)
and `train_one_epoch`, plus validation and checkpoints.

Host syncs: `train_step` never reads a device value on the host. A non-finite loss or gradient is
detected on the device and the optimiser step skipped there (fused AdamW's `found_inf`, as AMP's
GradScaler does it); the skip counters are read only where the loop logs (every `log_every`
steps) and at checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from spd.cameras.canonical import canonical_focal_of, labels_to_canonical
from spd.engine import distributed as dist_utils
from spd.engine.checkpoint import link_copy, rng_state, save_checkpoint
from spd.engine.data_setup import EpochPlan
from spd.engine.evaluate import evaluate
from spd.engine.runlog import Preemption, RunLogger
from spd.losses import baseline_losses, spd_losses
from spd.models.spd import SPD
from spd.config.training import TrainConfig


@dataclass
class TrainState:
    """Progress, saved in every checkpoint: optimiser steps, position in the epoch, best score."""

    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0
    best_abs_rel: float = math.inf
    nonfinite_total: int = 0  # optimiser steps skipped for a non-finite loss or gradient
    finished: bool = False  # the step budget was reached and the final validation ran (`run_finished`)


@dataclass
class Session:
    """Everything the loop needs besides its progress. `model` is the bare model, `net` what the
    forward runs through (DDP and/or compiled)."""

    cfg: TrainConfig
    info: dist_utils.DistInfo
    run_dir: Path
    model: torch.nn.Module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: "object"  # per-step LR multipliers (np.ndarray)
    epochs: EpochPlan
    val_set: object
    total_steps: int
    logger: RunLogger
    preemption: Preemption
    autocast: object = field(default_factory=nullcontext)
    # Device counters (no host sync per step): consecutive and total skipped steps.
    nonfinite_run: torch.Tensor | None = None
    nonfinite_count: torch.Tensor | None = None

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"


def compute_losses(model: torch.nn.Module, out: dict, batch: dict, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """SPD's losses (sparse + canvas + LDRM patches) or the baseline's (sparse + dense)."""
    if not isinstance(model, SPD):
        return baseline_losses(out, batch, cfg.loss.dense_weight, cfg.loss.silog_lambda, cfg.loss.trim_fraction)
    origin = model.ldrm_patch_origin(batch["queries"]) if model.ldrm is not None else None
    return spd_losses(out, batch, origin, cfg.loss.canvas_weight, cfg.loss.patch_weight, cfg.loss.silog_lambda,
                      cfg.loss.trim_fraction)


def train_step(session: Session, batches, state: TrainState) -> dict[str, torch.Tensor]:
    """One optimiser step over `accum_steps` micro-batches. Returns the step's loss terms (averaged
    over micro-batches) and `grad_norm`, all device tensors: nothing here syncs with the device."""
    cfg, info, model = session.cfg, session.info, session.model
    terms_sum: dict[str, torch.Tensor] = {}
    for micro in range(cfg.accum_steps):
        batch = {k: v.to(info.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in next(batches).items()}
        batch = labels_to_canonical(batch, canonical_focal_of(model))  # the model learns its canonical camera
        state.micro_in_epoch += 1
        last = micro == cfg.accum_steps - 1
        with nullcontext() if last or not info.distributed else session.net.no_sync():
            with session.autocast:
                # The data pipeline makes valid queries: skip the value checks (they sync).
                out = session.net(batch["image"], batch["queries"], batch["query_mask"], return_aux=True, check_values=False)
            terms = compute_losses(model, {k: v.float() for k, v in out.items()}, batch, cfg)
            (terms["total"] / cfg.accum_steps).backward()
        for name, value in terms.items():
            terms_sum[name] = terms_sum.get(name, 0) + value.detach() / cfg.accum_steps
    if cfg.save_first_step_grads and state.step == 0 and info.is_main:
        grads = {n: p.grad.detach().cpu().contiguous() for n, p in model.named_parameters() if p.grad is not None}
        save_file(grads, str(session.run_dir / "first_step_grads.safetensors"))
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    # A non-finite loss makes non-finite gradients (DDP spreads them to every rank): skip the update
    # on the device. Fused AdamW reads `found_inf` and leaves parameters and moments untouched.
    nonfinite = ~(torch.isfinite(grad_norm) & torch.isfinite(terms_sum["total"]))
    session.optimizer.found_inf = nonfinite.float()
    session.optimizer.step()
    session.optimizer.zero_grad(set_to_none=True)
    session.nonfinite_run = (session.nonfinite_run + 1) * nonfinite
    session.nonfinite_count = session.nonfinite_count + nonfinite
    return {**terms_sum, "grad_norm": grad_norm}


def set_learning_rate(session: Session, step: int) -> float:
    lr_factor = float(session.schedule[step])
    for group in session.optimizer.param_groups:
        group["lr"] = session.cfg.optim.lr * group["lr_scale"] * lr_factor
    return lr_factor


def read_nonfinite(session: Session, state: TrainState) -> int:
    """Host read of the skip counters (at log steps and checkpoints): updates the state's total and
    returns the current run of consecutive skipped steps."""
    run, total = (int(v) for v in torch.stack([session.nonfinite_run, session.nonfinite_count]).tolist())
    state.nonfinite_total = total
    return run


def stop_if_diverged(session: Session, state: TrainState) -> None:
    run = read_nonfinite(session, state)
    if run >= session.cfg.max_nonfinite:
        raise FloatingPointError(
            f"{session.cfg.max_nonfinite} consecutive non-finite losses or gradients (the last {run} steps up to "
            f"step {state.step} were skipped); stopping. Lower optim.lr, check the data (spd data check) or resume "
            "from checkpoints/last"
        )


def log_train_step(session: Session, state: TrainState, step_out: dict, lr_factor: float, images: int, seconds: float) -> None:
    """Averages the step's terms over ranks and writes them (one device sync)."""
    names = list(step_out)
    values = dist_utils.all_reduce_mean(torch.stack([step_out[n].float() for n in names]), session.info).tolist()
    stop_if_diverged(session, state)
    logged = {f"loss_{n}" if n != "grad_norm" else n: v for n, v in zip(names, values)}
    session.logger.log(state.step, "train", {**logged, "lr": session.cfg.optim.lr * lr_factor,
                                             "images_per_s": images / max(seconds, 1e-9), "epoch": state.epoch,
                                             "nonfinite_total": state.nonfinite_total})


def checkpoint(session: Session, state: TrainState, name: str) -> None:
    """Rank 0 writes checkpoints/NAME (atomically); `last` also keeps `keep_last` step copies."""
    if not session.info.is_main:
        return
    read_nonfinite(session, state)
    training_state = {"optimizer": session.optimizer.state_dict(), "progress": dataclasses.asdict(state),
                      "rng": rng_state(), "total_steps": session.total_steps}
    ckpt_dir = session.ckpt_dir
    save_checkpoint(ckpt_dir / name, session.model, training_state)
    if name == "last" and session.cfg.keep_last > 0:
        link_copy(ckpt_dir / "last", ckpt_dir / f"step_{state.step:07d}")
        for old in sorted(p for p in ckpt_dir.glob("step_*") if ".tmp-" not in p.name)[: -session.cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def validate(session: Session, state: TrainState) -> dict[str, float] | None:
    """Sparse-protocol validation; a new best score writes checkpoints/best. None when the run has no
    validation set (a description without val_list, eval.every_steps=0)."""
    if session.val_set is None:
        return None
    cfg, info, model = session.cfg, session.info, session.model
    model.eval()
    metrics, _ = evaluate(
        model, session.val_set, "sparse", cfg.eval.num_queries, crop=cfg.eval.crop, seed=cfg.eval.seed,
        min_depth=cfg.eval.min_depth, max_depth=cfg.eval.max_depth, device=info.device, rank=info.rank,
        world_size=info.world_size, limit=cfg.eval.limit, progress=False,
    )
    model.train()
    session.logger.log(state.step, "val", metrics)
    if metrics["abs_rel"] < state.best_abs_rel:
        state.best_abs_rel = metrics["abs_rel"]
        checkpoint(session, state, "best")
    return metrics


def train_one_epoch(session: Session, state: TrainState, bar) -> str:
    """Steps through the rest of the current epoch. Returns "epoch_done", "finished" (max steps
    reached) or "preempted" (SIGTERM: the caller saves and exits)."""
    cfg, info = session.cfg, session.info
    batches = session.epochs.batches(state.epoch, state.micro_in_epoch)
    micro_limit = session.epochs.steps_per_epoch * cfg.accum_steps
    since, images = time.perf_counter(), 0
    while state.micro_in_epoch + cfg.accum_steps <= micro_limit:
        if state.step >= session.total_steps:
            return "finished"
        lr_factor = set_learning_rate(session, state.step)
        step_out = train_step(session, batches, state)
        state.step += 1
        images += cfg.batch_size * cfg.accum_steps * info.world_size
        bar.update(1)
        logs = state.step % cfg.log_every == 0 or state.step == 1
        if logs:
            log_train_step(session, state, step_out, lr_factor, images, time.perf_counter() - since)
            since, images = time.perf_counter(), 0
        if cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0 and state.step < session.total_steps:
            validate(session, state)
        if state.step % cfg.ckpt_every == 0:
            checkpoint(session, state, "last")
        # Across ranks the flag costs a collective (a sync): checked where the loop logs.
        if (logs or not info.distributed) and dist_utils.any_true(session.preemption.requested, info):
            return "preempted"
    state.epoch += 1
    state.micro_in_epoch = 0
    return "epoch_done"
