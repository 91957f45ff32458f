"""The output's Delta Lake tables: a run's commit, finishing one cut short, recovery, ``latest``, and reading.

Four tables (``deltalake``, delta-rs), each at ``<output>/<name>``:

``predictions``  every committed row of every run, partitioned by ``run_id``; one Delta commit per run, which
                 carries the run's manifest in its commit metadata. THE commit: a run is visible when, and only
                 when, this commit exists.
``shards``       the shards each run read (URL, format, ETag, size, rows, whether only some of its images, work key)
``runs``         one row per committed run: the predictions version it committed at, its counts, its manifest
``latest``       one row per image, its newest committed result, merged run by run in commit order

A run commits in this order, each step done at most once (a Delta application transaction per run, checked before
and enforced by Delta's conflict check): its intent in staging (the point of no return), its ``shards`` rows, its
``predictions`` commit, its ``runs`` row, ``latest`` caught up with every predictions commit not yet merged (whoever
committed it), then its staging and unused files are removed, and ``shards`` and ``runs`` (a small file a run) are
compacted once they hold more than :data:`COMPACT_FILES` files. A driver that dies after the intent is finished by the
next run on the output (roll forward); one that dies before leaves staging for a rerun to adopt: the rerun commits the
dead run's finished data files as its own (the run id is a partition value of the commit, not a column of the file).

Shards rows of a run that never reached its predictions commit are not read as committed: readers join them with
``runs``.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import json
import logging
import operator
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, Transaction, WriterProperties, write_deltalake
from deltalake.exceptions import CommitFailedError, TableNotFoundError
from deltalake.transaction import AddAction, RemoveAction

from pipeline.manifest import Manifest
from pipeline.runs import (
    LATEST,
    LEGACY_MANIFESTS,
    PREDICTIONS,
    RUNS,
    SHARDS,
    TABLES,
    OutputLocation,
    StagedFile,
    StagedOutput,
    data_folders,
    discard,
    lease_expired,
    read_intent,
    read_lease,
    remove_intent,
    staging_runs,
    write_intent,
)
from pipeline.sink import output_schema
from pipeline.storage import identifier, literal, with_retries, write_bytes

log = logging.getLogger(__name__)

RUN_KEY = "resnet_pipeline.run_id"  # commit metadata: which run a commit belongs to
MANIFEST_KEY = "resnet_pipeline.manifest"
MERGED = "resnet-pipeline:predictions"  # latest's application transaction: the predictions version merged so far
COMMIT_ATTEMPTS = 10

SHARDS_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("format", pa.string()),
        ("size", pa.int64()),
        ("etag", pa.string()),
        ("rows", pa.int64()),
        ("partial", pa.bool_()),  # only some of its images were read (retrying failed ones)
        ("run_id", pa.string()),
        ("work_key", pa.string()),
    ]
)
RUNS_SCHEMA = pa.schema(
    [
        ("version", pa.int64()),  # of the predictions table: the order runs were committed in
        ("run_id", pa.string()),
        ("name", pa.string()),
        ("mode", pa.string()),
        ("started_at", pa.string()),
        ("committed_at", pa.string()),
        ("wall_seconds", pa.float64()),
        ("rows", pa.int64()),
        ("ok", pa.int64()),
        ("error", pa.int64()),
        ("images_per_second", pa.float64()),
        ("architecture", pa.string()),
        ("weights", pa.string()),
        ("fingerprint", pa.string()),
        ("work_key", pa.string()),
        ("shards_read", pa.int64()),
        ("shards_skipped", pa.int64()),
        ("shards_adopted", pa.int64()),
        ("manifest", pa.string()),  # the whole manifest, JSON
    ]
)
SCHEMAS = {PREDICTIONS: output_schema(), LATEST: output_schema(), SHARDS: SHARDS_SCHEMA, RUNS: RUNS_SCHEMA}
PARTITIONS = {PREDICTIONS: ["run_id"]}
# Table properties: runs' statistics leave out the manifest (its whole JSON as min and max: 7 KB a commit).
PROPERTIES = {RUNS: {"delta.dataSkippingStatsColumns": ",".join(n for n in RUNS_SCHEMA.names if n != "manifest")}}
# shards and runs gain a small file with every run: past this many, a commit compacts them into one (and
# checkpoints), so that planning reads a bounded number of files however long the history.
COMPACT_FILES = 32
ZSTD = WriterProperties(compression="ZSTD")


class LegacyOutputError(ValueError):
    """An output written before its tables were Delta Lake tables; ``resnet-pipeline migrate`` converts it."""


class AdoptionLost(RuntimeError):
    """Another run committed (or gave up) the crashed run whose files this run meant to commit."""


@dataclass(frozen=True)
class CrashedRun:
    run_id: str
    key: str | None  # the work key it ran with (None: it died before saying)


# --- the tables ---


def check_format(location: OutputLocation) -> None:
    """Refuse an output in the format before Delta Lake, in one line that says how to migrate it."""
    if is_legacy(location):
        raise LegacyOutputError(
            f"{location.url()} holds runs written before outputs were Delta Lake tables (manifests under "
            f"{LEGACY_MANIFESTS}/); convert it once with: resnet-pipeline migrate {location.url()}"
        )


def is_legacy(location: OutputLocation) -> bool:
    """Whether old manifests remain: ``migrate`` removes them last, so a migration cut short is refused too."""
    return any(p.endswith(".json") for p in location.list(location.path(LEGACY_MANIFESTS)))


def is_table(location: OutputLocation, name: str) -> bool:
    # Not DeltaTable.is_deltatable, which holds the GIL while it waits on the store (every other thread stalls).
    try:
        open_table(location, name)
    except TableNotFoundError:
        return False
    return True


def ensure_tables(location: OutputLocation) -> None:
    """Create the output's tables that do not exist yet (before any run commits: concurrent creates race), and give
    existing ones the properties later versions set (:data:`PROPERTIES`)."""
    for name in TABLES:
        try:
            _configure(open_table(location, name), name)
        except TableNotFoundError:
            with_retries(
                lambda name=name: DeltaTable.create(
                    location.table(name),
                    SCHEMAS[name],
                    mode="ignore",
                    partition_by=PARTITIONS.get(name),
                    name=name,
                    configuration=PROPERTIES.get(name),
                    storage_options=location.delta_options,
                )
            )


def _configure(table: DeltaTable, name: str) -> None:
    wanted = PROPERTIES.get(name, {})
    if not wanted.items() <= table.metadata().configuration.items():
        with contextlib.suppress(CommitFailedError):  # another run set them meanwhile
            with_retries(lambda: table.alter.set_table_properties(wanted))


def open_table(location: OutputLocation, name: str, version: int | str | datetime | None = None) -> DeltaTable:
    table = with_retries(lambda: DeltaTable(location.table(name), storage_options=location.delta_options))
    if version is not None:
        table.load_as_version(version)
    return table


def dataset(location: OutputLocation, name: str, version: int | str | datetime | None = None) -> ds.Dataset:
    """A table's rows (as of ``version``: a number or a time) as a pyarrow dataset: committed files only."""
    try:
        table = open_table(location, name, version)
    except TableNotFoundError:
        return ds.dataset(SCHEMAS[name].empty_table())
    if table.protocol().min_reader_version > 1:  # not a table of ours: delta-rs checks what it can read
        return table.to_pyarrow_dataset()
    return ds.FileSystemDataset(*_fragments(location, table, table_files(table)))


