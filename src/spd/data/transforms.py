"""BTS-protocol augmentation on torchvision transforms v2 (DESIGN.md §4).

Image, depth and valid mask travel together as tv_tensors so that every geometric step keeps them
aligned: the image is resampled bilinearly, depth and mask (tv_tensors.Mask) with nearest
neighbour, and pixels rotated in from outside get depth 0 / invalid.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BTSColorJitter(v2.Transform):
    """BTS colour augmentation on a [0, 1] float image: gamma, brightness and per-channel colour.

    Ranges follow BTS's NYU setting: gamma U(0.9, 1.1), brightness U(0.75, 1.25),
    colour U(0.9, 1.1) per channel; the result is clipped to [0, 1]. Depth is untouched.
    """

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, gamma=(0.9, 1.1), brightness=(0.75, 1.25), color=(0.9, 1.1)) -> None:
        super().__init__()
        self.gamma, self.brightness, self.color = gamma, brightness, color

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        def uniform(bounds, *shape):
            return torch.empty(*shape).uniform_(*bounds)

        return dict(gamma=uniform(self.gamma, 1), brightness=uniform(self.brightness, 1), color=uniform(self.color, 3))

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        out = inpt.clamp(0, 1) ** params["gamma"] * params["brightness"] * params["color"].view(3, 1, 1)
        return tv_tensors.wrap(out.clamp(0, 1), like=inpt)


# BTS's NYU training box, a PIL box (left, upper, right, lower) on the 640x480 frames: outside it the
# registered sync depth is (almost) all 0 — 2 % valid above row 45, 0 % right of column 608 on the
# real fixture frames (cleinc/bts pytorch/bts_dataloader.py crops every NYU training frame to it).
NYU_BTS_BOX = (43, 45, 608, 472)
NYU_FRAME_SIZE = (480, 640)


def crop_box(image: torch.Tensor, depth: torch.Tensor, box: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """image (3, H, W), depth (1, H, W) cut to a PIL-style box (left, upper, right, lower)."""
    left, upper, right, lower = box
    return image[:, upper:lower, left:right], depth[:, upper:lower, left:right]


def random_zoom(
    image: torch.Tensor, depth: torch.Tensor, uv: torch.Tensor | None, max_zoom: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """Enlarges a random window of the image back to the full size, as a lens of s times the focal
    length would see it, s ~ U(1, max_zoom): image bilinear, depth nearest (no mixed depths), points
    exactly (pixel centres map onto pixel centres). Returns (image, depth, uv, s_x) where s_x is the
    horizontal enlargement, the factor on fx (spd.camera).

    Shape: image (3, H, W), depth (1, H, W), uv (N, 2) pixel (u, v) or None -> same shapes.
    """
    height, width = image.shape[-2:]
    zoom = 1.0 + (max_zoom - 1.0) * float(torch.rand((), generator=generator))
    crop_h, crop_w = max(1, round(height / zoom)), max(1, round(width / zoom))
    top = int(torch.randint(0, height - crop_h + 1, (), generator=generator))
    left = int(torch.randint(0, width - crop_w + 1, (), generator=generator))
    window = (slice(None), slice(top, top + crop_h), slice(left, left + crop_w))
    # align_corners=False and nearest-exact: output pixel i reads input (i + 0.5) / s - 0.5, the
    # pixel-centre convention the points follow below.
    image = F.interpolate(image[window][None], size=(height, width), mode="bilinear", align_corners=False)[0]
    depth = F.interpolate(depth[window][None], size=(height, width), mode="nearest-exact")[0]
    scale_x, scale_y = width / crop_w, height / crop_h
    if uv is not None:
        uv = (uv + 0.5 - torch.tensor([float(left), float(top)])) * torch.tensor([scale_x, scale_y]) - 0.5
    return image, depth, uv, scale_x


def train_transform(
    crop_size: tuple[int, int] | None = (416, 544), rotation_deg: float = 2.5, color_p: float = 0.5,
    rotate_first: bool = False,
) -> v2.Compose:
    """Random crop -> rotation (or, with `rotate_first`, BTS's NYU order: rotation -> random crop) ->
    horizontal flip -> colour (p = `color_p`) -> ImageNet normalisation."""
    crop = [v2.RandomCrop(crop_size)] if crop_size is not None else []
    rotate = [v2.RandomRotation(rotation_deg, interpolation=v2.InterpolationMode.BILINEAR, fill=0)] if rotation_deg > 0 else []
    steps: list[v2.Transform] = rotate + crop if rotate_first else crop + rotate
    steps += [
        v2.RandomHorizontalFlip(0.5),
        v2.RandomApply([BTSColorJitter()], p=color_p),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]
    return v2.Compose(steps)


def test_transform() -> v2.Compose:
    """Full frame, no augmentation, ImageNet normalisation."""
    return v2.Compose([v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def normalize_image(image_uint8: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) uint8 -> ImageNet-normalised float32."""
    mean = torch.tensor(IMAGENET_MEAN, device=image_uint8.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image_uint8.device).view(3, 1, 1)
    return (image_uint8.float() / 255.0 - mean) / std


def apply(
    transform: v2.Compose, image: torch.Tensor, depth: torch.Tensor, points: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Runs `transform` on an image (3, H, W) float in [0, 1], depth (1, H, W) metres and, when given,
    sparse points (N, 2) pixel (u, v) together: the same crop, rotation and flip for all three (points
    exactly, as torchvision's KeyPoints: pixel centres at integers)."""
    inputs = [tv_tensors.Image(image), tv_tensors.Mask(depth)]
    if points is not None:
        inputs.append(tv_tensors.KeyPoints(points, canvas_size=tuple(image.shape[-2:])))
    out = transform(*inputs)
    moved = out[2].as_subclass(torch.Tensor) if points is not None else None
    return out[0].as_subclass(torch.Tensor), out[1].as_subclass(torch.Tensor), moved


def rasterise_points(uv: torch.Tensor, depth: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Sparse labels as a depth map: each point (u, v) on the image writes its depth at its nearest
    pixel; points off the image are dropped; elsewhere 0 (no label). uv (N, 2), depth (N,) -> (1, H, W)."""
    height, width = size
    u, v = uv[:, 0].round().long(), uv[:, 1].round().long()
    inside = (u >= 0) & (u < width) & (v >= 0) & (v < height)
    out = torch.zeros(height * width, dtype=torch.float32)
    out[v[inside] * width + u[inside]] = depth[inside].float()
    return out.view(1, height, width)
