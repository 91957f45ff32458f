"""What a run has to do, given what the output already holds: incremental runs, resuming a crash, retrying failures.

Rows depend on the input shard and on the *work key*: the model (architecture, weights, labels, top-k) and the
decoding (preprocessing, image size, pixel limit, embedding dtype). How the work is executed (batch size, actors,
precision, XLA) is not part of it. An incremental run skips every shard that a committed run processed whole, with
the same work key, at the same ETag and size; a shard whose ETag or size changed is processed again and its new rows
supersede the old ones in the ``latest`` view.

A crashed run (its driver is dead: see :mod:`pipeline.runs`) leaves data files and progress records. The next run
with the same work key *adopts* them: it commits, as its own, the crashed run's data files that hold only shards the
crashed run finished (same ETag and size as now), and reads only the rest. Nothing is copied: the run id is the
commit's partition value, not a column of the file. The commit claims the crashed run (:mod:`pipeline.tables`), so
two runs that adopt the same crash at once never both commit its files: the second fails and its rerun finishes.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import duckdb
import fsspec

from pipeline.manifest import PlanSummary
from pipeline.runs import (
    OutputLocation,
    StagedFile,
    read_progress,
    record_adoption,
    staged_files,
)
from pipeline.sources import Shard, ShardReads, Shards
from pipeline.spec import JobSpec
from pipeline.storage import version_of, with_retries
from pipeline.tables import RUNS, SHARDS, CrashedRun, dataset

Mode = str  # "full" | "incremental" | "retry-failed"


def work_key(spec: JobSpec) -> tuple[str, dict[str, Any]]:
    """A short hash of everything the rows depend on, and the parts it was made from (recorded in the manifest)."""
    model, decode = spec.model, spec.decode
    named_weights = model.weights in ("imagenet", "random")
    parts = {
        "architecture": model.architecture,
        "weights": model.weights if named_weights else _identity(model.weights, model.storage_options),
        "seed": model.seed if model.weights == "random" else None,
        "labels": _identity(model.labels, model.storage_options) if model.labels else None,
        "classes": model.classes,
        "top_k": model.top_k,
        "preprocessing": decode.preprocessing,
        "image_size": decode.image_size,
        "max_pixels": decode.max_pixels,
        "embedding_dtype": spec.output.embedding_dtype,
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return digest, parts


def _identity(url: str, storage_options: dict) -> str:
    """A file's URL with its version (ETag, else modification time) and size: another file, another key."""
    from pipeline.credentials import redact_url

    try:
        fs, path = fsspec.core.url_to_fs(url, **storage_options)
        info = with_retries(lambda: fs.info(path))
        return f"{redact_url(url)}@{version_of(info)}:{info.get('size')}"
    except Exception:
        return redact_url(url)


def _version(shard: dict[str, Any] | Shard) -> tuple:
    if isinstance(shard, Shard):
        return shard.etag, shard.size
    return shard.get("etag"), shard.get("size")


@dataclass
class Plan:
    """The shards to read (all of each, or just some of its images), and what a crashed run already did."""

    mode: Mode
    listed: int
    reads: ShardReads
    skipped: int = 0  # already covered by a committed run
    adopted_shards: list[dict[str, Any]] = field(default_factory=list)
    adopted_from: list[str] = field(default_factory=list)
    adopted_files: list[StagedFile] = field(default_factory=list)  # the crashed run's files this run commits

    def summary(self) -> PlanSummary:
        return PlanSummary(
            mode=self.mode,
            listed=self.listed,
            to_read=len(self.reads),
            skipped_unchanged=self.skipped,
            adopted=len(self.adopted_shards),
            adopted_from=list(self.adopted_from),
        )


