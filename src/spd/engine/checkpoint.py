"""Checkpoints: model folders (config.json + model.safetensors) and atomic training state.

Nothing here unpickles code: weights are safetensors, the training state is read with
`torch.load(weights_only=True)` and holds only tensors and plain Python values.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from spd.config import ModelConfig
from spd.models.spd import SPD

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "training_state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, truncated, tampered with or does not fit the model."""


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def save_model(model: SPD, folder: str | Path) -> Path:
    """Writes `config.json` + `model.safetensors` (the Hugging Face layout), each file atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _atomic_write(folder / MODEL_FILE, lambda p: save_file(state, str(p), metadata={"format": "pt", "library": "spd"}))
    config = model.config.to_dict()
    config["encoder_weights"] = None  # the weights now live in model.safetensors
    _atomic_write(folder / CONFIG_FILE, lambda p: p.write_text(json.dumps({"model_type": "spd", **config}, indent=2)))
    return folder


def read_model_config(folder: Path) -> ModelConfig:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (a model folder holds {CONFIG_FILE} and {MODEL_FILE})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    data.pop("model_type", None)
    data["encoder_weights"] = None
    try:
        return ModelConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: not an SPD model config ({err})") from err


def read_weights(weights: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, or CheckpointError naming the file and the problem."""
    if not weights.is_file():
        raise CheckpointError(f"{weights}: not found")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights}: unreadable, truncated or not a safetensors file ({err})") from err


def load_model(path: str | Path, device: str | torch.device = "cpu") -> SPD:
    """Loads an SPD model folder (or a Hugging Face Hub id, downloaded with huggingface_hub).

    Strict: every tensor must be present with the right shape; a truncated or tampered file
    raises CheckpointError naming the file and the problem.
    """
    folder = Path(path)
    if not folder.exists():
        if str(path).count("/") == 1 and not str(path).startswith((".", "/")):
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(path), allow_patterns=[CONFIG_FILE, MODEL_FILE]))
        else:
            raise CheckpointError(f"{folder}: model folder not found")
    config = read_model_config(folder)
    weights = folder / MODEL_FILE
    state = read_weights(weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-encoder warning: the weights come next
        model = SPD(config, warn_random_encoder=False)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{weights}: does not match the model in {CONFIG_FILE}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}"
        )
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


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
    """Writes a complete checkpoint folder atomically: into a temp folder, then renamed into place.

    SPD models get `save_model`'s folder; the DAv2-S baseline a Hugging Face folder (its
    `save_pretrained`), readable by `load_baseline` / `spd eval --model baseline:FOLDER`.
    """
    folder = Path(folder)
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(model, SPD):
        save_model(model, tmp)
    else:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp)
    torch.save(training_state, tmp / STATE_FILE)
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def find_resumable(checkpoints: Path) -> Path | None:
    """`last/`, or `last.old/` if a crash fell between the two renames of `save_checkpoint`."""
    for name in ("last", "last.old"):
        if (checkpoints / name / STATE_FILE).is_file():
            return checkpoints / name
    return None


def load_checkpoint_weights(model, folder: Path) -> None:
    """Puts a checkpoint folder's weights into the model being trained (resume)."""
    if isinstance(model, SPD):
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
