"""ConvNeXt V2 feature encoder from timm (DESIGN.md §3)."""

from __future__ import annotations

import warnings
from pathlib import Path

import timm
import torch
from torch import nn


class Encoder(nn.Module):
    """timm ConvNeXt V2 in `features_only` mode: four maps at strides 4/8/16/32.

    Args:
        name: timm model name (``convnextv2_tiny`` for v15, ``convnextv2_atto`` for v15-tiny).
        weights_file: local FCMAE / ImageNet weights for that timm model (.safetensors or .pth,
            read by timm without unpickling code). None builds a random encoder and warns: a
            random encoder is fine for tests and the synthetic demo, never for NYU numbers.

    Shape:
        forward: images (B, 3, H, W) normalised, H and W multiples of 32 ->
        [(B, C1, H/4, W/4), (B, C2, H/8, W/8), (B, C3, H/16, W/16), (B, C4, H/32, W/32)].
    """

    def __init__(self, name: str, weights_file: str | None = None, warn_random: bool = True) -> None:
        super().__init__()
        if weights_file is not None:
            path = Path(weights_file)
            if not path.is_file():
                raise FileNotFoundError(f"encoder weights file not found: {path}")
            self.backbone = timm.create_model(
                name, pretrained=True, features_only=True, pretrained_cfg_overlay=dict(file=str(path))
            )
        else:
            if warn_random:
                warnings.warn(
                    f"encoder {name} is randomly initialised (no encoder_weights file given): "
                    "fine for tests and the synthetic demo; pass FCMAE weights for real training",
                    stacklevel=2,
                )
            self.backbone = timm.create_model(name, pretrained=False, features_only=True)
        self.channels: tuple[int, ...] = tuple(self.backbone.feature_info.channels())
        self.strides: tuple[int, ...] = tuple(self.backbone.feature_info.reduction())
        if self.strides != (4, 8, 16, 32):
            raise ValueError(f"encoder {name} must give strides 4/8/16/32; it gives {self.strides}")

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone(images)