# Columns whose bounds a dataset's fragments carry, for engines to skip files by: those files are narrow in (ids and
# sources: latest's files are sorted by them; status: files without errors). delta-rs's to_pyarrow_dataset builds an
# expression of every column's bounds for each file, several times slower (25,000 files: 88 s against 21 s).
PRUNED = ("image_id", "source", "status", "run_id", "url", "work_key", "version")


def table_files(table: DeltaTable) -> list[dict[str, Any]]:
    """The files a table holds: path, size, partition values (``partition.<column>``) and, of the :data:`PRUNED`
    columns, ``min.``, ``max.`` and ``null_count.``."""
    actions = pa.table(table.get_add_actions(flatten=True))
    names = actions.column_names
    bounds = [f"{kind}.{column}" for column in PRUNED for kind in ("min", "max", "null_count")]
    keep = ["path", "size_bytes", *(n for n in names if n.startswith("partition.")), *(b for b in bounds if b in names)]
    return actions.select(keep).to_pylist()


# --- commit ---


def commit(
    location: OutputLocation,
    run_id: str,
    staged: StagedOutput,
    manifest: Manifest,
    shards: Iterable[dict[str, Any]],
    replaces: Iterable[str] = (),
    adopted_from: Iterable[str] = (),
) -> int:
    """Make a run visible, all of it at once; returns the predictions table's version that holds it.

    ``replaces``: crashed runs with the same work, adopted (``adopted_from``: their files are committed here) or
    superseded; their leftovers go once this run is committed.
    """
    intent = {
        "manifest": manifest.to_json(),
        "files": [file.to_json() for file in staged.files],
        "shards": [
            {**{n: s.get(n) for n in SHARDS_SCHEMA.names}, "run_id": run_id, "work_key": manifest.model.key}
            for s in shards
        ],
        "replaces": sorted(set(replaces)),
        "adopted_from": sorted(set(adopted_from)),
    }
    write_intent(location, run_id, intent)
    return finish_commit(location, intent)


