"""Runs on an output location: ids, leases, staging, progress records, the commit protocol, and recovery.

Layout under the output URL::

    _staging/<run>/                       a run at work; invisible (paths starting with _ are skipped by readers)
        _lease.json                       who is running it (host, pid) and when it last said so (heartbeat)
        _progress/<task>.json             rows each finished shard gave: how a rerun tells done shards from half ones
        *.parquet                         rows written so far
        _commit.json                      the finished run's manifest: written when its content is final
    predictions/run-<run>/part-NNNNN.parquet   the rows of committed runs
    _runs/<run>.shards.parquet            the shards a committed run processed (url, etag, size, rows)
    _runs/<run>.json                      the manifest: THE commit. A run is visible when, and only when, this exists

Commit, in order: the shards table, then ``_commit.json`` (from here on the run's content is decided), then each
file is moved under ``predictions/``, then the manifest is written in one piece (a PUT, or a rename on local disk),
then staging is removed. A driver that dies in the middle leaves ``_commit.json`` behind; the next run on the output
finds it and finishes the commit (roll forward). A driver that dies earlier leaves a staging folder with its
progress, which the next run with the same work adopts (:mod:`pipeline.incremental`). Readers go by manifests
(:func:`committed_files`, :mod:`pipeline.query`), so files moved but not yet committed are never read.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.manifest import Manifest
from pipeline.storage import is_local, read_json, with_retries, write_bytes, write_json

PREDICTIONS = "predictions"
RUNS = "_runs"
STAGING = "_staging"
LEASE = "_lease.json"
PROGRESS = "_progress"
INTENT = "_commit.json"

HEARTBEAT_SECONDS = 30.0
LEASE_SECONDS = 300.0  # a lease not renewed for this long belongs to a dead driver

SHARDS_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("format", pa.string()),
        ("size", pa.int64()),
        ("etag", pa.string()),
        ("rows", pa.int64()),
        ("partial", pa.bool_()),  # only some of its images were read (retrying failed ones)
    ]
)


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

    def progress_record(self, run_id: str, name: str) -> str:
        return self.path(STAGING, run_id, PROGRESS, f"{name}.json")

    def manifest_path(self, run_id: str) -> str:
        return self.path(RUNS, f"{run_id}.json")

    def shards_path(self, run_id: str) -> str:
        return self.path(RUNS, f"{run_id}.shards.parquet")

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


# --- staged output ---


@dataclass(frozen=True)
class StagedFile:
    """One file a run wrote into its staging folder, described as it was written (never read back)."""

    path: str  # inside the output's filesystem
    rows: int
    ok: int
    fingerprints: tuple[str, ...]  # of the weights that labelled its rows

    @classmethod
    def of(cls, path: str, table: pa.Table) -> StagedFile:
        ok = pc.sum(pc.equal(table.column("status"), "ok")).as_py() or 0
        fingerprints = pc.unique(table.column("model_fingerprint").drop_null()).to_pylist()
        return cls(path, table.num_rows, ok, tuple(sorted(fingerprints)))


@dataclass(frozen=True)
class StagedOutput:
    files: list[str]
    rows: int
    ok: int
    error: int
    fingerprints: list[str]  # of the weights the actors used: one, unless something went wrong

    @classmethod
    def of(cls, files: Iterable[StagedFile]) -> StagedOutput:
        files = sorted(files, key=lambda file: file.path)
        rows, ok = sum(f.rows for f in files), sum(f.ok for f in files)
        fingerprints = sorted({fingerprint for f in files for fingerprint in f.fingerprints})
        return cls([f.path for f in files], rows, ok, rows - ok, fingerprints)


def staged_files(location: OutputLocation, run_id: str) -> list[str]:
    return location.find(location.staging(run_id), ".parquet")


def write_staged(location: OutputLocation, run_id: str, name: str, table: pa.Table) -> StagedFile:
    """Write ``table`` as the Parquet file ``name`` of the run's staging folder (whole, or not at all)."""
    sink = pa.BufferOutputStream()
    # zstd: embeddings take about 0.8x the bytes snappy leaves, float16-rounded ones 0.75x (benchmarks/delta).
    pq.write_table(table, sink, compression="zstd")
    path = location.staging(run_id, name)
    write_bytes(location.fs, path, sink.getvalue().to_pybytes())
    return StagedFile.of(path, table)


