"""A tree of image files: each file is a shard and its own image; ``image_id`` is the file's URL."""

from __future__ import annotations

from collections.abc import Iterator

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def claims(name: str) -> bool:
    """Whether a file of this (lower-case) name is a shard of this layout, when the format is ``auto``."""
    return name.endswith(EXTENSIONS)


def read(fs, path: str, url: str, options: dict) -> Iterator:
    from pipeline.sources import Record

    yield Record(url, url, fs.cat_file(path))
