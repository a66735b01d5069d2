"""ConvNeXt V2 feature encoder from timm (DESIGN.md §3), with an exact inference fast path."""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.layers import GlobalResponseNormMlp
from timm.models.convnext import ConvNeXtBlock, ConvNeXtStage
from torch import nn

from spd.models.encoder_weights import EncoderWeightsError, load_encoder_weights
from spd.models.onednn import compute_dtype, linear, takes_onednn
from spd.models.precision import keep_fp32, low_precision_weight
from spd.models.rows import product_in


def convnextv2_block_folded(block: ConvNeXtBlock, x: torch.Tensor, fold_grn: bool = True) -> torch.Tensor:
    """timm's `ConvNeXtBlock.forward` (eval mode, GRN MLP, no drop path) with GRN folded into `fc2`.

    GRN is `x + bias + weight * x * n`, with `n` (B, 4C) one number per image and channel, so it is
    `x * s + bias` with `s = 1 + weight * n`, and `fc2(x * s + bias) = x @ (W * s)^T + (W @ bias + b)`:
    the per-image scale goes into a per-image copy of fc2's weight (C x 4C numbers) instead of three
    elementwise passes over the (B, H, W, 4C) activation, the largest tensor of the network (where
    the activation is the smaller one, at fewer positions than channels, it is scaled instead). The
    spatial L2 norm is a sum of squares (several times faster on CPU than `linalg.vector_norm` over
    two non-innermost dims). Under bf16 autocast no activation or weight is cast on its own: values
    are written in the matmul's dtype by the op that makes them (`out=`). Both linears go through `spd.models.onednn.linear` (oneDNN on CPU, with
    fc1's GELU fused: twice MKL's fp32 speed on the AMD CPU measured). Same result up to float
    rounding (tests: <= 1e-5 relative). `fold_grn=False` scales the activation in every block, as the
    fold's other branch does below: fc2 then keeps its constant weight (what int8 quantisers need).

    Shape: x (B, C, H, W) -> (B, C, H, W).
    """
    shortcut = x
    # Channels-last from here on (a free view when x is in channels-last memory, as
    # `Encoder.forward_folded` passes it); `conv_mlp` blocks (the atto model) hold 1x1 convs instead
    # of Linear layers and an NCHW LayerNorm: the same numbers, applied the same way below.
    norm, mlp = block.norm, block.mlp
    x = block.conv_dw(x).permute(0, 2, 3, 1)
    with _low_precision_norm(x):
        x = F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    x = _fc1_and_activation(mlp, x)  # (B, H, W, 4C)
    spatial_norm = _spatial_sum_of_squares(x).sqrt()  # (B, 4C): GRN's ||x||_2 over space
    normalised = spatial_norm / (spatial_norm.mean(-1, keepdim=True) + mlp.grn.eps)
    scale = 1.0 + mlp.grn.weight * normalised  # (B, 4C)
    fc2_weight = mlp.fc2.weight.flatten(1)  # (C, 4C)
    if fold_grn and x.shape[1] * x.shape[2] > fc2_weight.shape[0]:
        x = _fc2_with_grn_folded(x, scale, fc2_weight, mlp)
    else:
        # Fewer positions than output channels (the last stage at NYU sizes): a pass over the
        # activation is cheaper than one over the weight. GRN as one op, written straight in the
        # matmul's dtype (no separate cast), then fc2 with its weight in that dtype.
        dtype = compute_dtype(x)
        grn_scale = scale[:, None, None, :]
        if torch.promote_types(x.dtype, grn_scale.dtype) == dtype:
            grn = torch.addcmul(mlp.grn.bias, x, grn_scale)
        else:
            grn = torch.addcmul(mlp.grn.bias, x, grn_scale, out=x.new_empty(x.shape, dtype=dtype))
        x = linear(grn, low_precision_weight(mlp.fc2, dtype).flatten(1), mlp.fc2.bias, fp32_bias=True)
    x = x.permute(0, 3, 1, 2)
    if block.gamma is not None:
        x = x.mul(block.gamma.reshape(1, -1, 1, 1))
    return x + shortcut


