"""WebDataset ``.tar`` shards: members sharing a key (the name up to its first dot) form a sample.

Every image member becomes a row keyed ``<shard URL>#<member name>``; other members (``.json``, ``.cls``, ``.txt``)
are ignored. The tar is streamed, never downloaded whole.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator

from pipeline.sources import images

EXTENSIONS = (".tar",)


def claims(name: str) -> bool:
    """Whether a file of this (lower-case) name is a shard of this layout, when the format is ``auto``."""
    return name.endswith(EXTENSIONS)


def read(fs, path: str, url: str, options: dict) -> Iterator:
    from pipeline.sources import Record

    with fs.open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as archive:
        for member in archive:
            if not member.isfile() or not member.name.lower().endswith(images.EXTENSIONS):
                continue
            name = member.name
            if any(part.startswith(".") for part in name.split("/")):
                continue  # macOS resource forks and other hidden members
            extracted = archive.extractfile(member)
            yield Record(f"{url}#{name}", url, extracted.read() if extracted else b"")
