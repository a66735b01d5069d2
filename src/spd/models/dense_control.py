"""The dense control (DESIGN.md §11): SPD's encoder and neck with a DPT-style dense head instead of
the query decoder. It answers "sparse decoder vs dense head on one encoder, same data, same budget",
which DAv2-S (another encoder) cannot.

The head is DPT's (Ranftl et al. 2021, as Depth Anything uses it): each neck level to one width by a
3x3 convolution, then fuse-and-upsample from L4 (stride 32) to L1 (stride 4), each fusion a residual
conv unit on the skip, one on the sum, x2 upsampling and a 1x1 convolution; then to full resolution
with 3x3 convolutions. Its width is the config's `canvas_head_dim` (the width of SPD's own training
dense head; 64 at v15, DAv2-S's fusion width). Depth = exp of the output, as SPD's head. Queries read
the full-resolution map bilinearly with the project's pixel convention (DESIGN.md §2), as for DAv2-S,
behind the same `encode` / `decode` interface, so training, `spd eval`, `Predictor` and the ablation
runner treat it as any other model.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from spd.config.model import ModelConfig
from spd.geometry.coords import pad_image
from spd.models.baseline import DenseDepth, sample_dense_map
from spd.models.encoder import Encoder
from spd.models.folder import (
    CheckpointError, build_with_weights, read_config_dict, resolve_model_folder, verify_weights_checksum,
    write_model_folder,
)
from spd.models.heads import exp_fp32
from spd.models.neck import Neck
from spd.models.optim_groups import encoder_decoder_param_groups

MODEL_TYPE = "spd-dense-control"  # config.json's model_type of a dense-control folder


class ResidualConvUnit(nn.Module):
    """DPT's residual unit: x + Conv3x3(ReLU(Conv3x3(ReLU(x)))). (B, C, h, w) -> same."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """DPT's fusion: (coarser path + unit(skip)) -> unit -> x2 bilinear -> Conv1x1.

    Shape:
        forward: path (B, C, h, w), skip (B, C, h, w) or None -> (B, C, 2h, 2w).
    """

    def __init__(self, dim: int, has_skip: bool = True) -> None:
        super().__init__()
        self.skip_unit = ResidualConvUnit(dim) if has_skip else None
        self.unit = ResidualConvUnit(dim)
        self.out = nn.Conv2d(dim, dim, kernel_size=1)

    def forward(self, path: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            path = path + self.skip_unit(skip)
        up = F.interpolate(self.unit(path), scale_factor=2, mode="bilinear", align_corners=False)
        return self.out(up)


class DenseHead(nn.Module):
    """Four neck levels -> log-depth at full (padded) resolution.

    Shape:
        forward: levels [(B, C_l, H/s, W/s) for s = 4, 8, 16, 32], H and W multiples of 32
        -> (B, 1, H, W) log-metres.
    """

    def __init__(self, level_dims: tuple[int, ...], dim: int, init_depth: float) -> None:
        super().__init__()
        self.level_convs = nn.ModuleList(nn.Conv2d(c, dim, kernel_size=3, padding=1, bias=False) for c in level_dims)
        self.fusions = nn.ModuleList([FusionBlock(dim, has_skip=False), *(FusionBlock(dim) for _ in level_dims[1:])])
        half = max(1, dim // 2)
        self.to_full = nn.Sequential(  # stride 2 -> 1, as DPT's head
            nn.Conv2d(dim, half, kernel_size=3, padding=1), nn.Upsample(scale_factor=2, mode="bilinear"),
            nn.Conv2d(half, 32, kernel_size=3, padding=1), nn.ReLU(), nn.Conv2d(32, 1, kernel_size=1),
        )
        nn.init.constant_(self.to_full[-1].bias, math.log(init_depth))  # an untrained model predicts a room's depth

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        maps = [conv(level) for conv, level in zip(self.level_convs, levels)]
        path = self.fusions[0](maps[3])  # L4 -> stride 16
        for fusion, skip in zip(self.fusions[1:], reversed(maps[:3])):  # + L3 -> 8, + L2 -> 4, + L1 -> 2
            path = fusion(path, skip)
        return self.to_full(path)


class DenseControl(nn.Module):
    """SPD's encoder + neck + a DPT-style dense head (DESIGN.md §11).

    Args:
        config: the same `ModelConfig` as the SPD it is compared with; the encoder, neck widths,
            `canvas_head_dim` (head width), `head_init_depth`, camera and pixel scale are read from it.

    Shape:
        encode: images (B, 3, H, W) ImageNet-normalised -> DenseDepth (B, 1, H, W) metres.
        decode: queries (B, K, 2) pixel (u, v) -> (B, K) metres (bilinear samples of the map).
    """

    def __init__(self, config: ModelConfig, warn_random_encoder: bool = True) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.encoder_name, config.encoder_weights, warn_random=warn_random_encoder)
        self.neck = Neck(self.encoder.channels, config.d_model, config.l3_dim, config.global_projection)
        self.head = DenseHead(self.neck.out_dims, config.canvas_head_dim, config.head_init_depth)

    @property
    def canonical_focal(self) -> float:
        return self.config.canonical_focal

    def set_activation_checkpointing(self, parts: list[str] | tuple[str, ...]) -> None:
        """As `SPD.set_activation_checkpointing`: only "encoder" applies (there is no LDRM)."""
        unknown = set(parts) - {"encoder"}
        if unknown:
            raise ValueError(f"the dense control checkpoints ['encoder'], not {sorted(unknown)}")
        self.encoder.set_grad_checkpointing("encoder" in parts)

    def encode(self, images: torch.Tensor, paths=None) -> DenseDepth:
        """The dense map at the input size. `paths` is accepted for interface parity with SPD; the
        folded encoder (exact, `spd.models.encoder`) runs in inference as SPD's does."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W); got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        folded = self.config.encoder_fast and not self.training and not torch.is_grad_enabled()
        log_depth = self.head(self.neck(self.encoder(pad_image(images), folded=folded)))
        return DenseDepth(exp_fp32(log_depth[..., :height, :width]), (height, width))  # padding is bottom/right

    def decode(self, features: DenseDepth, queries: torch.Tensor, mask: torch.Tensor | None = None,
               check_values: bool = True) -> torch.Tensor:
        return sample_dense_map(features, queries, mask, check_values)

    def forward(self, images: torch.Tensor, queries: torch.Tensor, mask: torch.Tensor | None = None,
                return_aux: bool = False, check_values: bool = True):
        """depth (B, K), or with `return_aux` {"depth", "dense_depth" (B, 1, H, W)} for the dense loss."""
        features = self.encode(images)
        depth = self.decode(features, queries, mask, check_values)
        return {"depth": depth, "dense_depth": features.depth} if return_aux else depth

    def param_groups(self, lr: float, encoder_lr_scale: float = 0.1, weight_decay: float = 0.01) -> list[dict]:
        """As SPD's: the encoder at `encoder_lr_scale` x LR, neck and head at LR."""
        return encoder_decoder_param_groups(self, self.encoder, lr, encoder_lr_scale, weight_decay)