def read_table(fs: fsspec.AbstractFileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


# --- commit ---


def commit(
    location: OutputLocation,
    run_id: str,
    staged: StagedOutput,
    manifest: Manifest,
    shards: Iterable[dict[str, Any]],
    replaces: Iterable[str] = (),
) -> str:
    """Make a run visible, all of it at once. ``replaces``: staging folders of crashed runs this one adopted.

    Returns the manifest URL.
    """
    fs = location.fs
    moves = [
        (path, location.path(PREDICTIONS, f"run-{run_id}", f"part-{index:05d}.parquet"))
        for index, path in enumerate(staged.files)
    ]
    table = pa.Table.from_pylist([{name: s.get(name) for name in SHARDS_SCHEMA.names} for s in shards], SHARDS_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes(fs, location.shards_path(run_id), sink.getvalue().to_pybytes())
    committed = replace(
        manifest,
        committed_at=_now(),
        files=[target[len(location.root) + 1 :] for _, target in moves],
        shards_file=location.shards_path(run_id)[len(location.root) + 1 :],
        replaces=sorted(set(replaces)),
    )
    intent = {**committed.to_json(), "moves": [[source, target] for source, target in moves]}
    write_json(fs, location.path(STAGING, run_id, INTENT), intent)
    return finish_commit(location, intent)


def finish_commit(location: OutputLocation, intent: dict[str, Any]) -> str:
    """Steps after the point of no return; each may be repeated, so a commit cut short can be finished later."""
    fs, run_id = location.fs, intent["run_id"]
    for source, target in intent["moves"]:
        if location.exists(source):
            if is_local(fs):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.replace(source, target)
            else:
                with_retries(lambda source=source, target=target: fs.mv(source, target))
        elif not location.exists(target):
            raise RuntimeError(f"cannot finish the commit of run {run_id}: {source} is gone")
    manifest = Manifest.from_json(intent)
    write_json(fs, location.manifest_path(run_id), manifest.to_json())
    for staging_run in [run_id, *manifest.replaces]:
        discard(location, staging_run)
    return location.url(RUNS, f"{run_id}.json")


def discard(location: OutputLocation, run_id: str) -> None:
    """Remove a run's staging folder (and ``_staging`` itself once no run is using it)."""
    fs, staging = location.fs, location.staging(run_id)
    if location.exists(staging):
        with_retries(lambda: fs.rm(staging, recursive=True) if fs.exists(staging) else None)
    parent = location.path(STAGING)
    try:
        if is_local(fs) and os.path.isdir(parent) and not os.listdir(parent):
            os.rmdir(parent)
    except OSError:
        pass  # another run created its staging folder meanwhile


# --- recovery ---


@dataclass(frozen=True)
class CrashedRun:
    run_id: str
    key: str | None  # the work key it ran with (None: it died before saying)


def recover(location: OutputLocation) -> list[CrashedRun]:
    """Clean up after dead drivers; returns the crashed runs whose progress can be adopted, newest first.

    A dead run that had decided its content (``_commit.json``) is committed now. Files under ``predictions/`` that
    no manifest names and no live run is committing are removed.
    """
    crashed: list[CrashedRun] = []
    live: set[str] = set()
    for folder in location.list(location.path(STAGING)):
        run_id = folder.rstrip("/").rsplit("/", 1)[-1]
        lease = read_lease(location, run_id)
        if not lease_expired(lease):
            live.add(run_id)
            continue
        intent_path = location.path(STAGING, run_id, INTENT)
        if location.exists(intent_path):
            finish_commit(location, read_json(location.fs, intent_path))
        else:
            crashed.append(CrashedRun(run_id, (lease or {}).get("key")))
    committed = {m.run_id for m in read_manifests(location)}
    for folder in location.list(location.path(PREDICTIONS)):
        run_id = folder.rstrip("/").rsplit("/", 1)[-1].removeprefix("run-")
        if run_id not in committed and run_id not in live:
            with_retries(lambda folder=folder: location.fs.rm(folder, recursive=True))
    return sorted(crashed, key=lambda run: run.run_id, reverse=True)


# --- reading committed runs ---


def read_manifests(location: OutputLocation) -> list[Manifest]:
    """Manifests of committed runs, in commit order."""
    paths = [p for p in location.list(location.path(RUNS)) if p.endswith(".json")]
    contents = with_retries(lambda: location.fs.cat(paths)) if paths else {}
    manifests = [Manifest.from_json(json.loads(data)) for data in contents.values()]
    return sorted(manifests, key=lambda m: m.commit_order)


def committed_files(url: str, storage_options: dict | None = None) -> list[str]:
    """Every committed Parquet file under an output (local paths, or URLs): all that readers should read.

    For a pyarrow dataset over them (with the same filesystem options) use :func:`pipeline.query.dataset`.
    """
    location = OutputLocation.open(url, storage_options)
    paths = committed_paths(location, read_manifests(location))
    return paths if is_local(location.fs) else [location.fs.unstrip_protocol(path) for path in paths]


def committed_paths(location: OutputLocation, manifests: list[Manifest]) -> list[str]:
    """The data files the given manifests commit, as paths inside the location's filesystem."""
    return [location.path(relative) for manifest in manifests for relative in manifest.files]


def read_shards(location: OutputLocation, manifests: list[Manifest]) -> pa.Table:
    """The shards tables of the given committed runs, with ``run_id`` added (empty table when there are none)."""
    tables = []
    for manifest in manifests:
        if manifest.shards_file is None:
            continue
        path = location.path(manifest.shards_file)
        table = with_retries(lambda path=path: read_table(location.fs, path)).cast(SHARDS_SCHEMA)
        tables.append(table.append_column("run_id", pa.array([manifest.run_id] * table.num_rows, pa.string())))
    if not tables:
        return SHARDS_SCHEMA.append(pa.field("run_id", pa.string())).empty_table()
    return pa.concat_tables(tables)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()