def finish_commit(location: OutputLocation, intent: dict[str, Any]) -> int:
    """The steps after the point of no return; each is done once, so a commit cut short can be finished later."""
    manifest = Manifest.from_json(intent["manifest"])
    run_id, files = manifest.run_id, [StagedFile.from_json(f) for f in intent["files"]]
    shards = _append_once(location, SHARDS, run_id, pa.Table.from_pylist(intent["shards"], SHARDS_SCHEMA))
    version = _commit_predictions(location, manifest, files, intent["replaces"], intent["adopted_from"])
    committed = replace(manifest, version=version, committed_at=manifest.committed_at or _now())
    runs = _append_once(location, RUNS, run_id, _runs_row(committed))
    catch_up_latest(location)
    predictions = open_table(location, PREDICTIONS)
    active = _active_files(predictions)
    discard(location, run_id, keep=active)
    for crashed in intent["replaces"]:
        if predictions.transaction_version(_claim(crashed)) is not None:  # claimed by a commit: nobody else's now
            discard(location, crashed, keep=active)
    for table in (shards, runs):
        try:
            compact(table, COMPACT_FILES)
        except Exception as error:  # housekeeping: the run is committed whatever happens here
            log.warning("%s: not compacted (%s); the next commit tries again", table.table_uri, error)
    return version


def _commit_predictions(
    location: OutputLocation, manifest: Manifest, files: list[StagedFile], replaces: list[str], adopted: list[str]
) -> int:
    run_id = manifest.run_id
    now = int(time.time() * 1000)
    actions = [AddAction(f.path, f.size, {"run_id": run_id}, now, True, f.stats) for f in files]
    for _ in range(COMMIT_ATTEMPTS):
        table = open_table(location, PREDICTIONS)
        if table.transaction_version(run_id) is not None:
            return committed_version(location, table, run_id)
        # Crashed runs are claimed by the commit that adopts or supersedes them: two runs never both commit one's
        # files, and its leftovers are removed only once a commit owns them.
        claims = []
        for crashed in replaces:
            if table.transaction_version(_claim(crashed)) is None:
                claims.append(crashed)
            elif crashed in adopted:
                raise AdoptionLost(f"run {run_id}: crashed run {crashed} was adopted by another run meanwhile")
        properties = CommitProperties(
            custom_metadata={RUN_KEY: run_id, MANIFEST_KEY: json.dumps(manifest.to_json())},
            app_transactions=[Transaction(run_id, 1, now), *(Transaction(_claim(c), 1, now) for c in claims)],
        )
        try:
            table.create_write_transaction(actions, mode="append", schema=table.schema(), commit_properties=properties)
        except CommitFailedError:
            continue  # a concurrent commit with one of our transactions: look again
        return committed_version(location, open_table(location, PREDICTIONS), run_id)
    raise RuntimeError(f"run {run_id}: the predictions commit kept conflicting; rerun to finish it")


