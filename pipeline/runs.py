"""Where a run's files live on an output location, and the run's life before its commit: ids, leases, progress
records, its data files, and its commit intent. The commit itself and everything committed are :mod:`pipeline.tables`.

Layout under the output URL (:class:`OutputLocation` is the only code that names these paths)::

    predictions/                          Delta table: every committed row, one Delta commit per run
        run_id=<run>/part-*.parquet       the data files, written there by the run's write tasks; visible only
                                          once a commit adds them (to this run, or to the run that adopted them)
    latest/                               Delta table: one row per image, its newest committed result
    shards/                               Delta table: the shards each run read (URL, ETag, size, rows, work key)
    runs/                                 Delta table: one row per committed run, with its manifest
    _staging/<run>/                       a run at work (no reader looks here)
        _lease.json                       who is running it (host, pid) and when it last said so (heartbeat)
        _progress/<task>.json             rows each finished shard gave: how a rerun tells done shards from half ones
        _files/<name>.json                each data file written, described (rows, shards, stats): adoption reads
                                          these, never the Parquet files
        _commit.json                      the commit intent: written when the run's content is final; a run that
                                          dies after it is committed by the next run (roll forward)
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.storage import is_local, read_json, with_retries, write_bytes, write_json

PREDICTIONS = "predictions"
LATEST = "latest"
SHARDS = "shards"
RUNS = "runs"
TABLES = (PREDICTIONS, LATEST, SHARDS, RUNS)
STAGING = "_staging"
LEASE = "_lease.json"
PROGRESS = "_progress"
FILES = "_files"
INTENT = "_commit.json"
LEGACY_MANIFESTS = "_runs"  # where outputs written before Delta Lake kept their manifests

HEARTBEAT_SECONDS = 30.0
LEASE_SECONDS = 300.0  # a lease not renewed for this long belongs to a dead driver


def new_run_id(now: datetime | None = None) -> str:
    """Sortable by time, unique across concurrent runs: ``20261129T170855Z-3f9a1c``."""
    import secrets

    now = now or datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class OutputLocation:
    fs: fsspec.AbstractFileSystem
    root: str  # path inside fs, without a trailing slash
    storage_options: dict | None = None

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None) -> OutputLocation:
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        return cls(fs, root.rstrip("/"), storage_options or {})

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def url(self, *parts: str) -> str:
        return self.fs.unstrip_protocol(self.path(*parts)) if parts else self.fs.unstrip_protocol(self.root)

    def staging(self, run_id: str, name: str | None = None) -> str:
        """A run's staging folder, or the file ``name`` in it."""
        return self.path(STAGING, run_id, name) if name else self.path(STAGING, run_id)

    def table(self, name: str) -> str:
        """The URL of one of the output's Delta tables, as delta-rs takes it (a plain path on local disk)."""
        return self.path(name) if is_local(self.fs) else self.url(name)

    @property
    def delta_options(self) -> dict[str, str]:
        """The output's fsspec storage options, said the way delta-rs (object_store) takes them."""
        from pipeline.storage import delta_storage_options

        # The filesystem's own options include those fsspec's configuration gave it (FSSPEC_S3, for example).
        return delta_storage_options(self.fs, {**self.fs.storage_options, **(self.storage_options or {})})

    def log_entry(self, table: str, version: int) -> str:
        """The Delta log file of a table's commit ``version``."""
        return self.path(table, "_delta_log", f"{version:020d}.json")

    def adoption_records(self, run_id: str, crashed: str) -> list[str]:
        """The records a run keeps of what it adopted from ``crashed`` (shards, files): see pipeline.incremental."""
        return [self.progress_record(run_id, f"adopted-{crashed}"), self.files_record(run_id, f"adopted-{crashed}")]

    def progress_record(self, run_id: str, name: str) -> str:
        return self.path(STAGING, run_id, PROGRESS, f"{name}.json")

    def files_record(self, run_id: str, name: str) -> str:
        return self.path(STAGING, run_id, FILES, f"{name}.json")

    def progress(self, run_id: str) -> dict[str, Any]:
        """What a worker needs to record progress for this run (plain data: it travels to Ray workers)."""
        return {"url": self.url(STAGING, run_id, PROGRESS), "storage_options": self.storage_options}

    def exists(self, path: str) -> bool:
        return with_retries(lambda: self.fs.exists(path))

    def list(self, folder: str) -> list[str]:
        """Paths directly under ``folder`` ([] when it does not exist), fresh from the store."""

        def listing() -> list[str]:
            self.fs.invalidate_cache(folder)
            try:
                return sorted(self.fs.ls(folder, detail=False))
            except FileNotFoundError:
                return []

        return with_retries(listing)

    def find(self, folder: str, suffix: str = "") -> list[str]:
        def listing() -> list[str]:
            self.fs.invalidate_cache(folder)
            try:
                return sorted(p for p in self.fs.find(folder) if p.endswith(suffix))
            except FileNotFoundError:
                return []

        return with_retries(listing)


