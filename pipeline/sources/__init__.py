"""Input layouts. Each module reads one kind of shard and yields :class:`Record` s; this one lists shards.

A shard is the unit of work and of bookkeeping: one image file, one WebDataset tar, one TFRecord file, one Parquet
file. Listing goes through fsspec, so any store it knows works; work is split per shard, never per byte range.

Nothing disappears silently: every object the listing sees is a shard or skipped for a named reason, and every
entry a reader meets in a shard is a row (ok or error) or skipped for a named reason (:class:`Skip`); both are
tallied (:class:`~pipeline.manifest.Tally`) into the run's manifest with the first few names. The reasons:

- ``hidden``: a name (of the file or a folder above it) that begins with ``.``: ``.DS_Store``, ``._IMG_1.JPG``;
- ``metadata``: a folder whose name begins with ``_`` (``_delta_log``, ``_temporary``), or a file so named that no
  layout reads (``_SUCCESS``, ``_metadata``); never an image file for its first character (``_DSC0001.JPG``);
- ``sidecar``: annotations and metadata kept next to images (``.json``, ``.txt``, ``.xmp``, ``.cls``...);
- ``not an image``: a file or member that no layout recognises by its name, or whose bytes no decoder knows;
- ``other layout``: a shard of another layout than the one ``input.format`` names.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Generic, TypeVar, overload

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.core import has_magic

from pipeline.manifest import Tally
from pipeline.sources import images, parquet, tfrecord, webdataset
from pipeline.storage import ATTEMPTS, backoff, glob_root, is_local, is_transient, version_of, with_retries

READERS = {"images": images, "webdataset": webdataset, "tfrecord": tfrecord, "parquet": parquet}
SIDECAR_EXTENSIONS = (
    *(".json", ".jsonl", ".txt", ".xml", ".xmp", ".csv", ".tsv", ".yaml", ".yml", ".md", ".html", ".htm", ".pdf"),
    *(".cls", ".cls2", ".class", ".id", ".idx", ".index", ".caption", ".label", ".labels", ".tags", ".npy", ".npz"),
    *(".pyd", ".pkl", ".pickle", ".mp", ".msgpack", ".cbor", ".ten", ".pth", ".pt", ".lst", ".log", ".md5", ".sha256"),
    *(".aae", ".thm", ".lrv", ".dop", ".pp3", ".db", ".ini"),  # camera and photo-software sidecars
)
METADATA_FILES = ("_SUCCESS", "_metadata", "_common_metadata")


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

    def done(self, rows: int, tally: Tally | None = None) -> dict[str, Any]:
        """Its progress record once read to its end (plain data, kept as JSON)."""
        record = {**self.shard.to_dict(), "rows": rows, "partial": self.only is not None}
        return record if tally is None else {**record, "tally": tally.to_json()}


@dataclass(frozen=True)
class ReadTask:
    """What one read task reads: a container shard, or a group of image files."""

    reads: tuple[ShardRead, ...]

    @property
    def key(self) -> str:
        """Names the task's progress record: the same shards, the same name."""
        return hashlib.sha1("\n".join(read.shard.url for read in self.reads).encode()).hexdigest()[:20]

    def to_json(self) -> str:
        """Plain data, as it travels through Ray Data: a string in a row, not a pickled object, and as compact as
        the Arrow columns it is made from (:meth:`ShardReads.tasks`)."""
        return json.dumps([{**read.shard.to_dict(), "only": _sorted(read.only)} for read in self.reads])

    @classmethod
    def from_json(cls, text: str) -> ReadTask:
        return cls(tuple(ShardReads.read_of(read) for read in json.loads(text)))


SHARD_SCHEMA = pa.schema([("url", pa.string()), ("format", pa.string()), ("size", pa.int64()), ("etag", pa.string())])
READ_SCHEMA = SHARD_SCHEMA.append(pa.field("only", pa.list_(pa.string())))
Item = TypeVar("Item")


