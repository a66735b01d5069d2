"""Model configuration: one dataclass, named presets, dict/JSON round-trip.

Every architectural number of DESIGN.md §3 lives here as a field with a short *why*; modules take
explicit keyword arguments and only `spd.models.build_model` reads this config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from spd.config.checks import Rule, check_config, non_negative, optional, positive
from spd.errors import ConfigError

PresetName = Literal["v15", "v14", "v15-tiny"]


@dataclass
class ModelConfig:
    # --- encoder -----------------------------------------------------------------------------
    encoder_name: str = "convnextv2_tiny"  # timm name; features_only, strides 4/8/16/32
    encoder_weights: str | None = None  # local FCMAE weights file (.safetensors/.pth); None = random init
    # --- decoder width -----------------------------------------------------------------------
    d_model: int = 192  # query width d; L1/L2 are projected to it, so identity V maps fit the heads
    n_heads: int = 6  # 6 heads of 32 channels
    n_points: int = 4  # MSDA sampling points per head per level
    ffn_dim: int = 768  # FFN hidden width (4d)
    n_msda_layers: int = 3  # local/deformable layers first ...
    n_global_layers: int = 2  # ... then B3b global cross-attention to all L4 tokens
    fourier_freqs: int = 8  # 2^0..2^7 -> 8 * 2 (sin, cos) * 2 (x, y) = 32-d positional code
    # --- LDRM (local DPT-style refinement) -----------------------------------------------------
    use_ldrm: bool = True  # ablation "v15 - LDRM": the head sees h only
    ldrm_patch: int = 7  # L1 cells per side (7 -> 28x28 px); odd and >= 5 (see ldrm.py)
    ldrm_mid_dim: int = 96  # channels after the first x2 upsample
    ldrm_out_dim: int = 32  # channels of feat_28 / local_feat
    ldrm_fast: bool = True  # inference computes only local_feat's receptive field (exact, DESIGN §6)
    # --- depth head --------------------------------------------------------------------------
    head_hidden: int = 384  # MLP 224 -> 384 -> 1
    head_init_depth: float = 2.5  # metres; last bias = ln(2.5) so training starts near a room's depth
    # --- training-only heads -----------------------------------------------------------------
    canvas_head_dim: int = 64  # canvas L2 -> x2 -> Conv3x3(d->64) -> Conv1x1(64->1)
    # --- camera (DESIGN §9, spd/camera.py) -----------------------------------------------------
    canonical_focal: float = 518.8579  # px: the model predicts depth as seen with this fx (NYU's)
    # Pixel scale (spd/cameras/scale.py): long side of the frames the model was trained at; every
    # image is resized to it before the model. `spd train` writes it; None = unknown, read as 640.
    image_long_side: int | None = None
    # Provenance (spd/data/provenance.py): the sets `spd train` fed the model, each {kind, frames, size,
    # source}; None = unknown (saved before the field existed, or built in Python)
    trained_on: list[dict] | None = None
    # --- ablation flags (DESIGN §8, the plan's §10.5) ------------------------------------------
    l3_dim: int | None = None  # None = native (384); 256 = project L3 in the neck ("L3 at 256")
    global_projection: bool = False  # v14-style: L3/L4 projected to d in the neck, identity V maps
    q2q_self_attn: bool = False  # v14-style query-to-query self-attention sublayer
    l4_self_attn_layers: int = 0  # v14-style self-attention layers over L4 tokens (v14 used 2)
    # --- speed knobs (exact; never change the result beyond float rounding) -------------------
    value_proj_order: Literal["auto", "project_first", "sample_first"] = "auto"  # L3/L4 MSDA values
    encoder_fast: bool = True  # eval-mode encoder with GRN folded into fc2 (exact, encoder.py)
    decoder_fast: bool = True  # inference: gathers instead of grid_sample, in-place canvas (exact)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown model config keys: {unknown}; known keys: {sorted(names)}")
        return cls(**data)

    RULES: ClassVar[dict[str, Rule]] = {
        name: (positive, "> 0") for name in (
            "d_model", "n_heads", "n_points", "ffn_dim", "fourier_freqs", "ldrm_mid_dim", "ldrm_out_dim", "head_hidden",
            "head_init_depth", "canvas_head_dim", "canonical_focal",
        )
    } | {"n_msda_layers": (non_negative, ">= 0"), "n_global_layers": (non_negative, ">= 0"),
         "l4_self_attn_layers": (non_negative, ">= 0"), "l3_dim": (optional(positive), "null or > 0"),
         "image_long_side": (optional(positive), "null or > 0")}

    def __post_init__(self) -> None:
        check_config(self, "model.")
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        check_ldrm_patch(self.ldrm_patch)


def check_ldrm_patch(patch: int) -> None:
    """LDRM patches are odd (centred on the query's cell) and >= 5 (the fast path reads 2 cells each side)."""
    if patch < 5 or patch % 2 == 0:
        raise ConfigError(f"ldrm_patch must be odd and >= 5 (the fast path needs 2 cells each side), got {patch}")


PRESETS: dict[str, dict[str, Any]] = {
    # The plan's v15 (DESIGN.md §3).
    "v15": dict(),
    # The plan's v14 column (its §2.1, §9; DESIGN.md §11): Q2Q self-attention in every decoder layer,
    # 2 L4 self-attention layers, L3/L4 projected to d in the neck with identity value maps, no LDRM
    # (the canvas L2 dense head trains it, as every preset).
    "v14": dict(global_projection=True, q2q_self_attn=True, l4_self_attn_layers=2, use_ldrm=False),
    # Same code, small widths and the atto encoder: CPU tests and the synthetic demo.
    "v15-tiny": dict(
        encoder_name="convnextv2_atto",
        d_model=64,
        n_heads=2,
        ffn_dim=256,
        ldrm_mid_dim=32,
        ldrm_out_dim=16,
        head_hidden=128,
        canvas_head_dim=32,
    ),
}


def preset_config(name: str, **overrides: Any) -> ModelConfig:
    """Returns the named preset with `overrides` applied (e.g. ``use_ldrm=False``)."""
    key = name.replace("_", "-")
    if key not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[key], **overrides})


__all__ = ["ModelConfig", "PRESETS", "preset_config", "PresetName"]
