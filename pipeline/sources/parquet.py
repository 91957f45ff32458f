"""Parquet files with a column of images (and, when present, a key per row).

The image column is ``input.image_column`` or the first of ``image``, ``image_bytes``, ``bytes``, ``jpg``, ``png``
(binary, or a Hugging Face-style struct ``{bytes, path}``). Rows are keyed ``<file URL>#<id>`` with
``input.id_column`` (or a column named ``id``, ``key``, ``image_id`` or ``__key__``), else ``<file URL>#<row>``.
Files are read one row group at a time.

A struct row whose ``bytes`` are null and whose ``path`` is set (what Hugging Face ``datasets`` writes for images
loaded from files: it keeps the path as it was given, absolute or relative, and no bytes) is read from that path:

- a URL with a protocol (``s3://b/x.jpg``, ``file:///data/x.jpg``, ``https://...``) is read as it is;
- a relative path (``images/x.jpg``, ``../x.jpg``) is joined with the Parquet file's folder, on the Parquet file's
  store: ship the folder, and the paths still hold;
- an absolute path (``/data/x.jpg``) is a local file when the Parquet file is local. When the Parquet file is on a
  remote store, the path names a file on the machine that wrote the dataset, which this machine cannot see; reading
  it as a key on the remote store (``s3://data/x.jpg``: another bucket) would read the wrong object or fail
  obscurely, so the row is an error that says so. Write such paths as ``file://`` URLs to read them from a disk
  every worker mounts.

``input.storage_options`` are for one remote store: they open every path on the Parquet file's own store (the same
filesystem the file was read with) and, when the Parquet file is local, every remote path it names. A path on a
third store uses that store's defaults (its environment's credentials).

The paths of a row group are fetched together, a chunk of rows at a time, concurrently; transient errors are
retried per image. A missing or unreadable image is an error row for that row only, naming the path as resolved.
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.asyn import AsyncFileSystem, _run_coros_in_chunks, sync

from pipeline.storage import ATTEMPTS, backoff, is_local, is_transient

EXTENSIONS = (".parquet",)
IMAGE_COLUMNS = ("image", "image_bytes", "bytes", "jpg", "jpeg", "png", "img")
ID_COLUMNS = ("id", "key", "image_id", "__key__", "filename", "path")
CHUNK_ROWS = 256  # rows whose images are fetched from their paths at once: bounds memory on a row group of paths
THREADS = 16  # concurrent reads on a store without an async API


def claims(name: str) -> bool:
    """Whether a file of this (lower-case) name is a shard of this layout, when the format is ``auto``."""
    return name.endswith(EXTENSIONS)


class ColumnError(KeyError):
    """A Parquet file without the columns the spec names (or without any image column); ``field`` is the spec's."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field

    def __str__(self) -> str:  # KeyError's own would quote the message
        return str(self.args[0])


def _pick(schema: pa.Schema, explicit: str | None, candidates: tuple[str, ...], what: str, url: str) -> str | None:
    if explicit:
        if explicit not in schema.names:
            columns = ", ".join(schema.names)
            raise ColumnError(f"{url} has no {what} column {explicit!r} (columns: {columns})", f"input.{what}_column")
        return explicit
    return next((name for name in candidates if name in schema.names), None)


def columns(schema: pa.Schema, url: str, options: dict) -> tuple[str, str | None]:
    """The image column and the id column (None: rows are keyed by their position) of a file with ``schema``."""
    image_column = _pick(schema, options.get("image_column"), IMAGE_COLUMNS, "image", url)
    if image_column is None:
        raise ColumnError(
            f"{url} has no image column: set input.image_column (columns: {', '.join(schema.names)}; looked for "
            f"{', '.join(IMAGE_COLUMNS)})",
            "input.image_column",
        )
    id_column = _pick(schema, options.get("id_column"), ID_COLUMNS, "id", url)
    return image_column, id_column if id_column != image_column else None