def _claim(run_id: str) -> str:
    return f"resnet-pipeline:claim:{run_id}"


def committed_version(location: OutputLocation, table: DeltaTable, run_id: str) -> int:
    """The version of the predictions commit of ``run_id``, searched from the table's newest version down."""
    for version in range(table.version(), 0, -1):
        if commit_info(location, PREDICTIONS, version).get(RUN_KEY) == run_id:
            return version
    raise LookupError(f"run {run_id} has no commit in {table.table_uri}")


def commit_info(location: OutputLocation, name: str, version: int) -> dict[str, Any]:
    """A commit's ``commitInfo`` (our metadata keys included), read from its log file: ``DeltaTable.history`` numbers
    its entries from the loaded snapshot, wrongly once a newer commit exists (deltalake 1.6). {} when the log file
    is gone (log retention) or holds no commitInfo."""
    return next((a["commitInfo"] for a in log_actions(location, name, version) if "commitInfo" in a), {})


def log_actions(location: OutputLocation, name: str, version: int) -> list[dict[str, Any]]:
    """The actions of a table's commit ``version``, from its log file ([] when the file is gone)."""
    try:
        text = with_retries(lambda: location.fs.cat_file(location.log_entry(name, version))).decode()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _append_once(location: OutputLocation, name: str, run_id: str, rows: pa.Table) -> DeltaTable:
    """Append ``rows`` to a table as the one commit of ``run_id`` there (done already: nothing to do); returns the
    table as of that commit or later."""
    for _ in range(COMMIT_ATTEMPTS):
        table = open_table(location, name)
        if table.transaction_version(run_id) is not None:
            return table
        properties = CommitProperties(
            custom_metadata={RUN_KEY: run_id},
            app_transactions=[Transaction(run_id, 1, int(time.time() * 1000))],
        )
        try:
            write_deltalake(table, rows, mode="append", writer_properties=ZSTD, commit_properties=properties)
            return table
        except CommitFailedError:
            continue
    raise RuntimeError(f"run {run_id}: the {name} commit kept conflicting; rerun to finish it")


def compact(table: DeltaTable, most: int) -> bool:
    """Compact a table of more than ``most`` files into as few as Delta's target size allows, and checkpoint it
    (``shards`` and ``runs``: one small file a run). Rows, application transactions and earlier versions stay; the
    replaced files stay on disk until a vacuum. Returns whether it compacted."""
    if len(table.file_uris()) <= most:
        return False
    table.optimize.compact(writer_properties=ZSTD)
    table.create_checkpoint()
    return True


def _runs_row(manifest: Manifest) -> pa.Table:
    row = {
        "version": manifest.version,
        "run_id": manifest.run_id,
        "name": manifest.name,
        "mode": manifest.plan.mode,
        "started_at": manifest.started_at,
        "committed_at": manifest.committed_at,
        "wall_seconds": manifest.wall_seconds,
        "rows": manifest.counts.rows,
        "ok": manifest.counts.ok,
        "error": manifest.counts.error,
        "images_per_second": manifest.images_per_second,
        "architecture": manifest.model.architecture,
        "weights": manifest.model.weights,
        "fingerprint": manifest.model.fingerprints,
        "work_key": manifest.model.key,
        "shards_read": manifest.plan.to_read,
        "shards_skipped": manifest.plan.skipped_unchanged,
        "shards_adopted": manifest.plan.adopted,
        "manifest": json.dumps(manifest.to_json()),
    }
    return pa.Table.from_pylist([row], RUNS_SCHEMA)


def _active_files(table: DeltaTable) -> set[str]:
    """The data files the table's current version holds (paths relative to the table)."""
    return set(pa.table(table.get_add_actions(flatten=False)).column("path").to_pylist())


# --- latest ---


