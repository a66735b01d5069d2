"""Strict loading of encoder weights files into SPD's features-only ConvNeXt V2 (DESIGN.md §3).

Accepted layouts, detected from the keys:
- timm's (`stem.0.weight`, `stages.0.blocks.0.conv_dw.weight`, ...) as `.safetensors` or `.pth`;
- the official facebookresearch/ConvNeXt-V2 checkpoints (`{"model": {...}}` with `downsample_layers`,
  `dwconv`, `pwconv1`, `grn.gamma` ...), remapped by timm's own `convnext.checkpoint_filter_fn`;
- the FCMAE pre-training checkpoints of that repository (`encoder.`-prefixed sparse MinkowskiEngine
  tensors: `.kernel` convolutions, `.ln` / `.linear` wrappers), first made dense the way the
  repository's `remap_checkpoint_keys` does for fine-tuning; the FCMAE decoder's tensors are dropped.

Every tensor of the encoder must come from the file with its shape; anything missing or left over
(other than a classifier head or the FCMAE decoder) is an error that names the keys. Nothing is
unpickled: `.pt`/`.pth` files are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.models.convnext import checkpoint_filter_fn
from torch import nn

from spd.models.folder import CheckpointError, file_sha256


class EncoderWeightsError(CheckpointError):
    """An encoder weights file is unreadable or does not fill every encoder tensor."""


def read_state_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` or a `.pt`/`.pth` file (unwrapping a `model`/`state_dict` key)."""
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as err:
        raise EncoderWeightsError(f"{path}: unreadable encoder weights ({type(err).__name__}: {err})") from err
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise EncoderWeightsError(f"{path}: not a state dict of tensors")
    return state


def fcmae_sparse_to_dense(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FCMAE pre-training tensors -> the dense ConvNeXt V2 layout of the official repository.

    Keeps the `encoder.` tensors (the rest is the FCMAE decoder), turns MinkowskiEngine kernels
    (kernel_volume, in, out) / depthwise (kernel_volume, dim) into conv weights, drops the `ln` /
    `linear` wrapper names, and flattens biases and GRN parameters.
    """
    dense = {}
    for key, value in state.items():
        if not key.startswith("encoder."):
            continue
        parts = key.split(".")[1:]
        if parts[-1] == "kernel":
            side = math.isqrt(value.shape[0])
            if value.dim() == 3:  # (kv, in, out) -> (out, in, k, k)
                value = value.permute(2, 1, 0).reshape(value.shape[2], value.shape[1], side, side).transpose(3, 2)
            else:  # depthwise (kv, dim) -> (dim, 1, k, k)
                value = value.permute(1, 0).reshape(value.shape[1], 1, side, side).transpose(3, 2)
            parts[-1] = "weight"
        elif len(parts) >= 2 and parts[-2] in ("ln", "linear"):
            del parts[-2]
        name = ".".join(parts)
        if name.endswith("bias") and value.dim() != 1:
            value = value.reshape(-1)
        dense[name] = value.contiguous()
    return dense


def to_timm_layout(state: dict[str, torch.Tensor], model_name: str, source: Path) -> dict[str, torch.Tensor]:
    """Any accepted layout -> timm's key names and shapes for `model_name`, classifier head dropped."""
    if any(k.startswith("encoder.") for k in state):
        state = fcmae_sparse_to_dense(state)
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        reference = timm.create_model(model_name, pretrained=False)
    try:
        state = checkpoint_filter_fn(state, reference)
    except KeyError as err:
        raise EncoderWeightsError(f"{source}: unexpected encoder key {err} (not a {model_name} checkpoint)") from err
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def _full_name(features_key: str) -> str:
    """features_only module names (`stages_0.blocks...`) -> the full model's (`stages.0.blocks...`)."""
    return re.sub(r"^([a-z]+)_(\d+)\.", r"\1.\2.", features_key)


def load_encoder_weights(backbone: nn.Module, path: Path, model_name: str) -> dict:
    """Fills every tensor of `backbone` (timm features_only) from the file, strictly.

    Returns {"file", "sha256", "tensors"} for the run's log; raises EncoderWeightsError naming the
    missing, unexpected or wrongly shaped keys.
    """
    state = to_timm_layout(read_state_file(path), model_name, path)
    expected = {_full_name(k): (k, v.shape) for k, v in backbone.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k][1]))
    if missing or unexpected or wrong:
        raise EncoderWeightsError(
            f"{path}: encoder weights do not fit {model_name}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {wrong[:5]}"
            + (f" ({len(missing)} missing in all)" if len(missing) > 5 else "")
        )
    backbone.load_state_dict({expected[k][0]: v for k, v in state.items()}, strict=True)
    return {"file": str(path), "sha256": file_sha256(path), "tensors": len(state)}