def check(fs, path: str, url: str, options: dict) -> None:
    """Raise :class:`ColumnError` unless the file has the columns a read needs (reads the footer only)."""
    with fs.open(path, "rb") as f:
        columns(pq.read_schema(f), url, options)


def _images(column: pa.ChunkedArray | pa.Array) -> tuple[list[bytes | None], list[str | None] | None]:
    """The bytes of each row, and its path (None when the column has no paths)."""
    if not pa.types.is_struct(column.type):
        return column.to_pylist(), None
    blobs = pc.struct_field(column, "bytes").to_pylist()
    has_path = any(column.type.field(i).name == "path" for i in range(column.type.num_fields))
    return blobs, pc.struct_field(column, "path").to_pylist() if has_path else None


def _protocol(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


@dataclass(frozen=True)
class _Target:
    """Where a row's path leads: a file on a filesystem, named for people as ``shown``."""

    fs: fsspec.AbstractFileSystem
    path: str
    shown: str
    origin: str  # how the Parquet file wrote it, when that differs from ``shown``


class _Resolver:
    """Turns the paths written in one Parquet file into files on filesystems (see the module's docstring)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, url: str, storage_options: dict) -> None:
        self.fs, self.folder, self.url = fs, posixpath.dirname(path), url
        self.local = is_local(fs)
        self.storage_options = storage_options
        self.filesystems: dict[str, fsspec.AbstractFileSystem | Exception] = {}

    def _shown(self, fs: fsspec.AbstractFileSystem, path: str) -> str:
        return path if is_local(fs) else fs.unstrip_protocol(path)

    def _filesystem(self, protocol: str, url: str) -> fsspec.AbstractFileSystem:
        if protocol in _protocol(self.fs):
            return self.fs
        if protocol not in self.filesystems:
            try:
                options = self.storage_options if self.local and protocol not in ("file", "local") else {}
                self.filesystems[protocol] = fsspec.core.url_to_fs(url, **options)[0]
            except Exception as error:  # an unknown protocol, a store whose package is not installed
                self.filesystems[protocol] = error
        found = self.filesystems[protocol]
        if isinstance(found, Exception):
            raise found
        return found

    def resolve(self, written: str) -> _Target | str:
        """The file ``written`` names, or the reason it cannot be read."""
        if "://" in written or "::" in written:
            protocol = fsspec.utils.get_protocol(written)
            try:
                fs = self._filesystem(protocol, written)
                path = fs._strip_protocol(written)
            except Exception as error:
                return f"cannot open image URL {written}: {type(error).__name__}: {error}"
            return _Target(fs, path, self._shown(fs, path), "")
        if written.startswith("/"):
            if not self.local:
                return (
                    f"local path {written!r} in a Parquet file on {self.url.split('://', 1)[0]}://: it names a file "
                    "on the machine that wrote the dataset; embed the images, or write their paths as URLs or "
                    "relative to the Parquet file"
                )
            path = posixpath.normpath(written)
            return _Target(self.fs, path, path, f"path {written!r} in the Parquet file" if path != written else "")
        path = posixpath.normpath(posixpath.join(self.folder, written))
        origin = f"path {written!r} in the Parquet file, relative to its folder"
        return _Target(self.fs, path, self._shown(self.fs, path), origin)


def _cat(fs: fsspec.AbstractFileSystem, paths: list[str]) -> list[bytes | Exception]:
    """The contents of each file, or the exception reading it raised; read concurrently.

    Not ``fs.cat(paths)``: that expands glob characters, which file names may hold (``photo [1].jpg``).
    """
    if isinstance(fs, AsyncFileSystem):
        coros = [fs._cat_file(path) for path in paths]
        return sync(fs.loop, _run_coros_in_chunks, coros, nofiles=True, return_exceptions=True)

    def one(path: str) -> bytes | Exception:
        try:
            return fs.cat_file(path)
        except Exception as error:
            return error

    if len(paths) == 1:
        return [one(paths[0])]
    with ThreadPoolExecutor(min(THREADS, len(paths))) as pool:
        return list(pool.map(one, paths))


def _fetch(fs: fsspec.AbstractFileSystem, paths: list[str], attempts: int = ATTEMPTS) -> dict[str, tuple[Any, int]]:
    """``path -> (bytes or exception, attempts made)``; transient errors retried with backoff, path by path."""
    results: dict[str, tuple[Any, int]] = {}
    pending = list(dict.fromkeys(paths))
    for attempt in range(1, attempts + 1):
        outcomes = _cat(fs, pending)
        results.update((path, (outcome, attempt)) for path, outcome in zip(pending, outcomes, strict=True))
        pending = [p for p, o in zip(pending, outcomes, strict=True) if isinstance(o, Exception) and is_transient(o)]
        if not pending or attempt == attempts:
            break
        time.sleep(backoff(attempt))
    return results


def _failure(target: _Target, error: Exception, attempts: int) -> str:
    origin = f" ({target.origin})" if target.origin else ""
    if isinstance(error, FileNotFoundError):
        return f"image file not found: {target.shown}{origin}"
    retried = f" (after {attempts} attempts)" if attempts > 1 else ""
    return f"cannot read image file {target.shown}{origin}: {type(error).__name__}: {error}{retried}"


def _from_paths(resolver: _Resolver, paths: list[str | None]) -> list[tuple[bytes | None, str | None]]:
    """``(bytes, error)`` for each path (None: no path), the files of one chunk fetched together per filesystem."""
    outcomes: list[tuple[bytes | None, str | None]] = [(None, "no image bytes and no path (null)")] * len(paths)
    targets: dict[int, _Target] = {}
    for index, written in enumerate(paths):
        if not written:
            continue
        target = resolver.resolve(written)
        if isinstance(target, str):
            outcomes[index] = (None, target)
        else:
            targets[index] = target
    by_filesystem: dict[int, list[int]] = {}
    for index, target in targets.items():
        by_filesystem.setdefault(id(target.fs), []).append(index)
    for indices in by_filesystem.values():
        fs = targets[indices[0]].fs
        fetched = _fetch(fs, [targets[index].path for index in indices])
        for index in indices:
            result, attempts = fetched[targets[index].path]
            if isinstance(result, Exception):
                outcomes[index] = (None, _failure(targets[index], result, attempts))
            else:
                outcomes[index] = (result, None)
    return outcomes


def read(fs, path: str, url: str, options: dict) -> Iterator:
    from pipeline.sources import Record

    resolver = _Resolver(fs, path, url, options.get("storage_options") or {})
    may_deliver = options.get("wanted") or (lambda image_id: True)  # a retry of some ids fetches only theirs
    with fs.open(path, "rb") as f:
        parquet_file = pq.ParquetFile(f)
        schema = parquet_file.schema_arrow
        image_column, id_column = columns(schema, url, options)
        wanted = [image_column] + ([id_column] if id_column else [])
        row = 0
        for group in range(parquet_file.num_row_groups):
            table = parquet_file.read_row_group(group, columns=wanted)
            blobs, paths = _images(table.column(image_column))
            keys = table.column(id_column).to_pylist() if id_column else list(range(row, row + len(blobs)))
            for start in range(0, len(blobs), CHUNK_ROWS):
                chunk = range(start, min(start + CHUNK_ROWS, len(blobs)))
                if paths is None:
                    outcomes = [(None, "no image bytes (null)")] * len(chunk)
                else:
                    needed = [paths[i] if blobs[i] is None and may_deliver(f"{url}#{keys[i]}") else None for i in chunk]
                    outcomes = _from_paths(resolver, needed)
                for i, (fetched, error) in zip(chunk, outcomes, strict=True):
                    if blobs[i] is not None:
                        yield Record(f"{url}#{keys[i]}", url, blobs[i], None)
                    else:
                        yield Record(f"{url}#{keys[i]}", url, fetched, error)
            row += len(blobs)