def catch_up_latest(location: OutputLocation) -> int:
    """Merge into ``latest`` every predictions commit it has not merged yet, in commit order; returns how many.

    Whoever commits next catches up for a run that died after its predictions commit, and two runs catching up at
    once merge each commit once (the loser's MERGE conflicts on ``latest``'s application transaction and looks
    again).
    """
    merged = 0
    for _ in range(COMMIT_ATTEMPTS):
        predictions, latest = open_table(location, PREDICTIONS), open_table(location, LATEST)
        done, current = latest.transaction_version(MERGED) or 0, predictions.version()
        if current <= done:
            return merged
        pending = [
            (version, info[RUN_KEY])
            for version in range(done + 1, current + 1)
            if RUN_KEY in (info := commit_info(location, PREDICTIONS, version))
        ]
        try:
            for version, run_id in pending:
                _merge_run(location, predictions, latest, run_id, version)
                merged += 1
            return merged
        except CommitFailedError:
            continue
    raise RuntimeError(f"{location.url()}: latest could not be brought up to date (concurrent merges); rerun")


def _merge_run(
    location: OutputLocation, predictions: DeltaTable, latest: DeltaTable, run_id: str, version: int
) -> None:
    """One run's rows into ``latest``: its images replace theirs, and the images gone from a shard it read whole
    (that an earlier run had read) leave.

    A copy-on-write merge of our own rather than delta-rs's MERGE, whose files hold Arrow ``string_view`` columns
    that pyarrow cannot filter (delta-io/delta-rs#4579): the files of ``latest`` that hold a replaced or dropped image
    are rewritten without it, the run's rows are added, and one commit removes the old files and adds the new. Rows
    stream through, a file's worth at a time (DuckDB sorts them by source and image id, spilling to disk): files
    sorted so have narrow bounds, which rule most files out of the next merge unread.
    """
    import tempfile

    import duckdb

    schema = output_schema()
    now = int(time.time() * 1000)
    actions: list[AddAction | RemoveAction] = []
    files = _LatestFiles(location, f"part-{version:010d}-{uuid.uuid4().hex[:8]}", schema)
    with tempfile.TemporaryDirectory(prefix="resnet-pipeline-merge-") as spill, duckdb.connect() as db:
        db.execute(f"SET temp_directory = {literal(spill)}")
        db.execute("SET memory_limit = '2GB'")
        own = [file for file in table_files(predictions) if file.get("partition.run_id") == run_id]
        db.register("rows", ds.FileSystemDataset(*_fragments(location, predictions, own)))
        db.register("shards", dataset(location, SHARDS))
        reread = (
            db.sql(
                "SELECT DISTINCT url FROM shards WHERE run_id <> $run AND url IN "
                "(SELECT url FROM shards WHERE run_id = $run AND NOT partial) ORDER BY url",
                params={"run": run_id},
            )
            .to_arrow_table()
            .column("url")
            .combine_chunks()
            .cast(pa.string())
        )
        # The run's rows are read once, into DuckDB (which spills to disk beyond its memory limit): one row per
        # image, as a key that repeats in a shard keeps its last row.
        db.execute(
            f"CREATE TEMP TABLE incoming AS SELECT {', '.join(identifier(n) for n in schema.names)} FROM rows "
            "WHERE run_id = $run QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY processed_at DESC) = 1",
            {"run": run_id},
        )
        replaced = (
            db.sql("SELECT image_id FROM incoming ORDER BY image_id")
            .to_arrow_table()
            .column("image_id")
            .combine_chunks()
            .cast(pa.string())
        )
        ids, sources = replaced.to_pylist(), reread.to_pylist()
        held = table_files(latest)
        candidates = [f for f in held if _any_within(ids, f, "image_id") or _any_within(sources, f, "source")]
        for file, fragment in zip(candidates, _fragments(location, latest, candidates)[0], strict=True):
            keys = fragment.to_table(columns=["image_id", "source"])
            gone = pc.or_(pc.is_in(keys.column("image_id"), replaced), pc.is_in(keys.column("source"), reread))
            if not pc.any(gone).as_py():
                continue
            actions.append(RemoveAction(file["path"], True, now, file["size_bytes"], {}))
            files.add(fragment.to_table(schema=schema).filter(pc.invert(gone)))
        incoming = db.sql("SELECT * FROM incoming ORDER BY source, image_id")
        with incoming.to_arrow_reader(4096) as reader:
            for batch in reader:
                files.add(pa.Table.from_batches([batch]).cast(schema))
        written = files.close()
    actions += [AddAction(path, size, {}, now, True, stats) for path, size, stats in written]
    properties = CommitProperties(
        custom_metadata={RUN_KEY: run_id}, app_transactions=[Transaction(MERGED, version, now)]
    )
    try:
        latest.create_write_transaction(actions, mode="append", schema=latest.schema(), commit_properties=properties)
    except BaseException:
        for path, _, _ in written:  # never committed: nobody else will ever name them
            with contextlib.suppress(Exception):
                location.fs.rm(location.path(LATEST, path))
        raise


