"""Configuration: the model presets (`model`), the training config with its YAML recipes and
`--set` overrides (`training`, recipes in `recipes/`), and the checks both run when loaded (`checks`)."""

from spd.config.model import ModelConfig, preset_config
from spd.config.training import TrainConfig, load_config

__all__ = ["ModelConfig", "preset_config", "TrainConfig", "load_config"]
