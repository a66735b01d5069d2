"""Depth Anything V2-Small (ViT-S/14 + DPT, metric head, 10 m) as a query-answering baseline (DESIGN.md §8).

Built with transformers' `DepthAnythingForDepthEstimation`: random init, or official weights from a
local Hugging Face folder (e.g. a download of depth-anything/Depth-Anything-V2-Metric-Indoor-Small-hf).
It decodes the whole dense map and answers queries by bilinear sampling of it, behind the same
`encode` / `decode` interface as SPD, so `spd eval`, `Predictor` and `spd bench` treat both alike.

Input size: "fair" resizes, aspect kept, to the nearest multiples of 14 with about the same pixel
count (480x640 -> 476x644), the comparison the benchmark makes; "official" resizes the short side
to 518 (480x640 -> 518x686) as Depth Anything's own pre-processing does. The map is resized back to
the input size before sampling.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from spd.cameras.nyu import NYU_FOCAL
from spd.geometry.coords import pixel_to_grid
from spd.geometry.validation import validate_queries
from spd.models.onednn import OneDNNLinears, takes_onednn
from spd.models.splat import sample_at
from spd.models.optim_groups import encoder_decoder_param_groups

InputMode = Literal["fair", "official"]
PATCH = 14


def _dav2_small_config(max_depth: int):
    from transformers import DepthAnythingConfig, Dinov2Config

    backbone = Dinov2Config(
        hidden_size=384, num_attention_heads=6, num_hidden_layers=12, image_size=518, patch_size=PATCH,
        out_indices=[3, 6, 9, 12], out_features=["stage3", "stage6", "stage9", "stage12"], reshape_hidden_states=False,
    )
    return DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=384, neck_hidden_sizes=[48, 96, 192, 384],
        fusion_hidden_size=64, head_hidden_size=32, reassemble_factors=[4, 2, 1, 0.5], patch_size=PATCH,
        depth_estimation_type="metric", max_depth=int(max_depth),  # transformers 5 types it as int
    )


def baseline_input_size(height: int, width: int, mode: InputMode = "fair") -> tuple[int, int]:
    """The network's input size for an H x W image (multiples of 14, aspect kept)."""
    if mode == "fair":
        return max(PATCH, round(height / PATCH) * PATCH), max(PATCH, round(width / PATCH) * PATCH)
    scale = 518 / min(height, width)
    sides = []
    for side in (height, width):
        target = round(side * scale / PATCH) * PATCH
        sides.append(target if target >= 518 else -(-int(side * scale) // PATCH) * PATCH)
    return sides[0], sides[1]


@dataclass
class DenseDepth:
    """The baseline's 'features': its dense depth map (B, 1, H, W) in metres at the input size."""

    depth: torch.Tensor
    image_size: tuple[int, int]

    @property
    def batch_size(self) -> int:
        return self.depth.shape[0]


def sample_dense_map(
    features: DenseDepth, queries: torch.Tensor, mask: torch.Tensor | None = None, check_values: bool = True
) -> torch.Tensor:
    """Depth (B, K) metres at pixel queries (B, K, 2), bilinear on the map with the project's pixel
    convention (DESIGN.md §2); padded queries (mask False) are 0. Every dense model's `decode`."""
    mask = validate_queries(queries, features.image_size, mask, features.batch_size, check_values)
    if queries.shape[1] == 0:
        return queries.new_zeros(queries.shape[0], 0)
    queries = torch.where(mask.unsqueeze(-1), queries, torch.zeros_like(queries))
    grid = pixel_to_grid(queries, features.image_size)
    return sample_at(features.depth, grid)[..., 0] * mask


class DepthAnythingBaseline(nn.Module):
    """Shape:
        encode: images (B, 3, H, W) ImageNet-normalised -> DenseDepth (B, 1, H, W) metres.
        decode: queries (B, K, 2) pixel (u, v) -> (B, K) metres (bilinear samples of the map).
    """

    canonical_focal = NYU_FOCAL  # px: trained on NYU's camera (spd.camera)

    def __init__(self, weights_dir: str | Path | None = None, input_mode: InputMode = "fair", max_depth: int = 10):
        super().__init__()
        from transformers import DepthAnythingForDepthEstimation

        if weights_dir is not None:
            if not Path(weights_dir).is_dir():
                raise FileNotFoundError(f"baseline weights folder not found: {weights_dir}")
            with _quiet_transformers():
                self.net = DepthAnythingForDepthEstimation.from_pretrained(str(weights_dir), local_files_only=True)
        else:
            self.net = DepthAnythingForDepthEstimation(_dav2_small_config(max_depth))
        self.input_mode = input_mode
        self._freeze_unused_parameters()

    def _freeze_unused_parameters(self) -> None:
        """transformers builds two parts the forward never uses: DINOv2's mask token (masked
        pre-training only) and the first DPT fusion layer's residual unit (it has no coarser input).
        They are frozen so that DistributedDataParallel does not wait for gradients that never come
        (a test checks that every trainable parameter gets one)."""
        embeddings = getattr(self.net.backbone, "embeddings", None)
        if getattr(embeddings, "mask_token", None) is not None:
            embeddings.mask_token.requires_grad_(False)
        fusion = getattr(getattr(self.net, "neck", None), "fusion_stage", None)
        if fusion is not None and hasattr(fusion.layers[0], "residual_layer1"):
            fusion.layers[0].residual_layer1.requires_grad_(False)

    def encode(self, images: torch.Tensor, fast_linears: bool = True) -> DenseDepth:
        """`fast_linears` (inference on CPU only, see `spd.models.onednn`) runs the network's linear
        layers through oneDNN, as SPD's encoder runs its own: same numbers, the same GEMM kernels in
        both models of a comparison; False is the plain transformers forward."""
        height, width = images.shape[-2:]
        size = baseline_input_size(height, width, self.input_mode)
        resized = F.interpolate(images, size=size, mode="bilinear", align_corners=False) if size != (height, width) else images
        with OneDNNLinears() if fast_linears and takes_onednn(resized) else nullcontext():
            depth = self.net(pixel_values=resized).predicted_depth.unsqueeze(1)  # (B, 1, h, w)
        if depth.shape[-2:] != (height, width):
            depth = F.interpolate(depth, size=(height, width), mode="bilinear", align_corners=False)
        return DenseDepth(depth, (height, width))

    def decode(
        self, features: DenseDepth, queries: torch.Tensor, mask: torch.Tensor | None = None, check_values: bool = True
    ) -> torch.Tensor:
        return sample_dense_map(features, queries, mask, check_values)

    def forward(
        self, images: torch.Tensor, queries: torch.Tensor, mask: torch.Tensor | None = None, return_aux: bool = False,
        check_values: bool = True,
    ):
        """depth (B, K), or with `return_aux` {"depth", "dense_depth" (B, 1, H, W)} for the dense loss."""
        features = self.encode(images)
        depth = self.decode(features, queries, mask, check_values)
        return {"depth": depth, "dense_depth": features.depth} if return_aux else depth

    def param_groups(self, lr: float, encoder_lr_scale: float = 0.1, weight_decay: float = 0.01) -> list[dict]:
        """AdamW groups as `SPD.param_groups`: the DINOv2 backbone at `encoder_lr_scale` x LR (Depth
        Anything's metric fine-tuning uses 1/10), the DPT neck and head at LR."""
        return encoder_decoder_param_groups(self, self.net.backbone, lr, encoder_lr_scale, weight_decay)

    def save_pretrained(self, folder: str | Path) -> Path:
        """A Hugging Face model folder (config.json + model.safetensors) that `load_baseline` and
        `DepthAnythingForDepthEstimation.from_pretrained` read."""
        with _quiet_transformers():
            self.net.save_pretrained(str(folder))
        return Path(folder)

    def load_weights(self, folder: str | Path) -> None:
        """Loads the weights of a folder written by `save_pretrained` (strict; safetensors, read by
        transformers, which also maps its on-disk key names back to the module's)."""
        with _quiet_transformers():
            loaded = type(self.net).from_pretrained(str(folder), local_files_only=True)
        self.net.load_state_dict(loaded.state_dict(), strict=True)


@contextmanager
def _quiet_transformers():
    """No per-file progress bars from transformers while checkpoints are written and read."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_baseline(spec: str, device: str | torch.device = "cpu", input_mode: InputMode = "fair") -> DepthAnythingBaseline:
    """`random` for a randomly initialised DAv2-S, else a local Hugging Face model folder (refused,
    with a CheckpointError, unless its config.json is a Depth Anything one)."""
    if spec != "random":
        from spd.models.folder import CheckpointError, read_config_dict

        folder = Path(spec)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: baseline model folder not found")
        model_type = read_config_dict(folder).get("model_type")
        if model_type != "depth_anything":
            raise CheckpointError(f"{folder}: holds a {model_type!r} model, not Depth Anything (drop 'baseline:' for SPD)")
    model = DepthAnythingBaseline(None if spec == "random" else spec, input_mode)
    return model.to(device).eval()