# --- leases: is the driver of a staging folder still alive? ---


class Lease:
    """Says, every ``HEARTBEAT_SECONDS``, that this process is still running ``run_id``."""

    def __init__(self, location: OutputLocation, run_id: str, key: str):
        self.location, self.path = location, location.path(STAGING, run_id, LEASE)
        self.document = {
            "run_id": run_id,
            "key": key,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": _now(),
        }
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{run_id}", daemon=True)

    def __enter__(self) -> Lease:
        self._write()
        self._thread.start()
        return self

    def __exit__(self, kind: type | None, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if kind is not None and self.location.exists(self.path):
            # Left for a rerun to adopt: say the run is over, so that a rerun in this same process (where the pid
            # still lives) need not wait for the lease to go stale.
            with contextlib.suppress(Exception):
                write_json(self.location.fs, self.path, {**self.document, "heartbeat_at": _now(), "ended_at": _now()})

    def _write(self) -> None:
        write_json(self.location.fs, self.path, {**self.document, "heartbeat_at": _now()})

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(Exception):  # a missed beat: the next one retries; the lease has minutes of slack
                self._write()


def lease_expired(document: dict | None, now: datetime | None = None) -> bool:
    """True when the driver holding the lease is known dead or done: it said it ended, its process is gone (same
    host), or it went silent."""
    if not document or document.get("ended_at"):
        return True
    now = now or datetime.now(timezone.utc)
    if document.get("host") == socket.gethostname() and not _process_alive(int(document.get("pid", 0))):
        return True
    heartbeat = datetime.fromisoformat(document.get("heartbeat_at") or document["started_at"])
    return now - heartbeat > timedelta(seconds=LEASE_SECONDS)


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_lease(location: OutputLocation, run_id: str) -> dict | None:
    try:
        return read_json(location.fs, location.path(STAGING, run_id, LEASE))
    except (FileNotFoundError, ValueError):
        return None


# --- progress: which shards a run has finished reading ---


def record_progress(progress: dict[str, Any], task_key: str, shards: list[dict[str, Any]]) -> None:
    """Called by a read task when all its shards are read: how many rows each one gave."""
    fs, folder = fsspec.core.url_to_fs(progress["url"], **(progress.get("storage_options") or {}))
    write_bytes(fs, f"{folder.rstrip('/')}/{task_key}.json", json.dumps(shards).encode())


def read_progress(location: OutputLocation, run_id: str) -> dict[str, dict[str, Any]]:
    """Shard URL -> its progress entry (url, format, size, etag, rows, partial) for every shard the run finished."""
    paths = location.find(location.path(STAGING, run_id, PROGRESS), ".json")
    contents = with_retries(lambda: location.fs.cat(paths)) if paths else {}
    entries: dict[str, dict[str, Any]] = {}
    for data in contents.values():
        for entry in json.loads(data):
            entries[entry["url"]] = entry
    return entries


# --- data files ---


@dataclass(frozen=True)
class StagedFile:
    """One data file a run wrote, described as it was written (never read back): what its commit needs (the
    Delta ``add``: path, size, stats) and what adoption needs (rows per shard)."""

    path: str  # relative to the predictions table: run_id=<run>/part-....parquet
    size: int
    rows: int
    ok: int
    fingerprints: tuple[str, ...]  # of the weights that labelled its rows
    sources: tuple[tuple[str, int], ...]  # (shard URL, rows) for every shard with rows in the file
    stats: str  # Delta statistics (JSON): row count, min, max and nulls of the flat columns

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "sources": [list(pair) for pair in self.sources]}

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> StagedFile:
        return cls(
            **{
                **document,
                "fingerprints": tuple(document["fingerprints"]),
                "sources": tuple((url, rows) for url, rows in document["sources"]),
            }
        )


