"""The model-folder format: `config.json` + `model.safetensors` (the Hugging Face layout).

This module knows files, not networks: it reads and writes the two files, resolves a local folder
or a Hub id, and turns every problem into a `CheckpointError` naming the file. `spd.models.spd`
builds the model on top of it (`load_model` / `save_model`, the one door every caller uses).
Nothing here unpickles code.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from spd.errors import EXIT_CHECKPOINT, SPDError

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
WEIGHTS_SHA256 = "weights_sha256"  # config.json key: SHA-256 of model.safetensors as saved


class CheckpointError(SPDError, RuntimeError):
    """A checkpoint folder is missing, truncated, tampered with or does not fit the model."""

    exit_code = EXIT_CHECKPOINT


def fsync_path(path: Path) -> None:
    """Flush a written file (or a folder's entries) to the disk, so a rename after it is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """`write(tmp)`, fsync, then rename onto `path`: readers never see a half-written file, and a
    failed write (a full disk) leaves the previous file and no temporary one."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_model_folder(folder: str | Path, state: dict[str, torch.Tensor], config: dict[str, Any], model_type: str) -> Path:
    """Writes `config.json` ({"model_type": ..., **config}) and `model.safetensors`, each atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(folder / MODEL_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt", "library": "spd"}))
    # The weights' checksum, checked at load: a file altered after saving is refused, not used.
    text = json.dumps({"model_type": model_type, WEIGHTS_SHA256: file_sha256(folder / MODEL_FILE), **config}, indent=2)
    atomic_write(folder / CONFIG_FILE, lambda p: p.write_text(text))
    return folder


def resolve_model_folder(path: str | Path) -> Path:
    """A local folder as given, or a Hugging Face Hub id (`owner/name`) downloaded with huggingface_hub."""
    folder = Path(path)
    if folder.is_file():
        raise CheckpointError(f"{folder}: a file, not a model folder (a model folder holds {CONFIG_FILE} and {MODEL_FILE})")
    if folder.exists():
        return folder
    text = str(path)
    # Only an `owner/name` whose owner is not a local folder is a Hub id: a mistyped local path
    # ("runs/tny") must fail here, not as an internet-connection error.
    looks_local = text.startswith((".", "/", "~")) or text.count("/") != 1 or Path(text.split("/")[0]).exists()
    if looks_local:
        raise CheckpointError(f"{folder}: model folder not found")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=[CONFIG_FILE, MODEL_FILE]))
    except Exception as err:  # noqa: BLE001 - offline, unknown repo, auth: one clear line either way
        raise CheckpointError(f"{text}: not a local folder, and not downloadable from the Hugging Face Hub "
                              f"({type(err).__name__})") from None


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


def verify_weights_checksum(folder: Path, config: dict[str, Any]) -> str:
    """The weights file's SHA-256; CheckpointError if config.json recorded another one."""
    actual = file_sha256(folder / MODEL_FILE)
    expected = config.get(WEIGHTS_SHA256)
    if expected is not None and expected != actual:
        raise CheckpointError(
            f"{folder / MODEL_FILE}: checksum mismatch (the file changed after it was saved; expected sha256 "
            f"{expected[:12]}..., found {actual[:12]}...)"
        )
    return actual


def build_with_weights(build: Callable[[], torch.nn.Module], folder: Path, device: str | torch.device = "cpu"):
    """`build()` (a randomly initialised model; its random-encoder warning silenced: the weights come
    next) with the folder's weights loaded strictly, on `device`, in eval mode: the last step of
    every model-folder loader."""
    state = read_weights(folder / MODEL_FILE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build()
    check_state_matches(state, model.state_dict(), folder / MODEL_FILE)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


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