class _Rows(Sequence[Item], Generic[Item]):
    """A sequence kept as Arrow columns, about 150 bytes a shard where Python objects take a kilobyte: what lets
    the driver plan millions of shards. Items are made as they are asked for."""

    schema: pa.Schema

    def __init__(self, table: pa.Table) -> None:
        self.table = table.select(self.schema.names).cast(self.schema)

    def _item(self, row: dict[str, Any]) -> Item:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.table.num_rows

    @overload
    def __getitem__(self, index: int) -> Item: ...
    @overload
    def __getitem__(self, index: slice) -> _Rows[Item]: ...
    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError("a step is not supported")
            return type(self)(self.table.slice(start, max(stop - start, 0)))
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return self._item(self.table.slice(index % len(self), 1).to_pylist()[0])

    def __iter__(self) -> Iterator[Item]:
        for batch in self.table.to_batches(max_chunksize=8192):
            yield from map(self._item, batch.to_pylist())

    def among(self, urls: Iterable[str]) -> _Rows[Item]:
        """The items of the shards at ``urls``, in order."""
        return type(self)(self.table.filter(self._at(urls)))

    def without(self, urls: Iterable[str]) -> _Rows[Item]:
        """The items of all but the shards at ``urls``, in order."""
        return type(self)(self.table.filter(pc.invert(self._at(urls))))

    def _at(self, urls: Iterable[str]) -> pa.ChunkedArray:
        return pc.is_in(self.urls, value_set=pa.array(list(urls), pa.string()))

    @property
    def urls(self) -> pa.ChunkedArray:
        return self.table["url"]


class Shards(_Rows[Shard]):
    """Listed shards, sorted by URL."""

    schema = SHARD_SCHEMA

    def _item(self, row: dict[str, Any]) -> Shard:
        return Shard(**row)

    @classmethod
    def of(cls, shards: Iterable[Shard]) -> Shards:
        return cls(pa.Table.from_pylist([shard.to_dict() for shard in shards], SHARD_SCHEMA))

    def whole(self) -> ShardReads:
        """Each shard read whole."""
        return ShardReads(self.table.append_column("only", pa.nulls(len(self), pa.list_(pa.string()))))


class ShardReads(_Rows[ShardRead]):
    """Shards to read, in order: each whole, or only some of its images (``only``)."""

    schema = READ_SCHEMA

    def _item(self, row: dict[str, Any]) -> ShardRead:
        return self.read_of(row)

    @staticmethod
    def read_of(row: dict[str, Any]) -> ShardRead:
        return ShardRead(Shard.from_record(row), None if row["only"] is None else frozenset(row["only"]))

    @classmethod
    def of(cls, reads: Iterable[ShardRead]) -> ShardReads:
        rows = [{**read.shard.to_dict(), "only": _sorted(read.only)} for read in reads]
        return cls(pa.Table.from_pylist(rows, READ_SCHEMA))

    def tasks(self, files_per_task: int) -> list[str]:
        """The read tasks (:meth:`ReadTask.to_json`): one per container shard, and single image files grouped
        ``files_per_task`` at a time, each task where its last shard is (a group of fewer files last). Grouped as
        Arrow columns and written a task at a time: a plan holds millions of shards."""
        if not len(self):
            return []
        images = np.flatnonzero(self.table["format"].to_numpy(zero_copy_only=False) == "images")
        group = np.arange(len(images)) // files_per_task
        full = (group + 1) * files_per_task <= len(images)
        last = np.minimum((group + 1) * files_per_task, len(images)) - 1  # the group's last file, among the files
        position = np.arange(len(self))
        task_at = position.copy()
        task_at[images] = np.where(full, images[last], len(self))
        order = np.lexsort((position, task_at))
        rows = self.table.take(order)
        starts = np.flatnonzero(np.r_[True, task_at[order][1:] != task_at[order][:-1]])
        ends = np.r_[starts[1:], len(self)]
        return [json.dumps(rows.slice(start, end - start).to_pylist()) for start, end in zip(starts, ends, strict=True)]


def _sorted(only: frozenset[str] | None) -> list[str] | None:
    return None if only is None else sorted(only)


@dataclass(frozen=True)
class Skip:
    """An entry of a shard that is not an image (a tar member ``0001.json``): counted by reason, not a row."""

    name: str
    reason: str


@dataclass(frozen=True)
class Listing:
    """The shards to read, sorted, and the tally of every object the listing saw."""

    shards: Shards
    tally: Tally


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