def plan_run(spec: JobSpec, shards: Shards, location: OutputLocation, key: str, *, full: bool = False) -> Plan:
    """Full or incremental: the listed shards, less those a committed run already processed at the same version."""
    mode = "incremental" if spec.incremental and not full else "full"
    if mode == "full":
        return Plan(mode, len(shards), shards.whole())
    # A join in DuckDB, not a dictionary of every shard ever covered: the driver plans millions of shards.
    with duckdb.connect() as db:
        for name, table in (
            ("listed", shards.table),
            ("shards", dataset(location, SHARDS)),
            ("runs", dataset(location, RUNS)),
        ):
            db.register(name, table)
        todo = db.sql(
            """
            WITH covered AS (
                SELECT s.url, s.etag, s.size FROM shards s JOIN runs r USING (run_id)
                WHERE s.work_key = $key AND NOT s.partial
                QUALIFY row_number() OVER (PARTITION BY s.url ORDER BY r.version DESC) = 1
            )
            SELECT l.* FROM listed l LEFT JOIN covered c USING (url)
            WHERE c.url IS NULL OR c.etag IS DISTINCT FROM l.etag OR c.size IS DISTINCT FROM l.size
            ORDER BY l.url
            """,
            params={"key": key},
        ).to_arrow_table()
    return Plan(mode, len(shards), Shards(todo).whole(), skipped=len(shards) - todo.num_rows)


UNREADABLE_ID = "CASE WHEN l.format = 'images' THEN l.url ELSE l.url || '#unreadable' END"  # as unreadable_id


def plan_retry(shards: Shards, location: OutputLocation) -> Plan:
    """Only the images whose newest committed row is an error, in the shards as they are listed now. A shard that
    itself failed (its row is :func:`~pipeline.sources.unreadable_id`) is read whole."""
    from pipeline.query import connect

    with connect(location) as db:
        db.register("listed", shards.table)
        failed = db.sql(
            f"""
            WITH failed AS (SELECT source AS url, list(image_id) AS ids FROM latest WHERE status = 'error' GROUP BY 1)
            SELECT l.*, CASE WHEN list_contains(ids, {UNREADABLE_ID}) THEN NULL ELSE list_sort(ids) END AS only
            FROM listed l JOIN failed f USING (url) ORDER BY l.url
            """
        ).to_arrow_table()
    return Plan("retry-failed", len(shards), ShardReads(failed), skipped=len(shards) - failed.num_rows)


def adopt(location: OutputLocation, crashed: list[CrashedRun], key: str, plan: Plan, run_id: str) -> None:
    """Take over the finished shards of the newest crashed run with this work key (see the module docstring).

    Shards it finished that this plan still wants, at the same version, whose rows all lie in files that hold
    finished shards only, are removed from ``plan.reads``; those files become ``plan.adopted_files``.
    """
    candidate = next((run for run in crashed if run.key == key), None)
    if candidate is None or not plan.reads:
        return
    progress = read_progress(location, candidate.run_id)
    wanted = {read.shard: read for read in plan.reads.among(progress)}
    done = {}
    for entry in progress.values():
        match = wanted.get(Shard.from_record(entry))
        if match is not None and bool(entry.get("partial")) == (match.only is not None):
            done[entry["url"]] = entry
    files, finished = adoptable(staged_files(location, candidate.run_id), {url: e["rows"] for url, e in done.items()})
    if not finished:
        return
    plan.reads = plan.reads.without(finished)
    plan.adopted_shards = [done[url] for url in sorted(finished)]
    plan.adopted_from = [candidate.run_id]
    plan.adopted_files = files
    record_adoption(location, run_id, candidate.run_id, plan.adopted_shards, files)


def adoptable(files: list[StagedFile], finished_rows: dict[str, int]) -> tuple[list[StagedFile], set[str]]:
    """The files that can be committed whole, and the shards they hold all of.

    A shard is taken when every row its read task counted lies in files that hold taken shards only: a file that
    also holds rows of an unfinished shard cannot be committed (those rows would be half a shard), and then neither
    can the other shards in it, until nothing changes.
    """
    taken = set(finished_rows)
    while True:
        usable = [f for f in files if all(url in taken for url, _ in f.sources)]
        counts: dict[str, int] = defaultdict(int)
        for file in usable:
            for url, rows in file.sources:
                counts[url] += rows
        still = {url for url in taken if counts.get(url, 0) == finished_rows[url]}
        if still == taken:
            return usable, taken
        taken = still
