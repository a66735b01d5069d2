"""Teachers: anything that maps RGB images to depth maps at the images' own size (DESIGN.md §12).

Every teacher answers `predict(images)`: a list of same-size (H, W, 3) uint8 RGB arrays in, one
(H, W) float32 map per image out, in the teacher's `space`:

- "metric": metres for the image's own camera (labels as they are);
- "disparity": affine-invariant inverse depth (MiDaS, DPT, Depth Anything's relative models):
  usable only after a per-image scale and shift are fitted to metric points (`spd.distill.align`).

Kinds (`load_teacher`):
- a `transformers` depth-estimation folder (`config.json` + weights + `preprocessor_config.json`),
  run with `AutoModelForDepthEstimation` / `AutoImageProcessor` and brought to the image's size by
  the processor's own `post_process_depth_estimation`;
- an SPD model folder (v15, the dense control) or the DAv2-S baseline (`baseline:FOLDER`, or a
  Depth Anything folder without a processor config, as `spd train` saves the baseline): the
  project's `Predictor` at every pixel centre of the image (SPD decodes them in chunks of its
  training K, as the dense evaluation protocol does).
"""

from __future__ import annotations

import hashlib
import inspect
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from spd.errors import UserInputError
from spd.models.folder import CONFIG_FILE, CheckpointError, file_sha256, read_config_dict

Space = Literal["metric", "disparity"]
PROCESSOR_FILE = "preprocessor_config.json"
# transformers depth models whose config does not say `depth_estimation_type`, by what they predict.
METRIC_MODEL_TYPES = {"zoedepth", "glpn", "depth_pro"}
DISPARITY_MODEL_TYPES = {"dpt"}  # MiDaS-style relative inverse depth
SPD_MODEL_TYPES = {"spd", "spd-dense-control"}


@dataclass
class TeacherInfo:
    """What the manifest records of a teacher: enough to tell two teachers apart and to find it again."""

    path: str
    kind: str  # "transformers:<model_type>", "spd:<model_type>", "spd-baseline:depth_anything"
    space: Space
    config_sha256: str
    weights_sha256: str | None = None
    details: dict = field(default_factory=dict)

    def identity(self) -> dict:
        return {"kind": self.kind, "space": self.space, "config_sha256": self.config_sha256,
                "weights_sha256": self.weights_sha256}


def _weights_sha256(folder: Path) -> str | None:
    """SHA-256 of the folder's single weights file (safetensors preferred), None for sharded weights."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return file_sha256(folder / name)
    return None


def _sha256_text(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class TransformersTeacher:
    """A Hugging Face depth-estimation folder. `space` from its config (`depth_estimation_type`, or
    the model type's known output), overridable by the caller for models that do not say."""

    def __init__(self, folder: Path, device: torch.device, dtype: str, space: Space | None = None) -> None:
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation
        from transformers.utils import logging as hf_logging

        config = read_config_dict(folder)
        model_type = config.get("model_type")
        if not (folder / PROCESSOR_FILE).is_file():
            raise CheckpointError(f"--teacher {folder}: no {PROCESSOR_FILE} (a transformers depth model folder holds "
                                  "the image processor's settings beside config.json; save it with "
                                  "processor.save_pretrained)")
        hf_logging.disable_progress_bar()
        try:
            self.model = AutoModelForDepthEstimation.from_pretrained(str(folder), local_files_only=True)
            self.processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
        except (ValueError, KeyError, OSError) as err:
            raise CheckpointError(f"--teacher {folder}: not a transformers depth-estimation model "
                                  f"(model_type {model_type!r}: {' '.join(str(err).split())[:160]})") from None
        self.model.to(device).eval()
        self.device, self.dtype = device, dtype
        self.space = space or self._space_of(config, folder)
        self.info = TeacherInfo(str(folder), f"transformers:{model_type}", self.space, _sha256_text(folder / CONFIG_FILE),
                                _weights_sha256(folder), {"processor": type(self.processor).__name__})
        accepted = inspect.signature(self.processor.post_process_depth_estimation).parameters
        self._takes_source_sizes = "source_sizes" in accepted  # ZoeDepth removes its padding with them

    @staticmethod
    def _space_of(config: dict, folder: Path) -> Space:
        kind = config.get("depth_estimation_type")
        model_type = config.get("model_type")
        if kind == "metric" or (kind is None and model_type in METRIC_MODEL_TYPES):
            return "metric"
        if kind == "relative" or (kind is None and model_type in DISPARITY_MODEL_TYPES):
            return "disparity"
        raise UserInputError(f"--teacher {folder}: cannot tell whether model_type {model_type!r} predicts metric depth "
                             "or relative inverse depth; say which with --teacher-space metric|disparity")

    @torch.inference_mode()
    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        sizes = [image.shape[:2] for image in images]
        inputs = self.processor(images=list(images), return_tensors="pt").to(self.device)
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.dtype == "bf16" else nullcontext())
        with autocast:
            outputs = self.model(**inputs)
        outputs.predicted_depth = outputs.predicted_depth.float()
        extra = {"source_sizes": sizes} if self._takes_source_sizes else {}
        results = self.processor.post_process_depth_estimation(outputs, target_sizes=sizes, **extra)
        return [result["predicted_depth"].float().cpu().numpy().reshape(size) for result, size in zip(results, sizes)]


