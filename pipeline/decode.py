"""Image bytes -> RGB uint8 arrays the model takes: EXIF orientation applied, any mode converted, resized.

``crop`` is the ImageNet evaluation convention (shorter side to 256, then a center 224 crop); ``squash`` resizes
straight to 224x224 and keeps the whole picture.
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

Preprocessing = Literal["crop", "squash"]
IMAGE_SIZE = 224
CROP_RESIZE = 256


class DecodeError(ValueError):
    """An image that cannot become model input; the message is the row's error reason."""


def open_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Decode ``data`` to an upright RGB image, refusing anything over ``max_pixels`` before decoding pixels."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as error:
        raise DecodeError(f"not a readable image: {error}") from error
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise DecodeError(f"too large: {width}x{height} is over the limit of {max_pixels} pixels")
    try:
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except Exception as error:
        raise DecodeError(f"corrupt image data: {error}") from error


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale to 8 bits, don't clip
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def fit(image: Image.Image, preprocessing: Preprocessing = "crop", size: int = IMAGE_SIZE) -> np.ndarray:
    """Resize (and for ``crop`` center-crop) to ``size`` x ``size``; returns uint8 HWC."""
    if preprocessing == "squash":
        return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
    if preprocessing != "crop":
        raise ValueError(f"preprocessing must be 'crop' or 'squash', got {preprocessing!r}")
    short_side = round(size * CROP_RESIZE / IMAGE_SIZE)
    width, height = image.size
    scale = short_side / min(width, height)
    resized_w, resized_h = max(size, round(width * scale)), max(size, round(height * scale))
    # reducing_gap lets JPEG/large images shrink in cheap integer steps first (same quality, much faster).
    image = image.resize((resized_w, resized_h), Image.Resampling.BILINEAR, reducing_gap=3.0)
    left, top = (resized_w - size) // 2, (resized_h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def decode(
    data: bytes, preprocessing: Preprocessing = "crop", max_pixels: int | None = None, size: int = IMAGE_SIZE
) -> tuple[np.ndarray, int, int]:
    """``data`` -> (pixels, original width, original height); raises :class:`DecodeError` with the reason."""
    image = open_image(data, max_pixels)
    try:
        return fit(image, preprocessing, size), image.width, image.height
    except DecodeError:
        raise
    except Exception as error:  # truncated files often fail only here, when pixels are read
        raise DecodeError(f"corrupt image data: {error}") from error
