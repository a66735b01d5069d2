"""The pixel-scale rule: a model sees every image at the pixel scale it was trained at.

A depth network reads metric depth partly from apparent size, in pixels. A model trained on frames
whose long side is 160 px (the demo's 120x160 rooms) and fed a 640x480 photo sees every object four
times larger than it ever did, and with the canonical-camera rule (`spd.cameras.canonical`) the
focal length grows fourfold too: the same model gave metric depths 3.3x apart depending on whether
the caller resized the image first. So a model records the long side of its training frames
(`ModelConfig.image_long_side`, written by `spd train`), and every path that feeds it an image
(the predictor, the ONNX predictor, the service, `spd eval`, `spd export`'s default size) resizes
the image to that long side first, maps the points onto the resized image, scales the focal length
with it, and returns depth for the caller's camera. Folders saved before the field existed read as
640 px (NYU's frames), with a warning.
"""

from __future__ import annotations

import torch

DEFAULT_LONG_SIDE = 640  # px: NYU Depth V2's 640x480 frames, what every model before the field was trained on


def long_side_of(model) -> int | None:
    """The long side [px] `model` sees images at: an SPD model's `config.image_long_side` (640 when
    unset); None for models without the rule (the DAv2 baseline resizes inside, a constant predictor
    needs no image)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "image_long_side"):
        return None
    return config.image_long_side or DEFAULT_LONG_SIDE


def scaled_size(height: int, width: int, long_side: int | None) -> tuple[int, int]:
    """(h, w) of an image of height x width resized so that its long side is `long_side` (aspect
    kept, rounded; unchanged when `long_side` is None)."""
    if long_side is None or max(height, width) == long_side:
        return height, width
    factor = long_side / max(height, width)
    return max(1, round(height * factor)), max(1, round(width * factor))


def to_model_pixels(points: torch.Tensor, scale: tuple[float, float]) -> torch.Tensor:
    """(..., 2) pixel (u, v) of the caller's image -> the resized image's pixels (pixel centres map onto
    pixel centres): (p + 0.5) * s - 0.5, s = (new w / w, new h / h)."""
    if scale == (1.0, 1.0):
        return points
    return ((points + 0.5) * torch.tensor(scale, dtype=points.dtype, device=points.device) - 0.5).clamp_min(-0.5)


def resize_for_model(image: torch.Tensor, long_side: int | None) -> tuple[torch.Tensor, tuple[float, float]]:
    """A (B, 3, H, W) image tensor at the model's pixel scale (bilinear, antialiased when shrinking)
    and the (x, y) scale applied."""
    height, width = image.shape[-2:]
    new_h, new_w = scaled_size(height, width, long_side)
    if (new_h, new_w) == (height, width):
        return image, (1.0, 1.0)
    resized = torch.nn.functional.interpolate(image, size=(new_h, new_w), mode="bilinear", align_corners=False,
                                              antialias=new_h < height)
    return resized, (new_w / width, new_h / height)