class PredictorTeacher:
    """An SPD model folder, a dense control or the DAv2-S baseline, through `spd.Predictor` at every
    pixel centre of the image (metres for the image's camera as the model sees it: no intrinsics,
    so the model's canonical camera is assumed, as `spd predict` without --intrinsics does)."""

    space: Space = "metric"

    def __init__(self, spec: str, device: torch.device, dtype: str) -> None:
        from spd.cli.models import load_any_model
        from spd.predictor import Predictor

        model = load_any_model(spec, str(device))
        self.predictor = Predictor(model, device, dtype=dtype)
        folder = Path(spec.split(":", 1)[1] if spec.startswith("baseline:") else spec)
        model_type = read_config_dict(folder).get("model_type")
        kind = f"spd-baseline:{model_type}" if spec.startswith("baseline:") else f"spd:{model_type}"
        self.info = TeacherInfo(str(folder), kind, "metric", _sha256_text(folder / CONFIG_FILE), _weights_sha256(folder))

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        maps = []
        for image in images:
            height, width = image.shape[:2]
            v, u = np.mgrid[0:height, 0:width]
            points = np.stack([u.ravel(), v.ravel()], -1).astype(np.float32)
            maps.append(self.predictor.predict(image, points).reshape(height, width))
        return maps


def load_teacher(spec: str, device: str = "cpu", dtype: str = "fp32", space: Space | None = None):
    """The teacher `spec` names: `baseline:FOLDER`, an SPD / dense-control folder, or a transformers
    depth-estimation folder. One-line errors (CheckpointError / UserInputError) for anything else."""
    if dtype not in ("fp32", "bf16"):
        raise UserInputError(f"--dtype must be fp32 or bf16, got {dtype!r}")
    torch_device = torch.device(device)
    if spec.startswith("baseline:"):
        if space not in (None, "metric"):
            raise UserInputError("--teacher-space: SPD and baseline teachers predict metric depth")
        return PredictorTeacher(spec, torch_device, dtype)
    folder = Path(spec)
    if not folder.is_dir():
        raise CheckpointError(f"--teacher {spec}: {'a file' if folder.is_file() else 'not found'}, not a model folder")
    if not (folder / CONFIG_FILE).is_file():
        raise CheckpointError(f"--teacher {spec}: not a depth model folder (no {CONFIG_FILE})")
    model_type = read_config_dict(folder).get("model_type")
    if model_type in SPD_MODEL_TYPES:
        if space not in (None, "metric"):
            raise UserInputError("--teacher-space: SPD and baseline teachers predict metric depth")
        return PredictorTeacher(spec, torch_device, dtype)
    if model_type == "depth_anything" and not (folder / PROCESSOR_FILE).is_file():
        return PredictorTeacher(f"baseline:{spec}", torch_device, dtype)  # `spd train`'s DAv2-S folder
    return TransformersTeacher(folder, torch_device, dtype, space)
