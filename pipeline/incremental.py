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

import fsspec

from pipeline.manifest import PlanSummary
from pipeline.runs import (
    OutputLocation,
    StagedFile,
    read_progress,
    record_adoption,
    staged_files,
)
from pipeline.sources import Shard, ShardRead, unreadable_id
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
    reads: list[ShardRead]
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


def plan_run(spec: JobSpec, shards: list[Shard], location: OutputLocation, key: str, *, full: bool = False) -> Plan:
    """Full or incremental: the listed shards, less those a committed run already processed."""
    mode = "incremental" if spec.incremental and not full else "full"
    if mode == "full":
        return Plan(mode, len(shards), [ShardRead(s) for s in shards])
    covered = covered_shards(location, key)
    todo = [s for s in shards if covered.get(s.url) != _version(s)]
    return Plan(mode, len(shards), [ShardRead(s) for s in todo], skipped=len(shards) - len(todo))


def covered_shards(location: OutputLocation, key: str) -> dict[str, tuple]:
    """Shard URL -> (etag, size) of its newest whole processing by a committed run with this work key."""
    import duckdb

    with duckdb.connect() as db:
        db.register("shards", dataset(location, SHARDS))
        db.register("runs", dataset(location, RUNS))
        found = db.execute(
            "SELECT s.url, s.etag, s.size FROM shards s JOIN runs r USING (run_id) "
            "WHERE s.work_key = $key AND NOT s.partial "
            "QUALIFY row_number() OVER (PARTITION BY s.url ORDER BY r.version DESC) = 1",
            {"key": key},
        ).fetchall()
    return {url: (etag, size) for url, etag, size in found}


def plan_retry(shards: list[Shard], location: OutputLocation) -> Plan:
    """Only the images whose newest committed row is an error, in the shards as they are listed now."""
    from pipeline.query import connect

    with connect(location) as db:
        failed = db.execute("SELECT source, image_id FROM latest WHERE status = 'error'").fetchall()
    wanted: dict[str, set[str]] = defaultdict(set)
    for source, image_id in failed:
        wanted[source].add(image_id)
    reads = []
    for shard in shards:
        ids = wanted.get(shard.url)
        if not ids:
            continue
        # A shard that itself failed is read whole.
        reads.append(ShardRead(shard) if unreadable_id(shard) in ids else ShardRead(shard, frozenset(ids)))
    return Plan("retry-failed", len(shards), reads, skipped=len(shards) - len(reads))


def adopt(location: OutputLocation, crashed: list[CrashedRun], key: str, plan: Plan, run_id: str) -> None:
    """Take over the finished shards of the newest crashed run with this work key (see the module docstring).

    Shards it finished that this plan still wants, at the same version, whose rows all lie in files that hold
    finished shards only, are removed from ``plan.reads``; those files become ``plan.adopted_files``.
    """
    candidate = next((run for run in crashed if run.key == key), None)
    if candidate is None or not plan.reads:
        return
    wanted = {read.shard: read for read in plan.reads}
    done = {}
    for entry in read_progress(location, candidate.run_id).values():
        match = wanted.get(Shard.from_record(entry))
        if match is not None and bool(entry.get("partial")) == (match.only is not None):
            done[entry["url"]] = entry
    files, finished = adoptable(staged_files(location, candidate.run_id), {url: e["rows"] for url, e in done.items()})
    if not finished:
        return
    plan.reads = [read for read in plan.reads if read.shard.url not in finished]
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
