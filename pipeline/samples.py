"""Sample images for the demo and the tests: two real photographs that ship in this package (``pipeline/photos``,
CC BY 2.0, see its README.txt), in many formats and modes, plus files that are not valid images. Nothing is
downloaded."""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("china.jpg", "flower.jpg")  # 640x427 photographs


def photo(name: str) -> Image.Image:
    with Image.open(files("pipeline") / "photos" / name) as image:
        return image.convert("RGB")


def _save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _exif_rotated(image: Image.Image) -> bytes:
    """Pixels stored turned a quarter left, with the EXIF tag that tells viewers to turn them back."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(image.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif, quality=90)


def _sixteen_bit(image: Image.Image) -> bytes:
    gray = np.asarray(image.convert("L"), dtype=np.uint16) * 257
    return _save(Image.fromarray(gray), "PNG")


def _palette_with_transparency(image: Image.Image) -> bytes:
    return _save(image.quantize(64), "PNG", transparency=0)  # palette entry 0 is transparent


def _animated_gif(image: Image.Image) -> bytes:
    frames = [image.quantize(128), image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).quantize(128)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _huge_header(_: Image.Image) -> bytes:
    """A small, well-formed PNG header that claims 30000x30000 pixels: a decompression bomb's signature."""
    data = bytearray(_save(Image.new("RGB", (8, 8)), "PNG"))
    data[16:24] = (30000).to_bytes(4, "big") * 2  # IHDR width and height
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # the chunk's CRC, so only the size is wrong
    return bytes(data)


def _broken_crc(image: Image.Image) -> bytes:
    """A PNG whose first image-data chunk has a wrong checksum (a bit flipped in transit)."""
    data = bytearray(_save(image.resize((64, 48)), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 8] ^= 0xFF  # a byte of compressed data; the chunk's CRC no longer matches
    return bytes(data)


# name -> how to make it from a photograph. Kept as data so tests can list what each case exercises.
VARIANTS: dict[str, Callable[[Image.Image], bytes]] = {
    "photo.jpg": lambda im: _save(im, "JPEG", quality=92),
    "photo.png": lambda im: _save(im, "PNG"),
    "photo.webp": lambda im: _save(im, "WEBP", quality=90),
    "photo.bmp": lambda im: _save(im, "BMP"),
    "photo.tiff": lambda im: _save(im, "TIFF"),
    "gray.jpg": lambda im: _save(im.convert("L"), "JPEG"),
    "rgba.png": lambda im: _save(im.convert("RGBA"), "PNG"),
    "cmyk.jpg": lambda im: _save(im.convert("CMYK"), "JPEG"),
    "exif-rotated.jpg": _exif_rotated,
    "sixteen-bit.png": _sixteen_bit,
    "palette-transparent.png": _palette_with_transparency,
    "animated.gif": _animated_gif,
    "small.jpg": lambda im: _save(im.resize((96, 64)), "JPEG"),
    "one-pixel.png": lambda im: _save(im.resize((1, 1)), "PNG"),
}
BAD_FILES: dict[str, Callable[[Image.Image], bytes]] = {
    "truncated.jpg": lambda im: _save(im, "JPEG")[:5000],
    "empty.jpg": lambda im: b"",
    "html-page.jpg": lambda im: b"<!doctype html><html><body>Not found</body></html>",
    "random-bytes.png": lambda im: np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    "huge-header.png": _huge_header,
    "broken-crc.png": _broken_crc,
}


def write_samples(folder: Path, include_bad: bool = True, photos: tuple[str, ...] = PHOTOS) -> list[Path]:
    """Write every variant of every photo (and the bad files) under ``folder``; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in photos:
        image = photo(name)
        stem = name.rsplit(".", 1)[0]
        for variant, make in VARIANTS.items():
            path = folder / f"{stem}-{variant}"
            path.write_bytes(make(image))
            written.append(path)
    if include_bad:
        image = photo(photos[0])
        for name, make in BAD_FILES.items():
            path = folder / f"bad-{name}"
            path.write_bytes(make(image))
            written.append(path)
    return written