def skip_reason(relative: str, format: str = "auto") -> str | None:
    """Why a file at ``relative`` (its path below the input's root) is not a shard of ``format``, or None.

    Under ``auto`` a file is a shard when a layout claims its name. With a format named, so is any file whose name
    no layout claims and that is not a sidecar: TFRecords carry no fixed extension, and ``format: images`` reads
    such files by their bytes.
    """
    *folders, name = relative.strip("/").split("/")
    if any(part.startswith(".") for part in (*folders, name)):
        return "hidden"
    if any(folder.startswith("_") for folder in folders):
        return "metadata"
    claimed = format_of(name)
    if claimed is not None:
        return None if format in ("auto", claimed) else "other layout"
    if name in METADATA_FILES or name.startswith("_"):
        return "metadata"
    if name.lower().endswith(SIDECAR_EXTENSIONS):
        return "sidecar"
    return "not an image" if format == "auto" else None


LISTING_THREADS = 32  # prefixes listed at once on a remote store


def find_files(fs: fsspec.AbstractFileSystem, root: str, depth: int = 3) -> Iterator[list[dict]]:
    """Every file under ``root``, with its details, a folder at a time: the caller keeps what it needs of each
    folder, never a bucket's worth of details at once. On a remote store the folders under ``root`` are listed side
    by side (an object store lists one prefix 1,000 keys per request, one request after another): where there is a
    single folder, the ones below it, ``depth`` levels down at most. Each request is retried on its own."""
    if is_local(fs):
        for _, _, files in fs.walk(root, detail=True):
            yield list(files.values())
        return
    if depth == 0:
        yield list(with_retries(lambda: fs.find(root, detail=True)).values())
        return
    entries = with_retries(lambda: fs.ls(root, detail=True))
    yield [entry for entry in entries if entry["type"] != "directory"]
    folders = [entry["name"] for entry in entries if entry["type"] == "directory" and entry["name"] != root]
    if len(folders) == 1:
        yield from find_files(fs, folders[0], depth - 1)
    elif folders:
        with ThreadPoolExecutor(min(LISTING_THREADS, len(folders))) as pool:
            yield from pool.map(
                lambda folder: list(with_retries(lambda: fs.find(folder, detail=True)).values()), folders
            )


def list_shards(url: str, format: str = "auto", storage_options: dict | None = None) -> Listing:
    """Every shard under a prefix (recursively) or matching a glob, sorted, and a tally of what was skipped and why.

    A URL that names one file with ``format`` set is that shard, whatever its name. The listing is kept as Arrow
    columns, a folder at a time as it comes (:class:`Shards`).
    """
    try:
        # No listings cache: a long-lived process lists a growing bucket afresh, and holds no copy of the listing.
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}), use_listings_cache=False)
        if has_magic(root):
            one_file, found = False, [list(with_retries(lambda: fs.glob(root, detail=True)).values())]
            root = glob_root(root)
        elif with_retries(lambda: fs.isdir(root)):
            one_file, found = False, find_files(fs, root)
        elif with_retries(lambda: fs.exists(root)):
            one_file, found = True, [[with_retries(lambda: fs.info(root))]]
            root = root.rsplit("/", 1)[0]
        else:
            raise InputError(f"input.url: nothing found at {url}")
        shards, formats, tally = _classify(fs, root, found, format, one_file)
    except InputError:
        raise
    except Exception as error:
        raise InputError(f"input.url: cannot list {url}: {error}") from error
    if not shards:
        wanted = "images or shards" if format == "auto" else f"{format} shards"
        skipped = f" (skipped {tally.describe_skipped()})" if tally.skipped else ""
        raise InputError(f"input.url: no {wanted} found at {url}{skipped}")
    if len(formats) > 1:
        raise InputError(f"input.url: {url} mixes layouts ({', '.join(sorted(formats))}); set input.format")
    return Listing(shards, tally)


