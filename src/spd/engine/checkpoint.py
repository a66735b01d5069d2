"""Training state: optimiser, scaler, RNG states and progress, saved beside a model folder.

A training checkpoint folder is a model folder (`spd.models.spd.save_model`, or the baseline's
Hugging Face folder) plus `training_state.pt`. Nothing here unpickles code: the training state is
read with `torch.load(weights_only=True)` and holds only tensors and plain Python values.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from spd.models.folder import MODEL_FILE, CheckpointError, fsync_path, read_weights
from spd.models.dense_control import DenseControl, save_dense_control
from spd.models.spd import SPD, save_model

STATE_FILE = "training_state.pt"


def rng_state() -> dict:
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {"state": torch.from_numpy(np_state["state"]["key"].astype(np.int64)), "pos": np_state["state"]["pos"],
                  "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    np_state = state["numpy"]
    np.random.set_state({
        "bit_generator": "MT19937",
        "state": {"key": np_state["state"].numpy().astype(np.uint32), "pos": np_state["pos"]},
        "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"],
    })
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, model, training_state: dict) -> None:
    """Writes a complete checkpoint folder atomically: into a temp folder (every file fsynced), then
    renamed into place. A failure (a full disk) removes the temp folder, leaves the previous
    checkpoint as it was, and raises CheckpointError saying so.

    SPD models get `save_model`'s folder, the dense control `save_dense_control`'s; the DAv2-S baseline a Hugging Face folder (its
    `save_pretrained`), readable by `load_baseline` / `spd eval --model baseline:FOLDER`.
    """
    folder = Path(folder)
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if isinstance(model, SPD):
            save_model(model, tmp)
        elif isinstance(model, DenseControl):
            save_dense_control(model, tmp)
        else:
            tmp.mkdir(parents=True)
            model.save_pretrained(tmp)
        torch.save(training_state, tmp / STATE_FILE)
        for path in (*tmp.iterdir(), tmp):
            fsync_path(path)
    except (OSError, SafetensorError, RuntimeError) as err:  # a full disk, as each writer reports it
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(err, "strerror", None) or " ".join(str(err).split())[:200]
        raise CheckpointError(f"could not write checkpoint {folder} ({reason}); the previous one is intact") from None
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def link_copy(source: Path, target: Path) -> None:
    """`target` becomes a copy of checkpoint folder `source` made of hard links (no data written, so
    a full disk cannot half-copy it), built beside it and renamed into place."""
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(source, tmp, copy_function=os.link)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {target} ({err.strerror or err})") from None
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def find_resumable(checkpoints: Path) -> Path | None:
    """`last/`, or `last.old/` if a crash fell between the two renames of `save_checkpoint`."""
    for name in ("last", "last.old"):
        if (checkpoints / name / STATE_FILE).is_file():
            return checkpoints / name
    return None


def load_checkpoint_weights(model, folder: Path) -> None:
    """Puts a checkpoint folder's weights into the model being trained (resume)."""
    if isinstance(model, (SPD, DenseControl)):
        model.load_state_dict(read_weights(folder / MODEL_FILE))
    else:
        try:
            model.load_weights(folder)
        except (OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{folder}: not a readable baseline checkpoint ({err})") from err


def load_training_state(folder: Path) -> dict:
    path = folder / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here means an unusable file; say which
        raise CheckpointError(f"{path}: unreadable training state ({type(err).__name__}: {err})") from err
