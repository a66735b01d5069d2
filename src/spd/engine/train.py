"""The training loop (DESIGN.md §4), readable top to bottom: data -> model -> optimiser -> epochs.

One process or many under torchrun (DDP); stop it at any moment (SIGTERM or kill -9) and
`resume=True` continues exactly: per-sample randomness comes from (seed, epoch, index), and the
checkpoint holds model, optimiser, progress and RNG states. The parts live in `loop.py` (steps,
epochs, validation, checkpoints), `data_setup.py` (datasets, epoch order) and `runlog.py`
(metrics.jsonl, TensorBoard, pre-emption).
"""

from __future__ import annotations

import dataclasses

import random
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from spd.data.check import check_training_labels
from spd.engine import distributed as dist_utils
from spd.engine.checkpoint import find_resumable, load_checkpoint_weights, load_training_state, set_rng_state
from spd.engine.data_setup import EpochPlan, resolve_data
from spd.engine.loop import Session, TrainState, checkpoint, train_one_epoch, validate
from spd.engine.runlog import Preemption, RunFolderGuard, RunLogger, truncate_metrics
from spd.models.dense_control import DenseControl
from spd.models.spd import SPD
from spd.config.training import TrainConfig, save_config
from spd.errors import ConfigError


def lr_schedule(total_steps: int, warmup_steps: int, kind: str = "cosine", min_ratio: float = 0.01) -> np.ndarray:
    """Per-step LR multiplier: linear warm-up to 1, then cosine or poly (power 0.9) decay to `min_ratio`."""
    steps = np.arange(total_steps, dtype=np.float64)
    warmup = max(1, min(warmup_steps, total_steps))
    progress = np.clip((steps - warmup) / max(1, total_steps - warmup), 0, 1)
    decay = 0.5 * (1 + np.cos(np.pi * progress)) if kind == "cosine" else (1 - progress) ** 0.9
    after = min_ratio + (1 - min_ratio) * decay
    return np.where(steps < warmup, (steps + 1) / warmup, after)


def build_training_model(cfg: TrainConfig) -> torch.nn.Module:
    """The model a config trains: SPD (its preset + overrides), the dense control on the same
    encoder and neck (spd.models.dense_control), or the DAv2-S baseline."""
    if cfg.architecture == "dav2-small":
        from spd.models.baseline import DepthAnythingBaseline

        if cfg.activation_checkpointing:
            raise ConfigError("activation_checkpointing applies to SPD (encoder, ldrm), not to the dav2-small baseline")

        return DepthAnythingBaseline(cfg.baseline.weights, cfg.baseline.input_mode, cfg.baseline.max_depth)
    if cfg.architecture == "dense-control":
        from spd.models.dense_control import DenseControl

        if "ldrm" in cfg.activation_checkpointing:
            raise ConfigError("activation_checkpointing: the dense control has no LDRM (only 'encoder' applies)")
        model = DenseControl(cfg.model_config())
    else:
        model = SPD(cfg.model_config())
    model.set_activation_checkpointing(cfg.activation_checkpointing)
    return model


# May differ in --init-from: where the encoder's first weights came from, exact speed knobs, and the
# canonical camera and pixel scale (the run says which camera and scale the fine-tuned model learns).
ARCHITECTURE_INDEPENDENT = {"encoder_weights", "encoder_fast", "decoder_fast", "ldrm_fast", "canonical_focal",
                            "image_long_side", "trained_on"}


def init_weights_from(model: torch.nn.Module, folder: str) -> dict:
    """Loads a saved SPD model folder's weights into `model`, the start of a fine-tuning run. Its model
    config must equal the run's in every architecture field (ConfigError listing the differences).
    Returns {"folder", "weights_sha256"} for the run log."""
    from spd.errors import ConfigError
    from spd.models.folder import WEIGHTS_SHA256, read_config_dict, resolve_model_folder
    from spd.models.spd import load_model

    if not isinstance(model, SPD):
        raise ConfigError(f"init_from {folder}: takes an SPD model folder, and this run trains the baseline")
    source = load_model(folder)  # strict, checksum-verified
    mine, theirs = model.config.to_dict(), source.config.to_dict()
    differences = [f"{key} ({theirs.get(key)!r} there, {value!r} here)" for key, value in mine.items()
                   if key not in ARCHITECTURE_INDEPENDENT and theirs.get(key) != value]
    if differences:
        raise ConfigError(f"init_from {folder}: its model differs from this run's in {', '.join(differences)}")
    model.load_state_dict(source.state_dict(), strict=True)
    return {"folder": str(folder), "weights_sha256": read_config_dict(resolve_model_folder(folder)).get(WEIGHTS_SHA256)}


