"""The model-folder format: `config.json` + `model.safetensors` (the Hugging Face layout).

This module knows files, not networks: it reads and writes the two files, resolves a local folder
or a Hub id, and turns every problem into a `CheckpointError` naming the file. `spd.models.spd`
builds the model on top of it (`load_model` / `save_model`, the one door every caller uses).
Nothing here unpickles code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, truncated, tampered with or does not fit the model."""


def atomic_write(path: Path, write) -> None:
    """`write(tmp)` then rename onto `path`: readers never see a half-written file."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def write_model_folder(folder: str | Path, state: dict[str, torch.Tensor], config: dict[str, Any], model_type: str) -> Path:
    """Writes `config.json` ({"model_type": ..., **config}) and `model.safetensors`, each atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(folder / MODEL_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt", "library": "spd"}))
    text = json.dumps({"model_type": model_type, **config}, indent=2)
    atomic_write(folder / CONFIG_FILE, lambda p: p.write_text(text))
    return folder


def resolve_model_folder(path: str | Path) -> Path:
    """A local folder as given, or a Hugging Face Hub id (`owner/name`) downloaded with huggingface_hub."""
    folder = Path(path)
    if folder.exists():
        return folder
    text = str(path)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=[CONFIG_FILE, MODEL_FILE]))
    raise CheckpointError(f"{folder}: model folder not found")


def read_config_dict(folder: Path) -> dict[str, Any]:
    """The folder's `config.json` as a dict (with its `model_type`)."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (a model folder holds {CONFIG_FILE} and {MODEL_FILE})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a model config (a JSON object)")
    return data


def read_weights(weights: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, or CheckpointError naming the file and the problem."""
    if not weights.is_file():
        raise CheckpointError(f"{weights}: not found")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights}: unreadable, truncated or not a safetensors file ({err})") from err


def check_state_matches(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: Path) -> None:
    """Strict: every expected tensor present with its shape, nothing extra; else CheckpointError listing keys."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{source}: does not match the model in {CONFIG_FILE}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}"
        )
