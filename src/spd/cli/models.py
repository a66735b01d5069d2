"""Loading whatever `--model` names: an SPD model folder or Hub id, a constant `median:<metres>`
predictor, or the dense baseline `baseline:<folder|random>`."""

from __future__ import annotations

import math

from spd.errors import UserInputError


def load_any_model(spec: str, device: str):
    """A model folder (SPD or dense control) / Hub id, `median:<metres>` (a constant predictor) or `baseline:<folder|random>`."""
    if spec.startswith("median:"):
        from spd.models.constant import ConstantDepth

        try:
            depth = float(spec.split(":", 1)[1])
        except ValueError:
            depth = float("nan")
        if not (math.isfinite(depth) and depth > 0):
            raise UserInputError(f"--model {spec!r}: median:<metres> needs a positive depth in metres")
        return ConstantDepth(depth)
    if spec.startswith("baseline:"):
        from spd.models.baseline import load_baseline

        return load_baseline(spec.split(":", 1)[1], device=device)
    from spd.models.dense_control import is_dense_control_folder, load_dense_control
    from spd.models.spd import load_model

    if is_dense_control_folder(spec):
        return load_dense_control(spec, device)
    return load_model(spec, device)


def weights_sha256(spec: str) -> str | None:
    """The SHA-256 of the evaluated weights file, when the model is a local folder."""
    from pathlib import Path

    from spd.models.folder import MODEL_FILE, file_sha256

    folder = Path(spec.split(":", 1)[1] if spec.startswith("baseline:") else spec)
    weights = folder / MODEL_FILE
    return file_sha256(weights) if weights.is_file() else None
