"""SPD: metric depth at the K pixels you ask for, from one RGB image.

    import spd
    model = spd.build_model("v15")
    depth = model(images, queries)          # (B, 3, H, W), (B, K, 2) pixel (u, v) -> (B, K) metres
"""

from spd.config import ModelConfig, preset_config
from spd.models import SPD, EncodedFeatures
from spd.build import build_model

__all__ = ["ModelConfig", "preset_config", "SPD", "EncodedFeatures", "build_model"]
__version__ = "0.1.0"
