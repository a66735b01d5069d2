"""Which exact inference fast paths a call takes: decided once, in `SPD.inference_paths`, and passed
down explicitly (DESIGN.md §6). Never chosen by mutating a live config."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InferencePaths:
    """Each fast path on (True) or its plain reference (False). All are exact rewrites (tests hold
    fast == reference) that need inference: no autograd, eval mode.

    encoder: ConvNeXt V2 blocks through `convnextv2_block_folded` (channels-last, fused GELU, GRN's
        sum of squares in slices), with GRN folded into fc2 when `grn_fold`.
    grn_fold: GRN folded into a per-image copy of fc2's weight (fastest in PyTorch and fp32 ONNX);
        False applies GRN to the activation and keeps fc2's constant weight, which an int8 export needs
        (its quantiser takes constant weights only: `spd export --int8`). Same numbers either way.
    decoder: gathers instead of `grid_sample` for MSDA, seed and canvas reads; in-place canvas.
    ldrm: LDRM's `local_feat` from its receptive field only (not the full 28x28 patch).
    """

    encoder: bool = True
    decoder: bool = True
    ldrm: bool = True
    grn_fold: bool = True

    @classmethod
    def reference(cls) -> "InferencePaths":
        """Every plain reference path: what training runs, and the baseline of every fast-path test."""
        return cls(encoder=False, decoder=False, ldrm=False)

    @property
    def any(self) -> bool:
        return self.encoder or self.decoder or self.ldrm