@dataclass(frozen=True)
class StagedOutput:
    files: list[StagedFile]
    rows: int
    ok: int
    error: int
    fingerprints: list[str]  # of the weights the actors used: one, unless something went wrong

    @classmethod
    def of(cls, files: Iterable[StagedFile]) -> StagedOutput:
        files = sorted(files, key=lambda file: file.path)
        rows, ok = sum(f.rows for f in files), sum(f.ok for f in files)
        fingerprints = sorted({fingerprint for f in files for fingerprint in f.fingerprints})
        return cls(files, rows, ok, rows - ok, fingerprints)


def write_data_file(location: OutputLocation, run_id: str, name: str, table: pa.Table) -> StagedFile:
    """Write ``table`` (rows of the output schema) as the data file ``name`` of run ``run_id``, whole or not at all,
    then its record in the run's staging. The file holds every column but ``run_id``: a Delta partition value says
    which run committed it (so a run that adopts the file needs no copy)."""
    from pipeline.sink import file_schema

    table = table.select(file_schema().names).cast(file_schema())
    sink = pa.BufferOutputStream()
    # zstd: embeddings take about 0.8x the bytes snappy leaves, float16-rounded ones 0.75x (benchmarks/delta).
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue().to_pybytes()
    write_bytes(location.fs, location.path(PREDICTIONS, data_file(run_id, name)), data)
    file = describe(data_file(run_id, name), len(data), table)
    record_files(location, run_id, name, [file])
    return file


def data_file(run_id: str, name: str) -> str:
    """A data file's path inside the predictions table."""
    return f"{data_folder(run_id)}/{name}"


def data_folder(run_id: str) -> str:
    """The folder of the data files a run writes, named Hive-style (``run_id=<run>``): the Delta log says which run
    committed a file, and readers that take partition values from paths instead (Polars' own reader) agree, but
    for files a rerun adopted, where the path names the run that wrote them."""
    return f"run_id={run_id}"


def describe(path: str, size: int, table: pa.Table) -> StagedFile:
    ok = pc.sum(pc.equal(table.column("status"), "ok")).as_py() or 0
    fingerprints = pc.unique(table.column("model_fingerprint").drop_null()).to_pylist()
    sources = {item["values"]: item["counts"] for item in pc.value_counts(table.column("source")).to_pylist()}
    return StagedFile(
        path=path,
        size=size,
        rows=table.num_rows,
        ok=ok,
        fingerprints=tuple(sorted(fingerprints)),
        sources=tuple(sorted(sources.items())),
        stats=json.dumps(file_stats(table)),
    )


