"""What a run has to do, given what the output already holds: incremental runs, resuming a crash, retrying failures.

Rows depend on the input shard and on the *work key*: the model (architecture, weights, labels, top-k) and the
decoding (preprocessing, image size, pixel limit, embedding dtype). How the work is executed (batch size, actors,
precision, XLA) is not part of it. An incremental run skips every shard that a committed run processed whole, with
the same work key, at the same ETag and size; a shard whose ETag or size changed is processed again and its new rows
supersede the old ones in the ``latest`` view.

A crashed run (its driver is dead: see :mod:`pipeline.runs`) leaves rows and progress records in its staging folder.
The next run with the same work key *adopts* them: it copies the rows of every shard the crashed run finished (same
ETag and size as now) into its own staging, relabelled with its own run id, and reads only the rest. Copying, not
taking over the folder, means two runs that adopt the same crash at once each commit a whole run of their own.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.manifest import PlanSummary
from pipeline.runs import (
    CrashedRun,
    OutputLocation,
    StagedFile,
    read_manifests,
    read_progress,
    read_shards,
    read_table,
    staged_files,
    write_staged,
)
from pipeline.sources import Shard, ShardRead, unreadable_id
from pipeline.spec import JobSpec
from pipeline.storage import version_of, with_retries, write_bytes

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
    adopted_files: list[StagedFile] = field(default_factory=list)  # their rows, copied into this run's staging

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
    manifests = [m for m in read_manifests(location) if m.model.key == key]
    table = read_shards(location, manifests)
    covered: dict[str, tuple] = {}
    for row in table.filter(pc.invert(table.column("partial"))).to_pylist():  # in commit order: newest wins
        covered[row["url"]] = (row["etag"], row["size"])
    return covered


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

    Shards it finished that this plan still wants, at the same version, are removed from ``plan.reads`` and their
    rows copied into ``run_id``'s staging. A crashed run that vanishes meanwhile (adopted and committed by another
    run) is simply not adopted.
    """
    candidate = next((run for run in crashed if run.key == key), None)
    if candidate is None or not plan.reads:
        return
    wanted = {read.shard: read for read in plan.reads}
    try:
        progress = read_progress(location, candidate.run_id)
        done = {}
        for entry in progress.values():
            match = wanted.get(Shard.from_record(entry))
            if match is not None and bool(entry.get("partial")) == (match.only is not None):
                done[entry["url"]] = entry
        if not done:
            return
        copied, plan.adopted_files = _copy_rows(location, candidate.run_id, done, run_id)
    except FileNotFoundError:
        return
    plan.reads = [read for read in plan.reads if read.shard.url not in copied]
    plan.adopted_shards = [done[url] for url in sorted(copied)]
    plan.adopted_from = [candidate.run_id]
    # Recorded like a read task's progress, so that a crash of this run can be adopted in turn.
    write_bytes(
        location.fs,
        location.progress_record(run_id, f"adopted-{candidate.run_id}"),
        json.dumps(plan.adopted_shards).encode(),
    )


def _copy_rows(
    location: OutputLocation, source_run: str, done: dict[str, dict], run_id: str
) -> tuple[set[str], list[StagedFile]]:
    """Copy the rows of finished shards; a shard is finished when all the rows its read task counted are staged.
    Returns the finished shards' URLs and the files written.

    Two passes, one file in memory at a time: count rows per shard, then copy the rows of complete shards.
    """
    fs = location.fs
    readable, counts = [], defaultdict(int)
    for path in staged_files(location, source_run):
        try:
            sources = with_retries(lambda path=path: read_table(fs, path, ["source"])).column("source")
        except FileNotFoundError:
            raise
        except Exception:
            continue  # a file the crash cut short: its shards are not finished
        readable.append(path)
        for url, count in _counts(sources).items():
            counts[url] += count
    complete = {url for url, entry in done.items() if counts.get(url, 0) == entry["rows"]}
    wanted = pa.array(sorted(complete), pa.string())
    written = []
    for index, path in enumerate(readable):
        table = with_retries(lambda path=path: read_table(fs, path))
        table = table.filter(pc.is_in(table.column("source"), wanted))
        if not table.num_rows:
            continue
        table = table.set_column(
            table.schema.get_field_index("run_id"), "run_id", pa.array([run_id] * table.num_rows, pa.string())
        )
        written.append(write_staged(location, run_id, f"adopted-{source_run}-{index:05d}.parquet", table))
    return complete, written


def _counts(column: pa.ChunkedArray) -> dict[str, int]:
    return {item["values"]: item["counts"] for item in pc.value_counts(column).to_pylist()}
