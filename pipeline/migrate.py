"""``resnet-pipeline migrate``: an output written before its tables were Delta Lake tables, converted in place.

The old format: a run was committed by its manifest, ``_runs/<run>.json`` (files relative to the output, its shards
file ``_runs/<run>.shards.parquet``, ``committed_at``); its rows were ``predictions/run-<run>/part-NNNNN.parquet``,
files WITH a ``run_id`` column and the embedding a ``fixed_size_list<float32>[D]`` (``float16`` values, Parquet's
FLOAT16, before float16 meant rounded float32). Readers took the committed runs in the order of ``committed_at``
then run id, and computed ``latest`` from the shards files.

Each old run is committed again, in that order, with the run's own id and manifest, through
:func:`pipeline.tables.commit`: its files rewritten in the new file schema (no ``run_id``, the embedding a
``list<float32>``) as ``predictions/run_id=<run>/migrated-NNNNN.parquet``, its shards rows with its work key. As every
commit merges into ``latest`` in commit order, ``latest`` ends up as the old view computed it (a shard read whole
replaces older rows of that shard, a retry's partial shards replace only their images).

Resumable and idempotent: a run whose ``runs`` row exists is skipped, one whose commit was cut short after its
intent is finished (:func:`pipeline.tables.finish_commit`), the others are migrated from their old files. The
migration removes nothing before every run is committed (the new files live in other folders than the old ones);
then the old part files, shards files and manifests go (the manifests last: while one is left, the output is refused
as old and migrating again finishes the job).

A driver of the old code that died inside its commit left its intent, ``_staging/<run>/_commit.json`` with the file
moves: the old code rolled it forward at its next run, and so does the migration (the run is migrated from wherever
its files are). Old staging folders of crashed runs, which the new code cannot adopt, are removed with the rest.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import tables
from pipeline.manifest import Manifest
from pipeline.runs import (
    FILES,
    LEGACY_MANIFESTS,
    PREDICTIONS,
    RUNS,
    STAGING,
    OutputLocation,
    StagedOutput,
    lease_expired,
    read_intent,
    read_lease,
    staged_files,
    staging_runs,
    write_data_file,
)
from pipeline.sink import file_schema
from pipeline.storage import is_local, read_json, with_retries

SHARDS_SUFFIX = ".shards.parquet"
SHARD_COLUMNS = ("url", "format", "size", "etag", "rows", "partial")


class NotAnOutput(ValueError):
    """Neither an output of the old format nor a Delta Lake one."""


class AlreadyDelta(ValueError):
    """The output's tables are Delta Lake tables already, and nothing of the old format is left."""


class MigrationError(RuntimeError):
    """The migration cannot go on (a run at work on the output, an old data file missing or unreadable). The runs
    committed so far stay committed, the others keep their old files: migrating again resumes."""


@dataclass(frozen=True)
class LegacyRun:
    """One old run: from its manifest, or from the old code's intent where its driver died inside its commit."""

    manifest: dict[str, Any]  # the manifest document, as the old code wrote it
    files: tuple[str, ...]  # its data files: paths inside the output's filesystem
    shards_file: str | None  # path inside the output's filesystem
    pending: bool = False  # a migration's commit of it was cut short after its intent: finish that one

    @property
    def run_id(self) -> str:
        return self.manifest["run_id"]

    @property
    def order(self) -> tuple[str, str]:
        """The old commit order: committed_at, then run id (as the old ``Manifest.commit_order``)."""
        return self.manifest.get("committed_at") or self.manifest.get("finished_at") or "", self.run_id


@dataclass
class Summary:
    output: str
    runs: int = 0
    migrated: list[str] = field(default_factory=list)  # committed by this migration (or would be: dry run)
    finished: list[str] = field(default_factory=list)  # commits cut short in an earlier try, finished now
    skipped: list[str] = field(default_factory=list)  # committed by an earlier try
    rows: int = 0  # of the runs committed (or to commit) now
    files: int = 0  # old data files rewritten (or to rewrite)
    bytes_before: int = 0  # the old data files that are still there
    bytes_after: int | None = None  # the predictions table's data files (None in a dry run)
    removed: int = 0  # old files removed (or to remove)
    dry_run: bool = False

    def lines(self) -> list[str]:
        verb = "would commit" if self.dry_run else "committed"
        after = "" if self.bytes_after is None else f", {_size(self.bytes_after)} after"
        done = f", {len(self.skipped)} committed before" if self.skipped else ""
        finished = f", {len(self.finished)} cut short and finished" if self.finished else ""
        removed = "would remove" if self.dry_run else "removed"
        return [
            f"{'Dry run: ' if self.dry_run else ''}{self.output}: {self.runs} runs of the old format",
            f"  runs     {len(self.migrated)} {verb} to the Delta tables{finished}{done}",
            f"  rows     {self.rows}",
            f"  bytes    {_size(self.bytes_before)} in {self.files} old data files{after}",
            f"  old      {removed} {self.removed} files (manifests, shards files, part files, staging)",
        ]