def _classify(
    fs: fsspec.AbstractFileSystem, root: str, found: Iterable[list[dict]], format: str, one_file: bool
) -> tuple[Shards, set[str], Tally]:
    """The shards among the files found (a batch at a time), the layouts they are of, and the tally of the rest."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    chunks, formats, tally = [SHARD_SCHEMA.empty_table()], set(), Tally()
    for infos in found:
        urls, layouts, sizes, etags = [], [], [], []
        for info in infos:
            if info.get("type") == "directory":
                continue
            path = info["name"]
            relative = path[len(root) :] if path.startswith(root) else path
            named = one_file and (format != "auto" or format_of(path) is not None)  # asked for by name: read it
            reason = None if named else skip_reason(relative, format)
            if reason is not None:
                tally.skip(reason, relative.strip("/"))
                continue
            layout = format if format != "auto" else format_of(path)
            formats.add(layout)
            tally.keep()
            urls.append(_unstrip(fs, protocol, path))
            layouts.append(layout)
            sizes.append(info.get("size"))
            etags.append(version_of(info))
        chunks.append(pa.table([urls, layouts, sizes, etags], schema=SHARD_SCHEMA))
    return Shards(pa.concat_tables(chunks).sort_by("url")), formats, tally


def check_columns(shards: Sequence[Shard], options: dict[str, Any]) -> None:
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
    shard: Shard,
    options: dict[str, Any],
    only: set[str] | None = None,
    attempts: int = ATTEMPTS,
    tally: Tally | None = None,
) -> Iterator[Record]:
    """The records of one shard (those whose ``image_id`` is in ``only``, when given), each with an id unique in it.

    A transient storage error (503, reset connection, timeout) restarts the read after a backoff, skipping the
    records already delivered, so a flaky store costs time, never rows. A shard that still cannot be read yields
    one error record that names it and says why: ``<url>#unreadable`` (or the image's own id for an image file).

    A key that repeats within the shard (two tar members of one name, two TFRecords of one ``image/filename``)
    is given its position, ``<id>~<position>``: the same shard read again gives the same ids. ``tally`` counts the
    records delivered, the entries skipped by reason (a read of only some ids counts just those) and the renames.
    """
    reader = READERS[shard.format]
    tally = tally if tally is not None else Tally()
    # A reader may skip the costly part (fetching an image from its path) of records no id in ``only`` can be.
    reader_options = options if only is None else {**options, "wanted": _could_be_one_of(only)}
    fs, path = fsspec.core.url_to_fs(shard.url, **options.get("storage_options", {}))
    delivered = 0
    ids: set[str] = set()
    for attempt in range(1, attempts + 1):
        try:
            for index, item in enumerate(reader.read(fs, path, shard.url, reader_options)):
                if index < delivered:
                    continue
                delivered += 1
                if isinstance(item, Skip):
                    if only is None:
                        tally.skip(item.reason, f"{shard.url}#{item.name}" if item.name else shard.url)
                    continue
                if item.image_id in ids:
                    tally.renamed.add(item.image_id)
                    item = replace(item, image_id=_unique(f"{item.image_id}~{index}", ids))
                ids.add(item.image_id)
                if only is None or item.image_id in only:
                    tally.keep()
                    yield item
            return
        except Exception as error:
            if is_transient(error) and attempt < attempts:
                time.sleep(backoff(attempt))
                continue
            # The rest of the shard is lost; say so in a row rather than kill the job.
            what = "file" if shard.format == "images" else "shard"
            retried = f" (after {attempt} attempts)" if attempt > 1 else ""
            reason = f"unreadable {what}: {type(error).__name__}: {error}{retried}"
            tally.keep()
            yield Record(unreadable_id(shard), shard.url, None, reason)
            return


def _could_be_one_of(ids: set[str]) -> Callable[[str], bool]:
    """Whether a record read with this id may be delivered as one of ``ids`` (itself, or renamed ``<id>~...``)."""
    stems = set(ids) | {image_id[:at] for image_id in ids for at, char in enumerate(image_id) if char == "~"}
    return stems.__contains__


def _unique(image_id: str, taken: set[str]) -> str:
    """``image_id``, or if even that is taken (a key that itself ends in ``~<n>``), with more suffixes."""
    while image_id in taken:
        image_id += "~"
    return image_id


def unreadable_id(shard: Shard) -> str:
    """The row that stands for a shard that could not be read: the image itself, or ``<url>#unreadable``."""
    return shard.url if shard.format == "images" else f"{shard.url}#unreadable"