def file_stats(table: pa.Table) -> dict[str, Any]:
    """Delta statistics of a table, exact: computed from the rows, for the string and integer columns (those an
    engine prunes files by: ids, sources, labels, status). Timestamps and floats are left out, as Delta allows."""
    stats: dict[str, Any] = {"numRecords": table.num_rows, "minValues": {}, "maxValues": {}, "nullCount": {}}
    for field in table.schema:
        if not (pa.types.is_string(field.type) or pa.types.is_integer(field.type)):
            continue
        column = table.column(field.name)
        stats["nullCount"][field.name] = column.null_count
        bounds = pc.min_max(column).as_py()
        if bounds["min"] is not None:
            stats["minValues"][field.name], stats["maxValues"][field.name] = bounds["min"], bounds["max"]
    return stats


def record_files(location: OutputLocation, run_id: str, name: str, files: list[StagedFile]) -> None:
    write_bytes(location.fs, location.files_record(run_id, name), _dumps([f.to_json() for f in files]))


def record_adoption(
    location: OutputLocation, run_id: str, crashed: str, shards: list[dict[str, Any]], files: list[StagedFile]
) -> None:
    """What a run took over from ``crashed``, recorded like its own progress and files (a crash of this run can be
    adopted in turn)."""
    write_bytes(location.fs, location.progress_record(run_id, f"adopted-{crashed}"), _dumps(shards))
    record_files(location, run_id, f"adopted-{crashed}", files)


def staged_files(location: OutputLocation, run_id: str) -> list[StagedFile]:
    """Every data file a run recorded (a file without a record was cut short and is not the run's)."""
    paths = location.find(location.path(STAGING, run_id, FILES), ".json")
    contents = with_retries(lambda: location.fs.cat(paths)) if paths else {}
    return sorted(
        (StagedFile.from_json(item) for data in contents.values() for item in json.loads(data)), key=lambda f: f.path
    )


# --- the commit intent ---


def write_intent(location: OutputLocation, run_id: str, intent: dict[str, Any]) -> None:
    write_bytes(location.fs, location.path(STAGING, run_id, INTENT), _dumps(intent))


def remove_intent(location: OutputLocation, run_id: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        with_retries(lambda: location.fs.rm(location.path(STAGING, run_id, INTENT)))


def read_intent(location: OutputLocation, run_id: str) -> dict[str, Any] | None:
    try:
        return read_json(location.fs, location.path(STAGING, run_id, INTENT))
    except FileNotFoundError:
        return None


def discard(location: OutputLocation, run_id: str, keep: Iterable[str] = ()) -> None:
    """Remove a run's staging folder and its data files, but those in ``keep`` (paths inside the predictions table:
    committed ones). ``_staging`` itself goes once no run is using it."""
    fs, keep = location.fs, set(keep)
    folder = location.path(PREDICTIONS, data_folder(run_id))
    for path in location.find(folder):
        if path[len(location.path(PREDICTIONS)) + 1 :] not in keep:
            with_retries(lambda path=path: fs.rm(path) if fs.exists(path) else None)
    if is_local(fs) and os.path.isdir(folder) and not os.listdir(folder):
        with contextlib.suppress(OSError):
            os.rmdir(folder)
    staging = location.staging(run_id)
    if location.exists(staging):
        with_retries(lambda: fs.rm(staging, recursive=True) if fs.exists(staging) else None)
    parent = location.path(STAGING)
    try:
        if is_local(fs) and os.path.isdir(parent) and not os.listdir(parent):
            os.rmdir(parent)
    except OSError:
        pass  # another run created its staging folder meanwhile


def staging_runs(location: OutputLocation) -> list[str]:
    return [folder.rstrip("/").rsplit("/", 1)[-1] for folder in location.list(location.path(STAGING))]


def data_folders(location: OutputLocation) -> dict[str, str]:
    """Run id -> the folder of its data files, for every run folder under the predictions table."""
    folders = {}
    for folder in location.list(location.path(PREDICTIONS)):
        name = folder.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("run_id="):
            folders[name.removeprefix("run_id=")] = folder
    return folders


def _dumps(document: Any) -> bytes:
    return json.dumps(document).encode()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()
