"""Image bytes -> RGB uint8 arrays the model takes: EXIF orientation applied, any mode converted, resized.

``crop`` is the ImageNet evaluation convention (shorter side to 256, then a center 224 crop); ``squash`` resizes
straight to 224x224 and keeps the whole picture.
"""

from __future__ import annotations

import functools
import io
import operator
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

Preprocessing = Literal["crop", "squash"]
IMAGE_SIZE = 224
CROP_RESIZE = 256
EXIF_ORIENTATION = 0x0112
BAND_PIXELS = 1 << 18  # converted at a time: a few MB of temporaries, whatever the image's size


class DecodeError(ValueError):
    """An image that cannot become model input; the message is the row's error reason."""


def open_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Open ``data`` lazily (no pixels decoded yet), refusing anything over ``max_pixels``."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:  # far over Pillow's own limit: refused before reading pixels
        raise DecodeError(f"too large: {error}") from None
    except UnidentifiedImageError:
        raise DecodeError(f"not a readable image: unknown format (starts with {data[:8]!r})") from None
    except Exception as error:
        raise DecodeError(f"not a readable image: {error}") from error
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise DecodeError(f"too large: {width}x{height} is over the limit of {max_pixels} pixels")
    return image


def upright_size(image: Image.Image) -> tuple[int, int]:
    """Width and height as the picture is meant to be seen (EXIF orientations 5-8 swap them)."""
    width, height = image.size
    return (height, width) if image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8) else (width, height)


def upright_rgb(image: Image.Image) -> Image.Image:
    """Decode the pixels, apply the EXIF orientation, convert any mode to RGB."""
    try:
        ImageOps.exif_transpose(image, in_place=True)  # in place: an upright image is not copied pixel by pixel
        return _to_rgb(image)
    except Exception as error:
        raise DecodeError(f"corrupt image data: {error}") from error


def _draft(image: Image.Image, preprocessing: Preprocessing, size: int) -> None:
    """Let libjpeg decode a large JPEG at 1/2, 1/4 or 1/8 scale when that still leaves enough pixels.

    The DCT-domain reduction is far cheaper than decoding every pixel and resizing afterwards.
    """
    if image.format != "JPEG":
        return
    needed = round(size * CROP_RESIZE / IMAGE_SIZE) if preprocessing == "crop" else size
    width, height = image.size
    ratio = needed / min(width, height)
    if ratio < 0.5:
        image.draft("RGB", (int(width * ratio) + 1, int(height * ratio) + 1))


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode -> RGB, a band of rows at a time: beside Pillow's decoded image, memory holds one RGB copy.

    Converting whole images cost up to 9x the 8-bit RGB size (16/32-bit values as float64, alpha composited in
    several full-size RGBA copies; issue 18).
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale to 8 bits, don't clip
        peak = 65535.0 if image.mode.startswith("I;16") or image.getextrema()[1] > 255 else 255.0
        convert = functools.partial(_scaled_to_8_bits, peak=peak)
    elif image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        convert = _on_white
    else:
        convert = operator.methodcaller("convert", "RGB")
    width, height = image.size
    rows = max(1, BAND_PIXELS // width)
    rgb = Image.new("RGB", image.size)
    for top in range(0, height, rows):
        rgb.paste(convert(image.crop((0, top, width, min(top + rows, height)))), (0, top))
    return rgb


def _scaled_to_8_bits(band: Image.Image, peak: float) -> Image.Image:
    values = np.array(band, dtype=np.float64)  # in place from here: one float64 band of temporaries
    values /= peak
    values *= 255.0
    values += 0.5
    return Image.fromarray(np.clip(values, 0, 255, out=values).astype(np.uint8)).convert("RGB")


def _on_white(band: Image.Image) -> Image.Image:
    band = band.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", band.size, (255, 255, 255, 255)), band).convert("RGB")


def crop_box(
    width: int, height: int, preprocessing: Preprocessing = "crop", size: int = IMAGE_SIZE
) -> tuple[float, float, float, float]:
    """The region ``(left, top, right, bottom)`` of a ``width`` x ``height`` image that becomes the model's
    ``size`` x ``size`` input: all of it for ``squash``; for ``crop`` what stays of it once its shorter side is
    resized to ``size * 256 / 224`` and the center ``size`` square is cut out."""
    if preprocessing == "squash":
        return 0.0, 0.0, float(width), float(height)
    if preprocessing != "crop":
        raise ValueError(f"preprocessing must be 'crop' or 'squash', got {preprocessing!r}")
    short_side = round(size * CROP_RESIZE / IMAGE_SIZE)
    scale = short_side / min(width, height)
    resized_w, resized_h = max(size, round(width * scale)), max(size, round(height * scale))
    left, top = (resized_w - size) // 2, (resized_h - size) // 2
    x, y = width / resized_w, height / resized_h
    return left * x, top * y, (left + size) * x, (top + size) * y


def fit(image: Image.Image, preprocessing: Preprocessing = "crop", size: int = IMAGE_SIZE) -> np.ndarray:
    """Resize the :func:`crop_box` of ``image`` to ``size`` x ``size``; returns uint8 HWC."""
    box = crop_box(*image.size, preprocessing, size)
    # Resizing only the box gives the same pixels as resizing all, then cropping, without computing the border that
    # is thrown away; reducing_gap shrinks large images in cheap integer steps first.
    resample = Image.Resampling.BILINEAR
    if preprocessing == "squash":
        return np.asarray(image.resize((size, size), resample), dtype=np.uint8)
    return np.asarray(image.resize((size, size), resample, box=box, reducing_gap=3.0), np.uint8)


def decode(
    data: bytes, preprocessing: Preprocessing = "crop", max_pixels: int | None = None, size: int = IMAGE_SIZE
) -> tuple[np.ndarray, int, int]:
    """``data`` -> (pixels, original width, original height); raises :class:`DecodeError` with the reason."""
    image = open_image(data, max_pixels)
    try:
        width, height = upright_size(image)
        _draft(image, preprocessing, size)
        return fit(upright_rgb(image), preprocessing, size), width, height
    except DecodeError:
        raise
    except Exception as error:  # truncated files often fail only here, when pixels are read
        raise DecodeError(f"corrupt image data: {error}") from error
