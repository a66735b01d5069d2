"""SPD: metric depth at the K pixels you ask for, from one RGB image.

    import spd
    model = spd.build_model("v15")
    depth = model(images, queries)          # (B, 3, H, W), (B, K, 2) pixel (u, v) -> (B, K) metres

    p = spd.Predictor.from_pretrained("path/to/model_folder")
    depth_m = p.predict("image.jpg", [[320, 240]])
"""

from spd.allocator import tune_cpu_allocator
from spd.models.build import build_model
from spd.config.model import ModelConfig, preset_config
from spd.models.folder import CheckpointError
from spd.models.spd import load_model, save_model
from spd.models import SPD, EncodedFeatures
from spd.models.paths import InferencePaths
from spd.predictor import Predictor

__all__ = [
    "ModelConfig", "preset_config", "SPD", "EncodedFeatures", "build_model", "load_model", "save_model",
    "CheckpointError", "Predictor", "InferencePaths", "OnnxPredictor", "tune_cpu_allocator",
]


def __getattr__(name: str):
    if name == "OnnxPredictor":  # ONNX Runtime is an optional extra: imported on first use only
        from spd.export.runtime import OnnxPredictor

        return OnnxPredictor
    raise AttributeError(f"module 'spd' has no attribute {name!r}")
__version__ = "0.1.0"