def migrate(location: OutputLocation, dry_run: bool = False, say: Callable[[str], None] = lambda line: None) -> Summary:
    """Convert ``location`` from the old format to the Delta tables (see the module docstring); ``say`` gets one
    line per step. Raises :class:`AlreadyDelta`, :class:`NotAnOutput` or :class:`MigrationError`."""
    runs = legacy_runs(location)
    if not runs:
        if tables.is_table(location, PREDICTIONS):
            raise AlreadyDelta(f"{location.url()} is already a Delta Lake output: nothing to migrate")
        raise NotAnOutput(
            f"{location.url()} is not a resnet-pipeline output: no run manifests under {LEGACY_MANIFESTS}/ and no "
            f"Delta table under {PREDICTIONS}/"
        )
    _check_idle(location)
    summary = Summary(location.url(), runs=len(runs), dry_run=dry_run)
    committed = _committed(location)
    if not dry_run:
        tables.ensure_tables(location)
    old_files: set[str] = set()  # the old data files there now (a run's commit removes its own: they count too)
    for run in runs:
        sizes = _sizes(location, run.files)
        old_files.update(sizes)
        summary.bytes_before += sum(sizes.values())
        if run.run_id in committed and not run.pending:
            summary.skipped.append(run.run_id)
            continue
        rows = int((run.manifest.get("counts") or {}).get("rows") or 0)
        summary.rows += rows
        if run.pending:
            summary.finished.append(run.run_id)
            say(f"run {run.run_id}: {'would finish' if dry_run else 'finishing'} its commit cut short")
        else:
            summary.migrated.append(run.run_id)
            summary.files += len(run.files)
            mode = (run.manifest.get("plan") or {}).get("mode", "full")
            verb = "would rewrite" if dry_run else "rewriting"
            say(f"run {run.run_id} ({mode}): {verb} {len(run.files)} data file(s), {rows} rows")
        if not dry_run:
            version = commit_run(location, run)
            say(f"run {run.run_id}: committed at version {version} of {PREDICTIONS}")
            committed.add(run.run_id)
    if dry_run:
        going = _legacy_files(location, runs, active=_active(location))
        summary.removed = len(old_files | {path for path in going if "/migrated-" not in path})  # those get committed
        return summary
    missing = [run.run_id for run in runs if run.run_id not in _committed(location)]
    if missing:  # not expected: every commit above returned; never remove the old files unless all are in
        raise MigrationError(f"runs {', '.join(missing)} are not committed; nothing old was removed, migrate again")
    tables.catch_up_latest(location)
    summary.removed = len(old_files | set(remove_legacy(location, runs)))
    summary.bytes_after = sum(_active(location).values())
    return summary


# --- what there is to migrate ---


def legacy_runs(location: OutputLocation) -> list[LegacyRun]:
    """Every run of the old format on ``location``, in the old commit order: those of its manifests, of old intents
    (drivers that died in their commit), and of a migration's own commits cut short after their intent (pending)."""
    found: dict[str, LegacyRun] = {}
    paths = [p for p in location.list(location.path(LEGACY_MANIFESTS)) if p.endswith(".json")]
    contents = with_retries(lambda: location.fs.cat(paths)) if paths else {}
    for data in contents.values():
        manifest = json.loads(data)
        found[manifest["run_id"]] = LegacyRun(
            manifest,
            tuple(location.path(relative) for relative in manifest.get("files") or []),
            location.path(manifest["shards_file"]) if manifest.get("shards_file") else None,
        )
    for run_id in staging_runs(location):
        try:
            intent = read_intent(location, run_id)
        except ValueError:
            continue  # cut short while written: the old code's commit had not begun
        if intent is None:
            continue
        if "manifest" in intent:  # ours: a migration's commit cut short after its intent
            run = found.get(run_id) or LegacyRun(intent["manifest"], (), None)
            found[run_id] = replace(run, pending=True)
        elif "moves" in intent and run_id not in found:  # the old code's: it died in its commit
            files = tuple(source if location.exists(source) else target for source, target in intent["moves"])
            manifest = {k: v for k, v in intent.items() if k != "moves"}
            shards = location.path(manifest["shards_file"]) if manifest.get("shards_file") else None
            found[run_id] = LegacyRun(manifest, files, shards)
    return sorted(found.values(), key=lambda run: run.order)


def _check_idle(location: OutputLocation) -> None:
    for run_id in staging_runs(location):
        lease = read_lease(location, run_id)
        if not lease_expired(lease):
            raise MigrationError(
                f"run {run_id} is at work on {location.url()} (host {lease.get('host')}, pid {lease.get('pid')}): "
                "migrate once it has ended"
            )


def _committed(location: OutputLocation) -> set[str]:
    """Run ids with a ``runs`` row: committed whole."""
    if not tables.is_table(location, RUNS):
        return set()
    return set(tables.dataset(location, RUNS).to_table(columns=["run_id"]).column("run_id").to_pylist())


# --- one run ---