def record_pixel_scale(model: torch.nn.Module, train_set) -> None:
    """An SPD model (or dense control) without an explicit `image_long_side` records its training frames' long side, so
    that every later use feeds images at this pixel scale (spd.cameras.scale). Read from the first
    training frame (mixed sets share one size: `check_one_pixel_scale` refused any other); a crop does not change the pixel scale."""
    if not isinstance(model, (SPD, DenseControl)) or model.config.image_long_side is not None:
        return
    first = train_set.parts[0] if hasattr(train_set, "parts") else train_set
    height, width = first.load(0)[0].shape[:2]
    model.config = dataclasses.replace(model.config, image_long_side=max(height, width))


def record_training_data(model: torch.nn.Module, train_set, cfg: TrainConfig, data_root) -> None:
    """An SPD model (or dense control) records what it is trained on (`spd.data.provenance`): every
    set of the mix, plus the folder it was fine-tuned from."""
    from spd.data.provenance import describe_training_data

    if isinstance(model, (SPD, DenseControl)):
        sources = [str(data_root), *(str(entry["dataset"]) for entry in cfg.data.mix)]
        sets = describe_training_data(getattr(train_set, "parts", [train_set]), sources)
        if cfg.init_from is not None:
            sets.append({"kind": "fine-tuned from", "source": str(cfg.init_from)})
        model.config = dataclasses.replace(model.config, trained_on=sets)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the model's groups. Fused: it skips a non-finite step on the device (`found_inf`)
    and keeps its step counts on the device, so an optimiser step never syncs with the host."""
    groups = model.param_groups(cfg.optim.lr, cfg.optim.encoder_lr_scale, cfg.optim.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), fused=True)


def build_session(cfg: TrainConfig, data_root: str | Path, run_dir: Path, info: dist_utils.DistInfo) -> Session:
    """Seeds, model, data, optimiser, schedule and the run folder's logger, wired together."""
    train_set, val_set = resolve_data(cfg, data_root)
    check_training_labels(train_set, cfg.data.min_depth, cfg.data.max_depth)  # a unit mistake: refused before step 1
    if val_set is not None:
        check_training_labels(val_set, cfg.eval.min_depth, cfg.eval.max_depth, what="validation")
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_training_model(cfg).to(info.device)
    source = init_weights_from(model, cfg.init_from) if cfg.init_from is not None else None  # before the folder is touched
    record_pixel_scale(model, train_set)
    record_training_data(model, train_set, cfg, data_root)
    epochs = EpochPlan(train_set, cfg, info)
    total_steps = cfg.max_steps or cfg.epochs * epochs.steps_per_epoch
    net = DistributedDataParallel(model) if info.distributed else model
    use_bf16 = cfg.amp == "bf16" or (cfg.amp == "auto" and info.device.type == "cuda")
    if info.is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    logger = RunLogger(run_dir, info.is_main)
    if source is not None:
        logger.log(0, "init_from", source)
        if info.is_main:
            print(f"weights from {source['folder']} (sha256 {source['weights_sha256']}); new optimiser and schedule")
    if isinstance(model, SPD) and model.encoder.weights_info is not None:
        # Which file the encoder started from, provably: path, SHA-256 and the tensors it filled.
        logger.log(0, "encoder_weights", model.encoder.weights_info)
        if info.is_main:
            print(f"encoder weights: {model.encoder.weights_info}")
    zero = torch.zeros((), dtype=torch.long, device=info.device)
    return Session(
        cfg, info, run_dir, model, torch.compile(net) if cfg.compile else net, build_optimizer(model, cfg),
        lr_schedule(total_steps, cfg.optim.warmup_steps, cfg.optim.schedule, cfg.optim.min_lr_ratio), epochs, val_set,
        total_steps, logger, Preemption(),
        torch.autocast(info.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext(), zero, zero.clone(),
    )


def resume_state(session: Session, resume: bool) -> TrainState:
    """A fresh state, or the one in checkpoints/last (weights, optimiser and RNG restored too)."""
    resume_from = find_resumable(session.ckpt_dir) if resume else None
    if resume_from is None:
        if resume and session.info.is_main:
            print(f"--resume: no checkpoint in {session.ckpt_dir}; starting from scratch")
        return TrainState()
    saved = load_training_state(resume_from)
    load_checkpoint_weights(session.model, resume_from)
    session.optimizer.load_state_dict(saved["optimizer"])
    set_rng_state(saved["rng"])
    state = TrainState(**saved["progress"])
    session.nonfinite_count.fill_(state.nonfinite_total)
    if session.info.is_main:
        truncate_metrics(session.run_dir, state.step)  # rows a killed run logged after this checkpoint
        print(f"resumed from {resume_from} at step {state.step} (epoch {state.epoch})")
    return state


def train(cfg: TrainConfig, data_root: str | Path, run_dir: str | Path, resume: bool = False, progress: bool = True,
          overwrite: bool = False, resume_hint: str = "continue with --resume") -> dict:
    """Trains and returns {"step", "best_abs_rel", "last_val", "stopped"}; see module docstring.
    `overwrite` deletes a run already in `run_dir` (without it, or `resume`, that is refused).
    `resume_hint`: what a stopped run prints after saving (the command that continues it). A run
    that fails before its first checkpoint leaves nothing that would block running it again."""
    info = dist_utils.init_distributed()
    guard = RunFolderGuard(Path(run_dir), cfg.to_dict(), resume, overwrite) if info.is_main else None
    try:
        session = build_session(cfg, data_root, Path(run_dir), info)
        state = resume_state(session, resume)
    except BaseException:  # a bad setting or file found while building: the folder stays free for the next try
        _release_unfinished(guard, Path(run_dir), info)
        raise
    try:
        return run_epochs(session, state, progress, resume_hint)
    except BaseException:
        _release_unfinished(guard, Path(run_dir), info)
        raise
    finally:
        if guard is not None:
            guard.release()


def run_finished(run_dir: str | Path) -> bool:
    """True when `run_dir` holds a run that reached its step budget (its last checkpoint says so);
    False for no run, an interrupted one, or one saved before checkpoints recorded it."""
    last = find_resumable(Path(run_dir) / "checkpoints")
    return last is not None and bool(load_training_state(last)["progress"].get("finished", False))


def _release_unfinished(guard: RunFolderGuard | None, run_dir: Path, info) -> None:
    """After a failure: a run with no checkpoint yet is cleared (its logs would block the rerun), then unlocked."""
    if guard is None:
        return
    unfinished = find_resumable(run_dir / "checkpoints") is None
    if unfinished:
        RunFolderGuard.clear(run_dir)
    guard.release(tidy=unfinished)


def run_epochs(session: Session, state: TrainState, progress: bool, resume_hint: str = "continue with --resume") -> dict:
    """Epochs until the step budget or a pre-emption, the final validation and checkpoint."""
    from tqdm import tqdm

    info, stopped, last_val = session.info, "epoch_done", None
    bar = tqdm(total=session.total_steps, initial=state.step, desc="train", disable=not (progress and info.is_main))
    try:
        session.model.train()
        while state.step < session.total_steps and stopped != "preempted":
            stopped = train_one_epoch(session, state, bar)
        if stopped != "preempted":
            last_val = validate(session, state)
            state.finished = True
        checkpoint(session, state, "last")
        if stopped == "preempted" and info.is_main:
            print(f"{session.preemption.requested}: saved {session.ckpt_dir / 'last'} at step {state.step}; "
                  f"{resume_hint}")
    finally:
        bar.close()
        session.logger.close()
        session.preemption.restore()
        dist_utils.cleanup(info)
    stopped = "preempted" if stopped == "preempted" else "finished"
    return {"step": state.step, "best_abs_rel": state.best_abs_rel, "last_val": last_val, "stopped": stopped}