def save_dense_control(model: DenseControl, folder: str | Path) -> Path:
    """`config.json` (model_type spd-dense-control + the ModelConfig) + `model.safetensors`, atomically."""
    config = model.config.to_dict()
    config["encoder_weights"] = None  # the weights now live in model.safetensors
    return write_model_folder(folder, model.state_dict(), config, MODEL_TYPE)


def is_dense_control_folder(path: str | Path) -> bool:
    """True for a local folder whose config.json says it holds a dense control."""
    folder = Path(path)
    try:
        return folder.is_dir() and read_config_dict(folder).get("model_type") == MODEL_TYPE
    except CheckpointError:
        return False


def load_dense_control(path: str | Path, device: str | torch.device = "cpu") -> DenseControl:
    """A dense-control folder in eval mode; strict and checksum-verified like `spd.load_model`."""
    folder = resolve_model_folder(path)
    data = read_config_dict(folder)
    verify_weights_checksum(folder, data)
    if data.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"{folder}: holds a {data.get('model_type')!r} model, not a dense control")
    fields = {k: v for k, v in data.items() if k not in ("model_type", "weights_sha256")}
    try:
        config = ModelConfig.from_dict({**fields, "encoder_weights": None})
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{folder}: not a dense-control config ({err})") from err
    return build_with_weights(lambda: DenseControl(config, warn_random_encoder=False), folder, device)