def commit_run(location: OutputLocation, run: LegacyRun) -> int:
    """Commit one old run to the Delta tables; returns its predictions version."""
    if run.pending:
        intent = read_intent(location, run.run_id)
        if intent is not None and "manifest" in intent:
            return tables.finish_commit(location, intent)
    manifest, shards = Manifest.from_json(run.manifest), legacy_shards(location, run)
    if tables.open_table(location, PREDICTIONS).transaction_version(run.run_id) is not None:
        # Its data files are committed (their commit cannot be redone), its later steps not: finish with the
        # records of the files as written, never writing them again.
        return tables.commit(
            location, run.run_id, StagedOutput.of(staged_files(location, run.run_id)), manifest, shards
        )
    staged = []
    for index, path in enumerate(run.files):
        try:
            table = with_retries(lambda path=path: _read_parquet(location, path))
        except FileNotFoundError:
            raise MigrationError(
                f"run {run.run_id}: its data file {location.fs.unstrip_protocol(path)} is missing"
            ) from None
        except (OSError, pa.ArrowException) as error:
            raise MigrationError(
                f"run {run.run_id}: cannot read its data file {location.fs.unstrip_protocol(path)}: {error}"
            ) from None
        staged.append(write_data_file(location, run.run_id, f"migrated-{index:05d}.parquet", convert(table)))
    return tables.commit(location, run.run_id, StagedOutput.of(staged), manifest, shards)


def convert(table: pa.Table) -> pa.Table:
    """Rows of an old data file in the new file schema: ``run_id`` dropped (the commit's partition value says it),
    the embedding ``list<float32>`` (from a fixed-size list of float32 or float16), a column the file lacks null."""
    schema = file_schema()
    columns = [
        table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def legacy_shards(location: OutputLocation, run: LegacyRun) -> list[dict[str, Any]]:
    """The rows of a run's old shards file, with the run's work key (``partial`` false where the file predates it)."""
    if run.shards_file is None:
        return []
    try:
        rows = with_retries(lambda: _read_parquet(location, run.shards_file)).to_pylist()
    except FileNotFoundError:
        raise MigrationError(f"run {run.run_id}: its shards file {run.shards_file} is missing") from None
    key = (run.manifest.get("model") or {}).get("key")
    return [
        {**{n: row.get(n) for n in SHARD_COLUMNS}, "partial": bool(row.get("partial")), "work_key": key} for row in rows
    ]


def _read_parquet(location: OutputLocation, path: str) -> pa.Table:
    with location.fs.open(path, "rb") as f:
        return pq.read_table(f)


# --- removing the old format ---


def remove_legacy(location: OutputLocation, runs: list[LegacyRun]) -> list[str]:
    """Remove the old files (call once every run is committed): data files no Delta commit holds, old staging,
    shards files, then the manifests and ``_runs/``. Returns what went (a folder's path ends in ``/``)."""
    paths = _legacy_files(location, runs, active=_active(location))
    fs = location.fs
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            if path.endswith("/"):
                with_retries(lambda path=path: fs.rm(path.rstrip("/"), recursive=True))
            else:
                with_retries(lambda path=path: fs.rm(path))
    if is_local(fs):
        for folder in (location.path(LEGACY_MANIFESTS), location.path(STAGING)):
            with contextlib.suppress(OSError):
                os.rmdir(folder)
    return paths


def _legacy_files(location: OutputLocation, runs: list[LegacyRun], active: dict[str, int]) -> list[str]:
    """The old format's files, in the order they may go: data files, dead old staging folders (ending in ``/``),
    shards files, manifests."""
    table = location.path(PREDICTIONS)
    data = set()
    for run in runs:
        data.update(path for path in run.files if path.startswith(table + "/"))
        data.update(location.find(location.path(PREDICTIONS, f"run-{run.run_id}"), ".parquet"))
    data = {path for path in data if path[len(table) + 1 :] not in active and location.exists(path)}
    staging = [location.staging(run_id) + "/" for run_id in staging_runs(location) if _old_staging(location, run_id)]
    legacy = location.list(location.path(LEGACY_MANIFESTS))
    shards = [path for path in legacy if not path.endswith(".json")]
    manifests = [path for path in legacy if path.endswith(".json")]
    return [*sorted(data), *staging, *shards, *manifests]


def _old_staging(location: OutputLocation, run_id: str) -> bool:
    """A staging folder the old code left (a crashed run's, which the new code cannot adopt), its driver dead."""
    if not lease_expired(read_lease(location, run_id)) or location.exists(location.path(STAGING, run_id, FILES)):
        return False
    try:
        intent = read_json(location.fs, location.staging(run_id, "_commit.json"))
    except FileNotFoundError:
        return True
    except ValueError:
        return True  # an old intent cut short while written
    return "manifest" not in intent


def _active(location: OutputLocation) -> dict[str, int]:
    """The predictions table's data files (paths relative to it) and their sizes ({} without a table)."""
    if not tables.is_table(location, PREDICTIONS):
        return {}
    actions = pa.table(tables.open_table(location, PREDICTIONS).get_add_actions(flatten=True))
    return dict(zip(actions.column("path").to_pylist(), actions.column("size_bytes").to_pylist(), strict=True))


def _sizes(location: OutputLocation, paths: tuple[str, ...]) -> dict[str, int]:
    sizes = {}
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            sizes[path] = int(with_retries(lambda path=path: location.fs.size(path)))
    return sizes


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"
