"""Input layouts. Each module reads one kind of shard and yields :class:`Record` s; this one lists shards.

A shard is the unit of work and of bookkeeping: one image file, one WebDataset tar, one TFRecord file, one Parquet
file. Listing goes through fsspec, so any store it knows works; work is split per shard, never per byte range.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

import fsspec
from fsspec.core import has_magic

from pipeline.sources import images, parquet, tfrecord, webdataset
from pipeline.storage import ATTEMPTS, backoff, glob_root, is_transient, version_of, with_retries

READERS = {"images": images, "webdataset": webdataset, "tfrecord": tfrecord, "parquet": parquet}


class InputError(ValueError):
    """An input that cannot be listed or holds nothing to label; the message names the URL."""


@dataclass(frozen=True)
class Shard:
    url: str
    format: str
    size: int | None = None
    etag: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Shard:
        """The shard a progress or shards record describes (it may hold more: rows, partial)."""
        return cls(**{field.name: record.get(field.name) for field in fields(cls)})


@dataclass(frozen=True)
class ShardRead:
    """A shard to read: all of it, or just the images whose ids are in ``only`` (retrying failed ones)."""

    shard: Shard
    only: frozenset[str] | None = None

    def done(self, rows: int) -> dict[str, Any]:
        """Its progress record once read to its end (plain data, kept as JSON)."""
        return {**self.shard.to_dict(), "rows": rows, "partial": self.only is not None}


@dataclass(frozen=True)
class ReadTask:
    """What one read task reads: a container shard, or a group of image files."""

    reads: tuple[ShardRead, ...]

    @property
    def key(self) -> str:
        """Names the task's progress record: the same shards, the same name."""
        return hashlib.sha1("\n".join(read.shard.url for read in self.reads).encode()).hexdigest()[:20]

    def to_record(self) -> dict[str, Any]:
        """Plain data, as it travels through Ray Data (an Arrow list of structs, not a pickled object)."""
        return {
            "reads": [
                {**read.shard.to_dict(), "only": None if read.only is None else sorted(read.only)}
                for read in self.reads
            ]
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ReadTask:
        return cls(
            tuple(
                ShardRead(Shard.from_record(read), None if read["only"] is None else frozenset(read["only"]))
                for read in record["reads"]
            )
        )


@dataclass(frozen=True)
class Record:
    """One image as read from its shard: bytes, or the reason they could not be read."""

    image_id: str
    source: str
    data: bytes | None
    error: str | None = None


def format_of(path: str) -> str | None:
    """The layout a file's name says it holds (under ``format: auto``), or None."""
    name = path.rsplit("/", 1)[-1].lower()
    return next((format_name for format_name, reader in READERS.items() if reader.claims(name)), None)


def _is_hidden(path: str, root: str) -> bool:
    relative = path[len(root) :] if path.startswith(root) else path
    return any(part.startswith((".", "_")) for part in relative.split("/") if part)


def list_shards(url: str, format: str = "auto", storage_options: dict | None = None) -> list[Shard]:
    """Every shard under a prefix (recursively) or matching a glob, sorted; hidden paths (``.``, ``_``) skipped."""

    def listing() -> tuple[fsspec.AbstractFileSystem, str, dict]:
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        fs.invalidate_cache()  # a long-lived process lists a growing bucket: never answer from a stale listing
        if has_magic(root):
            infos = fs.glob(root, detail=True)
            return fs, glob_root(root), infos
        if fs.isdir(root):
            return fs, root, fs.find(root, detail=True)
        if fs.exists(root):
            return fs, root, {root: fs.info(root)}
        raise InputError(f"input.url: nothing found at {url}")

    try:
        fs, root, infos = with_retries(listing)
    except InputError:
        raise
    except Exception as error:
        raise InputError(f"input.url: cannot list {url}: {error}") from error

    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    shards, formats = [], set()
    for path, info in sorted(infos.items()):
        if info.get("type") == "directory" or _is_hidden(path, root):
            continue
        detected = format_of(path)
        if detected is None or (format != "auto" and detected != format):
            continue
        formats.add(detected)
        shards.append(Shard(_unstrip(fs, protocol, path), detected, info.get("size"), version_of(info)))
    if not shards:
        wanted = "images or shards" if format == "auto" else f"{format} shards"
        raise InputError(f"input.url: no {wanted} found at {url}")
    if len(formats) > 1:
        raise InputError(f"input.url: {url} mixes layouts ({', '.join(sorted(formats))}); set input.format")
    return shards


def check_columns(shards: list[Shard], options: dict[str, Any]) -> None:
    """For layouts with named columns (Parquet): the first shard has the columns the spec names, or an image column
    is found. Files written by one tool share a schema; a file that differs later becomes an error row."""
    reader = READERS[shards[0].format]
    if not hasattr(reader, "check"):
        return
    fs, path = fsspec.core.url_to_fs(shards[0].url, **options.get("storage_options", {}))
    try:
        with_retries(lambda: reader.check(fs, path, shards[0].url, options))
    except parquet.ColumnError as error:
        raise InputError(f"{error.field}: {error}") from None
    except Exception as error:
        raise InputError(f"input.url: cannot read {shards[0].url}: {type(error).__name__}: {error}") from error


def _unstrip(fs, protocol: str, path: str) -> str:
    if protocol in ("file", "local"):
        return path
    return fs.unstrip_protocol(path)


def read_shard(
    shard: Shard, options: dict[str, Any], only: set[str] | None = None, attempts: int = ATTEMPTS
) -> Iterator[Record]:
    """The records of one shard (those whose ``image_id`` is in ``only``, when given).

    A transient storage error (503, reset connection, timeout) restarts the read after a backoff, skipping the
    records already delivered, so a flaky store costs time, never rows. A shard that still cannot be read yields
    one error record that names it and says why: ``<url>#unreadable`` (or the image's own id for an image file).
    """
    reader = READERS[shard.format]
    fs, path = fsspec.core.url_to_fs(shard.url, **options.get("storage_options", {}))
    delivered = 0
    for attempt in range(1, attempts + 1):
        try:
            for index, record in enumerate(reader.read(fs, path, shard.url, options)):
                if index >= delivered:
                    delivered += 1
                    if only is None or record.image_id in only:
                        yield record
            return
        except Exception as error:
            if is_transient(error) and attempt < attempts:
                time.sleep(backoff(attempt))
                continue
            # The rest of the shard is lost; say so in a row rather than kill the job.
            what = "file" if shard.format == "images" else "shard"
            retried = f" (after {attempt} attempts)" if attempt > 1 else ""
            reason = f"unreadable {what}: {type(error).__name__}: {error}{retried}"
            yield Record(unreadable_id(shard), shard.url, None, reason)
            return


def unreadable_id(shard: Shard) -> str:
    """The row that stands for a shard that could not be read: the image itself, or ``<url>#unreadable``."""
    return shard.url if shard.format == "images" else f"{shard.url}#unreadable"
