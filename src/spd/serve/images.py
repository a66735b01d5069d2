"""Uploaded image bytes -> the image the model sees, with as little memory as the format allows.

Runs in the service's decoding pool, never on the event loop. The pixel cap is checked from the
header before anything is decoded. A JPEG at least four times the model's size is decoded at a reduced
scale (libjpeg's DCT scaling, `Image.draft`) that still leaves twice the model's size: for a 6000 x 4000
photo and a 640-px model, 1/16 of the pixels.
Every other format is decoded whole, then resized to the model's size in Pillow and the full-size
pixels freed at once. Without draft mode the result equals `Predictor.prepare` of the same file
exactly (test); with it, a JPEG's pixels differ slightly from a full decode (documented on the serving
page with the measured depth change).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from spd.predictor import PreparedImage

_TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


class ImageRefused(Exception):
    """The upload is not an image we will decode: `status` 400 (unreadable) or 413 (too many pixels)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def decode_for_model(data: bytes, model_size, max_pixels: int, draft: bool = True) -> PreparedImage:
    """`data` (an encoded image) -> PreparedImage: the pixels at the model's size, the caller's size.

    Args:
        model_size: (height, width) -> the (h, w) the model sees (`Predictor.model_size`).
        max_pixels: refuse (413) images with more pixels than this, from the header.
        draft: let JPEG decode at a reduced scale (>= the model's size) when it is at least twice as large.
    """
    if not data:
        raise ImageRefused(400, "the 'image' file is empty")
    try:
        with _open_allowed(data) as image:
            if image.width * image.height > max_pixels:
                raise ImageRefused(413, f"image of {image.width}x{image.height} pixels exceeds the limit of "
                                        f"{max_pixels} pixels (spd serve --max-image-pixels)")
            height, width = _upright_size(image)
            target_h, target_w = model_size(height, width)
            if draft and image.format == "JPEG":
                # (w, h) in the file's own orientation; draft picks the smallest DCT scale still >= it
                stored = (2 * target_h, 2 * target_w) if _orientation(image) in _TRANSPOSED else (2 * target_w, 2 * target_h)
                image.draft("RGB", stored)
            image.load()
            upright = ImageOps.exif_transpose(image, in_place=False) if _orientation(image) > 1 else image
            rgb = upright if upright.mode == "RGB" else upright.convert("RGB")
            if rgb.size != (target_w, target_h):
                rgb = rgb.resize((target_w, target_h), Image.Resampling.BILINEAR, reducing_gap=None)
            return PreparedImage(np.array(rgb), height, width)
    except ImageRefused:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageRefused(400, f"unreadable image ({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None


# Uploads are decoded by these Pillow plugins only: the formats cameras and browsers send. Every other
# plugin stays unreached by a client's bytes (EPS would run Ghostscript on them, where installed).
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")
# How a refused upload is named in its 415, from its first bytes (no plugin opens it)
_SIGNATURES = ((b"%!PS", "EPS / PostScript"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"%PDF", "PDF"), (b"II*\x00", "TIFF"),
               (b"MM\x00*", "TIFF"), (b"GIF8", "GIF"), (b"BM", "BMP"), (b"\x00\x00\x01\x00", "ICO"),
               (b"8BPS", "PSD"), (b"<?xml", "SVG / XML"), (b"<svg", "SVG"), (b"\x00\x00\x00\x0cjP", "JPEG 2000"))


def _open_allowed(data: bytes) -> Image.Image:
    """`Image.open` trying only ALLOWED_FORMATS' plugins; ImageRefused 415 naming a known other format."""
    try:
        return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        named = next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)
        if named is not None:
            raise ImageRefused(415, f"{named} uploads are not accepted: send JPEG, PNG or WebP") from None
        raise


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1) or 1)
    except (ValueError, TypeError, OSError):
        return 1


def _upright_size(image: Image.Image) -> tuple[int, int]:
    """(height, width) after the EXIF orientation is applied (as `Predictor` sees the file)."""
    if _orientation(image) in _TRANSPOSED:
        return image.width, image.height
    return image.height, image.width
