"""WebDataset shards (``.tar``, and compressed ``.tar.gz``, ``.tgz``, ``.tar.bz2``, ``.tar.xz``): members sharing a key
(the name up to its first dot) form a sample.

Every image member becomes a row keyed ``<shard URL>#<member name>``: a member whose extension is an image
format's, or whose bytes Pillow recognises (``0001.image``, ``0001.input``). Sidecars (``.json``, ``.cls``,
``.txt``...), hidden members, links and anything else are skipped and counted by reason. The tar is streamed and
decompressed on the fly, never downloaded or unpacked whole.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator

from pipeline.sources import images

EXTENSIONS = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def claims(name: str) -> bool:
    """Whether a file of this (lower-case) name is a shard of this layout, when the format is ``auto``."""
    return name.endswith(EXTENSIONS)


def read(fs, path: str, url: str, options: dict) -> Iterator:
    from pipeline.sources import SIDECAR_EXTENSIONS, Record, Skip

    with fs.open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as archive:
        for member in archive:
            name = member.name
            if member.isdir():
                continue
            if any(part.startswith(".") for part in name.split("/")):
                yield Skip(name, "hidden")  # macOS resource forks (._0001.jpg) and other hidden members
            elif not member.isfile():
                yield Skip(name, "link")
            elif name.lower().endswith(SIDECAR_EXTENSIONS):
                yield Skip(name, "sidecar")
            else:
                extracted = archive.extractfile(member)
                data = extracted.read() if extracted else b""
                if images.claims(name.lower()) or images.looks_like_image(data):
                    yield Record(f"{url}#{name}", url, data)
                else:
                    yield Skip(name, "not an image")
