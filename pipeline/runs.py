"""Runs on an output location: ids, staging, commit, and manifests.

Layout under the output URL::

    _staging/<run_id>/...            a run's files while it works (invisible: paths starting with _ are skipped)
    predictions/run-<run_id>/part-00000.parquet ...   committed rows
    _runs/<run_id>.json              the manifest, written last: the commit record
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import fsspec
import pyarrow.compute as pc
import pyarrow.parquet as pq

PREDICTIONS = "predictions"
RUNS = "_runs"
STAGING = "_staging"


def new_run_id(now: datetime | None = None) -> str:
    """Sortable by time, unique across concurrent runs: ``20261129T170855Z-3f9a1c``."""
    now = now or datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class OutputLocation:
    fs: fsspec.AbstractFileSystem
    root: str  # path inside fs, without a trailing slash

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None) -> OutputLocation:
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        return cls(fs, root.rstrip("/"))

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def url(self, *parts: str) -> str:
        return self.fs.unstrip_protocol(self.path(*parts)) if parts else self.fs.unstrip_protocol(self.root)

    def staging(self, run_id: str) -> str:
        return self.path(STAGING, run_id)

    def manifest_path(self, run_id: str) -> str:
        return self.path(RUNS, f"{run_id}.json")


@dataclass(frozen=True)
class StagedOutput:
    files: list[str]
    rows: int
    ok: int
    error: int
    fingerprints: list[str]  # of the weights the actors used: one, unless something went wrong


def inspect_staged(location: OutputLocation, run_id: str) -> StagedOutput:
    """What a run actually wrote, read back from its files (two small columns only)."""
    fs, staging = location.fs, location.staging(run_id)
    files = sorted(p for p in fs.find(staging) if p.endswith(".parquet")) if fs.exists(staging) else []
    rows = ok = 0
    fingerprints: set[str] = set()
    for path in files:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["status", "model_fingerprint"])
        rows += table.num_rows
        ok += pc.sum(pc.equal(table.column("status"), "ok")).as_py() or 0
        fingerprints.update(pc.unique(table.column("model_fingerprint")).to_pylist())
    return StagedOutput(files, rows, ok, rows - ok, sorted(fingerprints))


def commit(location: OutputLocation, run_id: str, staged: StagedOutput, manifest: dict[str, Any]) -> str:
    """Move the staged files under ``predictions/``, then write the manifest (last). Returns the manifest URL."""
    fs = location.fs
    committed = []
    for index, path in enumerate(staged.files):
        target = location.path(PREDICTIONS, f"run-{run_id}", f"part-{index:05d}.parquet")
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.mv(path, target)
        committed.append(target[len(location.root) + 1 :])
    discard(location, run_id)
    manifest = {**manifest, "files": committed}
    fs.makedirs(location.path(RUNS), exist_ok=True)
    with fs.open(location.manifest_path(run_id), "w") as f:
        json.dump(manifest, f, indent=2, default=str)
    return location.url(RUNS, f"{run_id}.json")


def discard(location: OutputLocation, run_id: str) -> None:
    """Remove a run's staging folder (and ``_staging`` itself once no run is using it)."""
    fs, staging = location.fs, location.staging(run_id)
    if fs.exists(staging):
        fs.rm(staging, recursive=True)
    parent = location.path(STAGING)
    try:
        if fs.exists(parent) and not fs.ls(parent):
            fs.rmdir(parent)
    except OSError:
        pass  # another run created its staging folder meanwhile


def read_manifests(location: OutputLocation) -> list[dict[str, Any]]:
    folder = location.path(RUNS)
    if not location.fs.exists(folder):
        return []
    manifests = []
    for path in sorted(location.fs.find(folder)):
        if path.endswith(".json"):
            with location.fs.open(path) as f:
                manifests.append(json.load(f))
    return manifests
