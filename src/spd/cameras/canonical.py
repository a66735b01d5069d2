"""The canonical-camera rule (DESIGN.md §9): one model, any camera.

For a fixed image, metric depth scales with the focal length: the same picture taken with a lens of
twice the focal length shows a scene twice as far away. A model cannot see the focal length in the
pixels, so it predicts depth for a *canonical* focal length `f_c` (in pixels of the image it sees),
recorded in its config (`ModelConfig.canonical_focal`, NYU's 518.8579 px by default):

    training:   label_canonical = label_m * f_c / f
    inference:  depth_m         = prediction * f / f_c      (when the camera's f is known)

This is the label-scaling form of Metric3D's canonical camera space transformation (Yin et al.,
"Metric3D: Towards Zero-shot Metric 3D Prediction from A Single Image", ICCV 2023, arXiv:2307.10984:
"transforming depth labels", CSTM_label).
`f` is the horizontal focal length fx in pixels of the image the model sees: a resize by s changes it
to s * fx (a crop does not change it). Without intrinsics the image is assumed to have been taken
with the canonical camera, i.e. the prediction is returned as it is.

A frame with unknown intrinsics carries focal NaN through the data pipeline (`collate`): its labels
are used as they are (scale 1). A model that declares no canonical focal length (a constant
predictor, a test oracle) is taken to answer metres for any camera: nothing is converted.
"""

from __future__ import annotations

import torch

from spd.cameras.nyu import NYU_FOCAL

DEFAULT_CANONICAL_FOCAL = NYU_FOCAL  # pixels: NYU Depth V2's fx at 640x480


def canonical_focal_of(model) -> float | None:
    """The canonical focal length [px] a model predicts for (SPD: its config; the DAv2 baseline:
    NYU's), or None when it declares none (no conversion)."""
    focal = getattr(model, "canonical_focal", None)
    return None if focal is None else float(focal)


def label_scale(focal: torch.Tensor, canonical_focal: float | None) -> torch.Tensor:
    """Per-frame factor f_c / f that takes metric labels to the canonical camera; 1 where f is NaN
    (unknown camera) or the model has no canonical focal. focal (B,) pixels -> (B,)."""
    if canonical_focal is None:
        return torch.ones_like(focal)
    return torch.where(torch.isfinite(focal), canonical_focal / focal, 1.0)  # f_c / NaN is NaN: where picks 1


def labels_to_canonical(batch: dict, canonical_focal: float | None) -> dict:
    """A training batch whose `depth` (B, 1, H, W) metres is rescaled to the canonical camera by each
    frame's `focal` (B,). Returns a new dict; the input is unchanged."""
    scale = label_scale(batch["focal"].to(batch["depth"].device, torch.float32), canonical_focal)
    return {**batch, "depth": batch["depth"] * scale.view(-1, 1, 1, 1)}


def prediction_to_metric(depth, focal: float | None, canonical_focal: float | None):
    """Depth predicted for the canonical camera -> metres for a camera of focal `focal` [px, in the
    model's image]. `focal` None or NaN (unknown camera), or no canonical focal: returned unchanged."""
    if focal is None or focal != focal or canonical_focal is None:
        return depth
    return depth * (float(focal) / canonical_focal)
