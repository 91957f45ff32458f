"""A tree of image files: each file is a shard and its own image; ``image_id`` is the file's URL.

Files are recognised by the extensions of every format Pillow opens (``.jpg`` to ``.jp2``, ``.ppm``, ``.qoi``...).
With ``format: images`` a file of another name is read too, and is an image if Pillow recognises its bytes.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

from PIL import Image, UnidentifiedImageError

Image.init()
# Formats Pillow registers but cannot open by itself (EPS needs Ghostscript; BUFR, GRIB, HDF5, FITS, WMF are
# stubs for plugins), and video: a file so named is not taken for an image.
_NOT_IMAGES = (".eps", ".ps", ".bufr", ".grib", ".h5", ".hdf", ".fit", ".fits", ".wmf", ".emf", ".mpeg", ".mpg")
EXTENSIONS = tuple(
    sorted(e for e, f in Image.registered_extensions().items() if f in Image.OPEN and e not in _NOT_IMAGES)
)


def claims(name: str) -> bool:
    """Whether a file of this (lower-case) name is a shard of this layout, when the format is ``auto``."""
    return name.endswith(EXTENSIONS)


def looks_like_image(data: bytes) -> bool:
    """Whether Pillow recognises ``data`` as an image (from its header; nothing is decoded)."""
    try:
        with Image.open(io.BytesIO(data)):
            return True
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return False
    except Image.DecompressionBombError:
        return True  # an image, and too large: its row says so


def read(fs, path: str, url: str, options: dict) -> Iterator:
    from pipeline.sources import Record, Skip

    data = fs.cat_file(path)
    if claims(path.rsplit("/", 1)[-1].lower()) or looks_like_image(data):
        yield Record(url, url, data)
    else:
        yield Skip("", "not an image")