def _fc1_and_activation(mlp: GlobalResponseNormMlp, x: torch.Tensor) -> torch.Tensor:
    """act(fc1(x)). The exact GELU (ConvNeXt V2's) is fused into the matmul on oneDNN, or applied in
    place: no second (B, H, W, 4C) tensor, the largest of the network, to allocate and fault in."""
    weight = mlp.fc1.weight.flatten(1)
    act = mlp.act
    if isinstance(act, (nn.GELU, timm.layers.GELU)) and getattr(act, "approximate", "none") == "none":
        return linear(x, weight, mlp.fc1.bias, gelu=True)
    return act(linear(x, weight, mlp.fc1.bias))


def _spatial_sum_of_squares(x: torch.Tensor, rows_per_slice: int = 4096) -> torch.Tensor:
    """sum over H and W of x^2: (B, H, W, C) -> (B, C), accumulated in fp32.

    In slices of at most 4096 positions: squaring the whole activation at once would allocate a
    second tensor of the network's largest size in every block, which the allocator takes fresh
    from the OS and faults in page by page (measured on the 2-core CPU: encoder fp32 -12 %,
    bf16 -5 % with slices). Each slice's sum is rounded to x's dtype once, then added into an fp32
    total (`add_` converts as it adds: no cast op; `sum(dtype=float32)` measured 1.45x slower on bf16 slices).
    Other devices keep freed memory in PyTorch's caching allocator: one pass there, fewer launches."""
    if torch.compiler.is_exporting():
        # Exported graphs: one MatMul with a row of ones (ONNX Runtime runs it ~4x faster than the
        # slices' Split + Pow + ReduceSum, or one ReduceSum over the middle axis; `spd bench --backend onnx`).
        rows = x.flatten(1, 2)
        ones = torch.ones(rows.shape[0], 1, rows.shape[1], dtype=rows.dtype, device=rows.device)
        return torch.matmul(ones, rows * rows)[:, 0].float()
    if x.device.type != "cpu":
        return (x * x).sum((1, 2), dtype=torch.float32)
    total = x.new_zeros((x.shape[0], x.shape[-1]), dtype=torch.float32)
    for part in x.flatten(1, 2).split(rows_per_slice, dim=1):
        total.add_(part.square().sum(1))
    return total


def _fc2_with_grn_folded(
    x: torch.Tensor, scale: torch.Tensor, fc2_weight: torch.Tensor, mlp: GlobalResponseNormMlp
) -> torch.Tensor:
    """fc2(x * scale + grn.bias) as x @ (W * scale)^T + (W @ grn.bias + b), one scaled copy of W per
    image. x (B, H, W, 4C), scale (B, 4C), fc2_weight W (C, 4C) -> (B, H, W, C)."""
    batch, height, width, hidden = x.shape
    # W * scale in fp32, rounded once into the matmul's dtype by the multiply itself (B, C, 4C).
    weight = product_in(compute_dtype(x), fc2_weight, scale[:, None, :])
    # W @ grn.bias (+ b) with `mv`, which autocast leaves in fp32: `@` would cast W to bf16 first. The
    # bias stays fp32: oneDNN adds it to its fp32 accumulator (F.linear under autocast casts it).
    grn_bias = mlp.grn.bias if mlp.grn.bias.dtype == fc2_weight.dtype else mlp.grn.bias.to(fc2_weight.dtype)
    bias = torch.mv(fc2_weight, grn_bias) if mlp.fc2.bias is None else torch.addmv(mlp.fc2.bias, fc2_weight, grn_bias)
    if batch == 1:
        return linear(x, weight[0], bias, fp32_bias=True)
    if takes_onednn(x):  # oneDNN's linear has one weight: one call per image
        return torch.stack([linear(image, image_weight, bias, fp32_bias=True) for image, image_weight in zip(x, weight)])
    out = torch.baddbmm(bias, x.reshape(batch, height * width, hidden), weight.transpose(1, 2))
    return out.view(batch, height, width, -1)