class _LatestFiles:
    """Rows written as files of ``latest`` of about :data:`~pipeline.sink.TARGET_FILE_BYTES` each, as they come."""

    def __init__(self, location: OutputLocation, prefix: str, schema: pa.Schema) -> None:
        self.location, self.prefix, self.schema = location, prefix, schema
        self.pending: list[pa.Table] = []
        self.written: list[tuple[str, int, str]] = []  # (path, size, stats)

    def add(self, rows: pa.Table) -> None:
        from pipeline.sink import TARGET_FILE_BYTES

        if rows.num_rows:
            self.pending.append(rows)
        if sum(table.nbytes for table in self.pending) >= TARGET_FILE_BYTES:
            self._flush()

    def close(self) -> list[tuple[str, int, str]]:
        if self.pending:
            self._flush()
        return self.written

    def _flush(self) -> None:
        from pipeline.runs import file_stats

        rows = pa.concat_tables(self.pending).combine_chunks()
        self.pending = []
        sink = pa.BufferOutputStream()
        pq.write_table(rows, sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        path = f"{self.prefix}-{len(self.written):05d}.parquet"
        write_bytes(self.location.fs, self.location.path(LATEST, path), data)
        self.written.append((path, len(data), json.dumps(file_stats(rows))))


def _fragments(
    location: OutputLocation, table: DeltaTable, files: list[dict[str, Any]]
) -> tuple[list[ds.Fragment], pa.Schema, ds.ParquetFileFormat, Any]:
    """Parquet fragments of these files of a table (:func:`table_files`), each with what its log entry guarantees:
    its partition values, and its bounds of the columns without nulls there; with the schema, format and filesystem
    a dataset of them takes. The filesystem is delta-rs's, told the sizes (no request to learn them)."""
    import pyarrow.fs as pafs
    from deltalake.fs import DeltaStorageHandler

    schema = pa.schema(table.schema().to_arrow())
    sizes = {file["path"]: file["size_bytes"] for file in files}
    filesystem = pafs.PyFileSystem(DeltaStorageHandler(table.table_uri, location.delta_options, sizes))
    parquet = ds.ParquetFileFormat(default_fragment_scan_options=ds.ParquetFragmentScanOptions(pre_buffer=True))
    fragments = [
        parquet.make_fragment(file["path"], filesystem=filesystem, partition_expression=_guarantee(file, schema))
        for file in files
    ]
    return fragments, schema, parquet, filesystem


def _guarantee(file: dict[str, Any], schema: pa.Schema) -> ds.Expression:
    """What holds for every row of a file, from its log entry (a column with nulls there gets no bounds: a filter
    on ``IS NULL`` must not skip the file)."""
    terms = []
    for key, value in file.items():
        if key.startswith("partition."):
            column = key.removeprefix("partition.")
            field = ds.field(column)
            terms.append(field.is_null() if value is None else field == pa.scalar(value, schema.field(column).type))
        elif key.startswith("min.") and value is not None:
            column = key.removeprefix("min.")
            high = file.get(f"max.{column}")
            if high is not None and file.get(f"null_count.{column}") == 0:
                kind = schema.field(column).type
                terms += [ds.field(column) >= pa.scalar(value, kind), ds.field(column) <= pa.scalar(high, kind)]
    return functools.reduce(operator.and_, terms, ds.scalar(True))


def _any_within(values: list[str], file: dict[str, Any], column: str) -> bool:
    """Whether any of the sorted ``values`` lies within the file's bounds of ``column`` (no bounds: maybe)."""
    low, high = file.get(f"min.{column}"), file.get(f"max.{column}")
    if low is None or high is None:
        return bool(values)
    index = bisect.bisect_left(values, low)
    return index < len(values) and values[index] <= high


# --- recovery ---


def recover(location: OutputLocation) -> list[CrashedRun]:
    """Clean up after dead drivers; returns the crashed runs whose progress can be adopted, newest first.

    A dead run that had decided its content (its intent) is committed now; ``latest`` is caught up; data files that
    no commit holds and no live or crashed run may still commit are removed.
    """
    crashed: list[CrashedRun] = []
    live: set[str] = set()
    for run_id in staging_runs(location):
        lease = read_lease(location, run_id)
        if not lease_expired(lease):
            live.add(run_id)
            continue
        intent = read_intent(location, run_id)
        if intent is not None:
            try:
                finish_commit(location, intent)
                continue
            except AdoptionLost as error:
                log.warning("%s: its own files stay for a rerun to adopt", error)
                forget_adoption(location, run_id, intent["adopted_from"])
        crashed.append(CrashedRun(run_id, (lease or {}).get("key")))
    try:
        catch_up_latest(location)
    except TableNotFoundError:  # no tables yet: nothing committed, nothing to clean
        pass
    else:
        _remove_orphans(location, live | {run.run_id for run in crashed})
    return sorted(crashed, key=lambda run: run.run_id, reverse=True)


def forget_adoption(location: OutputLocation, run_id: str, adopted_from: Iterable[str]) -> None:
    """Drop a run's intent and its records of files adopted from others, leaving only what it wrote itself."""
    remove_intent(location, run_id)
    for crashed in adopted_from:
        for path in location.adoption_records(run_id, crashed):
            with contextlib.suppress(FileNotFoundError):
                with_retries(lambda path=path: location.fs.rm(path))


def _remove_orphans(location: OutputLocation, pending: set[str]) -> None:
    """Data files of runs that are neither at work, adoptable nor committed, and that no commit holds."""
    committed = set(dataset(location, RUNS).to_table(columns=["run_id"]).column("run_id").to_pylist())
    folders = [run for run in data_folders(location) if run not in pending and run not in committed]
    if folders:
        active = _active_files(open_table(location, PREDICTIONS))
        for run in folders:
            discard(location, run, keep=active)


# --- reading ---


def as_of(location: OutputLocation, moment: int | datetime) -> dict[str, int]:
    """The version of each table that shows the output as it was at predictions version ``moment`` (or at a time).

    ``predictions`` at that version; ``latest`` at its last version that had merged no later predictions commit;
    ``runs`` and ``shards`` whole (readers keep the runs committed by then, which may have been recorded later).
    """
    predictions = open_table(location, PREDICTIONS)
    if isinstance(moment, datetime):
        predictions.load_as_version(moment)
    elif not 0 <= moment <= predictions.version():
        raise LookupError(f"no version {moment} of {location.url()}/predictions (0 to {predictions.version()})")
    else:
        predictions.load_as_version(moment)
    version = predictions.version()
    latest = open_table(location, LATEST)
    merged_at = 0
    for candidate in range(latest.version(), 0, -1):
        merged = merged_version(location, candidate)
        if merged is not None and merged <= version:
            merged_at = candidate
            break
    return {PREDICTIONS: version, LATEST: merged_at}


def merged_version(location: OutputLocation, version: int) -> int | None:
    """The predictions version that ``latest``'s commit ``version`` merged up to (None: not a merge of ours)."""
    txns = (a["txn"] for a in log_actions(location, LATEST, version) if a.get("txn", {}).get("appId") == MERGED)
    return next((int(txn["version"]) for txn in txns), None)


def read_manifests(location: OutputLocation) -> list[Manifest]:
    """Manifests of committed runs, in commit order."""
    table = dataset(location, RUNS).to_table(columns=["version", "manifest"]).sort_by("version")
    return [
        replace(Manifest.from_json(json.loads(document)), version=version)
        for version, document in zip(
            table.column("version").to_pylist(), table.column("manifest").to_pylist(), strict=True
        )
    ]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()
