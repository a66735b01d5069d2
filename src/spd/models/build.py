"""Model construction from a preset name or a config."""

from __future__ import annotations

from typing import Any

from spd.config.model import ModelConfig, preset_config
from spd.models.spd import SPD


def build_model(preset: str | ModelConfig = "v15", warn_random_encoder: bool = True, **overrides: Any) -> SPD:
    """Builds an SPD model: `build_model("v15")`, `build_model("v15-tiny", use_ldrm=False)`.

    The encoder starts from `encoder_weights` (a local FCMAE file) when the config names one,
    else from random weights with a warning.
    """
    if isinstance(preset, ModelConfig):
        config = ModelConfig.from_dict({**preset.to_dict(), **overrides})
    else:
        config = preset_config(preset, **overrides)
    return SPD(config, warn_random_encoder=warn_random_encoder)