def _low_precision_norm(x: torch.Tensor):
    """Under autocast, a LayerNorm on the (bf16) depthwise-conv output runs outside autocast: the
    kernel still computes its statistics in fp32 and returns bf16, the values fc1 would receive
    anyway, without autocast's round trip (bf16 -> fp32 copy in, fp32 -> bf16 copy out for fc1:
    two full passes over the activation per block). Same numbers (test)."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.dtype == torch.get_autocast_dtype(device):
        return torch.autocast(device, enabled=False)
    return nullcontext()


def _supports_folding(block: nn.Module) -> bool:
    return (
        isinstance(block, ConvNeXtBlock)
        and isinstance(block.mlp, GlobalResponseNormMlp)
        and isinstance(block.norm, nn.LayerNorm)
        and isinstance(block.shortcut, nn.Identity)
    )


class Encoder(nn.Module):
    """timm ConvNeXt V2 in `features_only` mode: four maps at strides 4/8/16/32.

    Args:
        name: timm model name (``convnextv2_tiny`` for v15, ``convnextv2_atto`` for v15-tiny).
        weights_file: local FCMAE / ImageNet weights for that model (.safetensors, .pt or .pth; timm,
            official ConvNeXt-V2 or FCMAE layout), loaded strictly (`encoder_weights.py`). None builds a
            random encoder and warns: fine for tests and the synthetic demo, never for NYU numbers.
    Shape:
        forward: images (B, 3, H, W) normalised, H and W multiples of 32; `folded` runs the blocks
        through `convnextv2_block_folded` (exact in eval mode; 195 vs 451 ms fp32 at 480x640 on the 2-core CPU), otherwise
        timm's own forward (stochastic depth, checkpointing) ->
        [(B, C1, H/4, W/4), (B, C2, H/8, W/8), (B, C3, H/16, W/16), (B, C4, H/32, W/32)].
    """

    def __init__(self, name: str, weights_file: str | None = None, warn_random: bool = True) -> None:
        super().__init__()
        self.backbone = timm.create_model(name, pretrained=False, features_only=True)
        self.weights_info: dict | None = None  # {"file", "sha256", "tensors"} once loaded from a file
        if weights_file is not None:
            path = Path(weights_file)
            if not path.is_file():
                raise EncoderWeightsError(f"encoder weights file not found: {path}")
            self.weights_info = load_encoder_weights(self.backbone, path, name)
        elif warn_random:
            warnings.warn(
                f"encoder {name} is randomly initialised (no encoder_weights file given): "
                "fine for tests and the synthetic demo; pass FCMAE weights for real training",
                stacklevel=2,
            )
        self.channels: tuple[int, ...] = tuple(self.backbone.feature_info.channels())
        self.strides: tuple[int, ...] = tuple(self.backbone.feature_info.reduction())
        if self.strides != (4, 8, 16, 32):
            raise ValueError(f"encoder {name} must give strides 4/8/16/32; it gives {self.strides}")
        stages = [m for _, m in self.backbone.items() if isinstance(m, ConvNeXtStage)]
        self.foldable = bool(stages) and all(_supports_folding(b) for s in stages for b in s.blocks)
        if self.foldable:  # the fold scales fc2's weight in fp32 per image: a bf16 copy would round it twice
            # (where the fold is not taken, fc2 runs from a low-precision copy of its weight: `low_copy`)
            keep_fp32(*(b.mlp.fc2 for s in stages for b in s.blocks), low_copy=True)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Training memory: timm's per-block checkpointing in every ConvNeXt stage (each block's
        activations recomputed in backward from its input; stochastic depth's RNG state is replayed)."""
        for _, module in self.backbone.items():
            if isinstance(module, ConvNeXtStage):
                module.grad_checkpointing = enable

    def forward(self, images: torch.Tensor, folded: bool = False, fold_grn: bool = True) -> list[torch.Tensor]:
        """`folded` (inference only: the caller decides, see `SPD.inference_paths`) runs the blocks
        through `convnextv2_block_folded` when every block supports it, with GRN folded into fc2 when
        `fold_grn`."""
        return self.forward_folded(images, fold_grn) if folded and self.foldable else self.backbone(images)

    def forward_folded(self, images: torch.Tensor, fold_grn: bool = True) -> list[torch.Tensor]:
        """The same features as `self.backbone(images)` in eval mode, blocks run folded, in
        channels-last memory (the features come out channels-last): every block then permutes to
        and from its (B, H, W, C) MLP layout for free, and oneDNN's channels-last depthwise
        convolutions are faster."""
        features, x = [], images.contiguous(memory_format=torch.channels_last)
        for name, module in self.backbone.items():
            if isinstance(module, ConvNeXtStage):
                x = module.downsample(x)
                for block in module.blocks:
                    x = convnextv2_block_folded(block, x, fold_grn)
            else:
                x = module(x)
            if name in self.backbone.return_layers:
                features.append(x)
        return features
