"""The nightly commit and ``latest`` at 1M-100M rows of history (issue 22), with the pipeline's own code, no Ray.

An output is built with a year of nights (``--nights``, 365) that add up to ``--rows`` rows in ``predictions`` and
``latest`` (1M, 10M), at the production file size (``sink.rows_per_file`` of 2048-d float32: 3,860 rows, about
32 MB a file) but with 8-d embeddings, since the costs measured go per file and per table open, not per byte. Shards
hold ``--rows-per-shard`` images (1,000). Each night is committed with ``tables.commit`` (so ``shards``, ``runs``,
the predictions commit, cleanup and anything the commit does to keep tables small run as in production), except the
``latest`` merge, which is replaced during the build by an append of the night's rows as sorted files of the same
size (every image is new, so the merge would do exactly that; the real merge is what night 366 measures).

Night 366, in a fresh process on a hard-linked copy of the history (Delta never rewrites a file in place):
(a) 1M new rows (``--night-rows``), (b) 1 % of all shards read again whole, one image fewer in each. Each measures
``ensure_tables`` + ``recover`` + ``plan_run`` (its ``covered_shards``), ``tables.commit`` step by step (the
``latest`` merge apart), ``query.connect`` + a count on ``latest``, ``to_pyarrow_dataset`` of ``latest`` and
``predictions`` alone, the files each table holds, and peak memory per phase. ``--s3`` runs night 366 once more on
moto's S3 server over HTTP for the histories of those row counts (straight to moto, then through the counting
proxy for request counts). Helpers come from ``benchmarks/delta_commit.py``.

``--upgrade`` measures code newer than the history's: the properties and compaction an old output gets once, at its
first commit with the new code, are done (and timed) before night 366. ``--latest-files`` measures ``latest`` alone at
N files (25,000: 100M rows), one commit of that many adds of hard links to one real file.

    python benchmarks/delta_scale.py --rows 1000000 10000000 --s3 1000000 --latest-files 2591 25000 \
        --json benchmarks/results-2026-12-02-cpu2-delta-scale.json    (as in benchmarks/RESULTS.md, in parts)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
import delta_commit
from delta_commit import (
    FIRST_NIGHT,
    ROOT,
    Phases,
    _cpu_model,
    _version,
    commit_night,
    counting_proxy,
    delta_log,
    history_spec,
    moto_server,
    night_rows,
    night_shards,
    peak_mib,
    run_id_of,
    s3_environment,
    shard_record,
    write_files,
)
from delta_commit import manifest_of as manifest_for

from pipeline import query, tables
from pipeline.manifest import PlanSummary
from pipeline.runs import LATEST, PREDICTIONS, RUNS, SHARDS, TABLES, OutputLocation, StagedOutput, file_stats
from pipeline.sink import rows_per_file
from pipeline.sources import Shard

ROWS_PER_FILE = rows_per_file(2048, "float32", 5)  # what a production run writes: about 32 MB a file


# --- the history ---


def shards_per_night(rows: int, nights: int, rows_per_shard: int) -> int:
    return max(1, round(rows / nights / rows_per_shard))


def slices(table: pa.Table, size: int) -> list[pa.Table]:
    return [table.slice(start, size) for start in range(0, table.num_rows, size)]


class LatestAppend:
    """Stands in for ``tables.catch_up_latest`` while the history is built: every image of a night is new, so its
    merge would add the night's rows, sorted by source and image id, as files of ``ROWS_PER_FILE`` rows."""

    rows: pa.Table | None = None

    def __call__(self, location: OutputLocation) -> int:
        from deltalake import CommitProperties, Transaction
        from deltalake.transaction import AddAction

        predictions, latest = tables.open_table(location, PREDICTIONS), tables.open_table(location, LATEST)
        version, run_id = predictions.version(), self.rows.column("run_id")[0].as_py()
        now = int(time.time() * 1000)
        actions = []
        for index, part in enumerate(
            slices(self.rows.sort_by([("source", "ascending"), ("image_id", "ascending")]), ROWS_PER_FILE)
        ):
            path = f"part-{version:010d}-build-{index:05d}.parquet"
            sink = pa.BufferOutputStream()
            pq.write_table(part, sink, compression="zstd")
            data = sink.getvalue().to_pybytes()
            Path(location.path(LATEST, path)).write_bytes(data)
            actions.append(AddAction(path, len(data), {}, now, True, json.dumps(file_stats(part))))
        properties = CommitProperties(
            custom_metadata={tables.RUN_KEY: run_id}, app_transactions=[Transaction(tables.MERGED, version, now)]
        )
        latest.create_write_transaction(actions, mode="append", schema=latest.schema(), commit_properties=properties)
        return 1


def build_history(output: Path, rows: int, nights: int, rows_per_shard: int) -> dict[str, Any]:
    shutil.rmtree(output, ignore_errors=True)
    location = OutputLocation.open(str(output))
    spec, key, parts = history_spec(str(output))
    tables.ensure_tables(location)
    per_night = shards_per_night(rows, nights, rows_per_shard)
    append = LatestAppend()
    original = tables.catch_up_latest
    tables.catch_up_latest = append
    started, commits = time.perf_counter(), []
    try:
        for night in range(nights):
            at = FIRST_NIGHT + timedelta(days=night)
            run_id = run_id_of(at, f"{night:06x}")
            shards = night_shards(night, per_night, rows_per_shard)
            data = night_rows([s.url for s in shards], rows_per_shard, run_id, at, night)
            files, _ = write_files(location, run_id, slices(data, ROWS_PER_FILE))
            staged = StagedOutput.of(files)
            listed = (night + 1) * per_night
            plan = PlanSummary("incremental", listed, per_night, listed - per_night)
            append.rows = data
            begun = time.perf_counter()
            tables.commit(
                location,
                run_id,
                staged,
                manifest_for(run_id, spec, key, parts, staged, plan),
                [shard_record(s, rows_per_shard, key) for s in shards],
            )
            commits.append(round(time.perf_counter() - begun, 3))
            if night % 50 == 0 or night == nights - 1:
                print(
                    f"  night {night + 1}: commit {commits[-1]:.2f} s, {time.perf_counter() - started:.0f} s so far",
                    flush=True,
                )
    finally:
        tables.catch_up_latest = original
    build = {
        "rows": rows,
        "nights": nights,
        "rows_per_shard": rows_per_shard,
        "shards_per_night": per_night,
        "rows_per_file": ROWS_PER_FILE,
        "seconds": round(time.perf_counter() - started, 1),
        "commit_seconds_every_50": commits[::50] + commits[-1:],
    }
    (output.parent / f"{output.name}.json").write_text(json.dumps(build))
    return build


# --- night 366 ---


def table_files(location: OutputLocation) -> dict[str, int]:
    return {name: len(tables.open_table(location, name).file_uris()) for name in TABLES}


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return round(time.perf_counter() - started, 3)


def upgrade_output(location: OutputLocation) -> dict[str, float]:
    """What a history written by older code gets once from the first commit of this code (``ensure_tables`` sets
    table properties, the commit compacts ``shards`` and ``runs``), done and timed before the night so that the
    night shows the steady state."""
    upgrade = {"ensure_tables": timed(lambda: tables.ensure_tables(location))}
    for name in (SHARDS, RUNS):
        upgrade[f"compact {name}"] = timed(lambda name=name: tables.compact(tables.open_table(location, name), 0))
    return upgrade


def measure_night(output: str, variant: str, build: dict, night_rows_: int, options: dict, counter: str | None) -> dict:
    """Night ``nights + 1`` on ``output`` as the runner plans and commits it (run in a process of its own)."""
    from delta_commit import proxy_counts

    requests = proxy_counts(counter) if counter else None
    nights, per_night, rows_per_shard = build["nights"], build["shards_per_night"], build["rows_per_shard"]
    location = OutputLocation.open(output, options)
    spec, key, parts = history_spec(output)
    listed = [s for night in range(nights) for s in night_shards(night, per_night, rows_per_shard)]
    if variant == "a":  # a night of new shards only
        new = night_shards(nights, max(1, night_rows_ // rows_per_shard), rows_per_shard)
        listed += new
        skip, reads, delta = 0, new, len(new) * rows_per_shard
    else:  # every 100th shard changed (new ETag): read again whole, one image fewer in each
        changed = set(range(0, len(listed), 100))
        listed = [
            Shard(s.url, s.format, s.size, f'"{nights}-changed"') if i in changed else s for i, s in enumerate(listed)
        ]
        skip, reads, delta = 1, [listed[i] for i in sorted(changed)], -len(changed)
    before = tables.dataset(location, LATEST).count_rows()
    upgrade = upgrade_output(location) if build.get("upgrade") else {}
    files_before = table_files(location)
    phases = Phases(requests)
    crashed, plan = delta_commit.plan_night(phases, location, spec, listed, key)
    assert not crashed and [r.shard for r in plan.reads] == reads, (len(plan.reads), len(reads))
    files = max(1, math.ceil(len(reads) * (rows_per_shard - skip) / ROWS_PER_FILE))
    with phases.phase("write and commit"):
        record = commit_night(
            location, spec, key, parts, nights, reads, rows_per_shard, files, len(listed), skip, requests
        )
    with phases.phase("connect_and_count"), query.connect(location) as db:
        count = db.execute("SELECT count(*) FROM latest").fetchone()[0]
    assert count == before + delta, (count, before, delta)
    with phases.phase("to_pyarrow_dataset latest"):
        tables.open_table(location, LATEST).to_pyarrow_dataset()
    with phases.phase("to_pyarrow_dataset predictions"):
        tables.open_table(location, PREDICTIONS).to_pyarrow_dataset()
    return {
        "variant": variant,
        "latest_rows_before": before,
        "latest_rows_after": count,
        "shards_listed": len(listed),
        "shards_read": len(plan.reads),
        "upgrade": upgrade,
        "files_before": files_before,
        "files_after": table_files(location),
        "planning": round(sum(phases.seconds[p] for p in ("ensure_tables", "recover", "plan_run")), 3),
        **{name: seconds for name, seconds in phases.seconds.items() if name != "write and commit"},
        **record,
        "peak_mib": phases.peak,
        "requests": phases.counts,
        "peak_mib_max": round(max(peak_mib(), *phases.peak.values()), 1),
    }


def run_night(arguments: list[str]) -> dict:
    return delta_commit.run_night(arguments, script=__file__)


def show(label: str, r: dict) -> None:
    print(
        f"{label}: planning {r['planning']:.2f} s ({r['ensure_tables']:.2f} + {r['recover']:.2f} + "
        f"{r['plan_run']:.2f}), write {r['write_seconds']:.2f} s, commit {r['commit_seconds']:.2f} s "
        f"(latest merge {r['steps'].get('latest merge', 0):.2f}), connect+count {r['connect_and_count']:.2f} s, "
        f"to_pyarrow_dataset latest {r['to_pyarrow_dataset latest']:.2f} s, peak {r['peak_mib_max']:.0f} MiB, "
        f"files {r['files_after']}",
        flush=True,
    )


def scale(args: argparse.Namespace, rows: int, record: dict, save: Callable[[], None]) -> None:
    """Night 366 on the history of ``rows`` rows, into ``record`` (``save`` after each night: runs are long)."""
    work = Path(args.workdir)
    output = Path(args.history or work) / f"history-{rows}"
    saved = output.parent / f"history-{rows}.json"
    build = json.loads(saved.read_text()) if saved.exists() and output.exists() and not args.rebuild else None
    if build is None or (build["nights"], build["rows_per_shard"]) != (args.nights, args.rows_per_shard):
        print(f"building {rows:,} rows", flush=True)
        build = build_history(output, rows, args.nights, args.rows_per_shard)
    build = {**build, "upgrade": args.upgrade}
    logs = {name: delta_log(output / name) for name in TABLES}
    print(
        f"history {rows:,}: built in {build['seconds']} s; files {table_files(OutputLocation.open(str(output)))}",
        flush=True,
    )
    nights = record.setdefault("nights", [])
    record.update(build=build, logs=logs)
    for repeat in range(args.repeat):
        for variant in args.variants:
            copy = work / "night"
            shutil.rmtree(copy, ignore_errors=True)
            subprocess.run(["cp", "-al", str(output), str(copy)], check=True)  # Delta never rewrites a file
            load = os.getloadavg()
            result = run_night([str(copy), variant, json.dumps(build), str(args.night_rows), "{}", ""])
            nights.append({**result, "store": "local", "repeat": repeat, "loadavg_before": load})
            show(f"local {rows:,} night {variant} #{repeat + 1}", result)
            save()
            shutil.rmtree(copy, ignore_errors=True)
    if rows in args.s3:
        with contextlib.suppress(subprocess.TimeoutExpired):  # moto slow to stop on a loaded machine: its results stay
            night_on_s3(args, rows, output, build, nights, save)


def night_on_s3(args: argparse.Namespace, rows: int, output: Path, build: dict, nights: list, save: Callable) -> None:
    import s3fs

    s3_environment()
    with moto_server() as endpoint, counting_proxy(endpoint) as (proxy, _):
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
        for variant in args.variants:
            for via, target in (("direct", endpoint), ("counted", proxy)):
                if via not in args.s3_via:
                    continue
                bucket = f"night-{variant}-{via}"
                fs.mkdir(bucket)
                started = time.perf_counter()
                fs.put(f"{output}/", f"{bucket}/out", recursive=True)
                uploaded = round(time.perf_counter() - started, 1)
                result = run_night(
                    [
                        f"s3://{bucket}/out",
                        variant,
                        json.dumps(build),
                        str(args.night_rows),
                        json.dumps({"endpoint_url": target}),
                        proxy if via == "counted" else "",
                    ]
                )
                nights.append(
                    {**result, "store": f"s3 {via}", "upload_seconds": uploaded, "loadavg_before": os.getloadavg()}
                )
                show(f"s3 ({via}) {rows:,} night {variant}", result)
                save()
                fs.rm(bucket, recursive=True)


def latest_of_files(work: Path, files: int) -> dict[str, Any]:
    """``latest`` as it would be at ``files`` x ``ROWS_PER_FILE`` rows (25,000 files: 100M rows), one commit of that
    many adds (hard links to one real file, each with its own bounds, as the merge's sorted files have), then what
    grows with its files: opening it, a dataset over it (delta-rs's and ``tables.dataset``), a count, the merge's
    choice of files for a night's ids, and peak memory."""
    import duckdb
    from deltalake import CommitProperties
    from deltalake.transaction import AddAction

    output = work / f"latest-{files}"
    shutil.rmtree(output, ignore_errors=True)
    location = OutputLocation.open(str(output))
    tables.ensure_tables(location)
    rows = night_rows([f"s3://camera/x/shard-{i:03d}.tar" for i in range(4)], 1000, "r", FIRST_NIGHT, 0)
    one = output / LATEST / "one.parquet"
    pq.write_table(rows.slice(0, ROWS_PER_FILE), one, compression="zstd")
    stats, size, actions = file_stats(rows.slice(0, ROWS_PER_FILE)), one.stat().st_size, []
    for i in range(files):
        name = f"part-{i:07d}.parquet"
        os.link(one, output / LATEST / name)
        low, high = f"s3://camera/{i:07d}/shard-000.tar", f"s3://camera/{i:07d}/shard-003.tar"
        bounds = {"image_id": (f"{low}#000000.jpg", f"{high}#000999.jpg"), "source": (low, high)}
        file_stat = {
            **stats,
            "minValues": {**stats["minValues"], **{k: v[0] for k, v in bounds.items()}},
            "maxValues": {**stats["maxValues"], **{k: v[1] for k, v in bounds.items()}},
        }
        actions.append(AddAction(name, size, {}, 0, True, json.dumps(file_stat)))
    one.unlink()
    table = tables.open_table(location, LATEST)
    table.create_write_transaction(actions, mode="append", schema=table.schema(), commit_properties=CommitProperties())
    table.create_checkpoint()
    result: dict[str, Any] = {"files": files, "rows": files * ROWS_PER_FILE}
    phases = Phases()
    with phases.phase("open"):
        table = tables.open_table(location, LATEST)
    with phases.phase("delta-rs to_pyarrow_dataset"):
        table.to_pyarrow_dataset()
    with phases.phase("tables.dataset"):
        dataset = tables.dataset(location, LATEST)
    with phases.phase("count (DuckDB over tables.dataset)"), duckdb.connect() as db:
        db.register("latest", dataset)
        result["count"] = db.execute("SELECT count(*) FROM latest").fetchone()[0]
    ids = sorted(f"s3://camera/{i:07d}/shard-001.tar#000001.jpg" for i in range(0, files, 100))
    with phases.phase("merge: files whose bounds hold 1% of files' ids"):
        held = tables.table_files(table)
        result["candidates"] = sum(tables._any_within(ids, f, "image_id") for f in held)
    result.update(seconds=phases.seconds, peak_mib=phases.peak)
    print(f"latest of {files:,} files: {result}", flush=True)
    shutil.rmtree(output, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="*", type=int, default=[1_000_000, 10_000_000])
    parser.add_argument("--s3", nargs="*", type=int, default=[], help="row counts to run night 366 for on moto too")
    parser.add_argument("--s3-via", nargs="+", choices=["direct", "counted"], default=["direct", "counted"])
    parser.add_argument("--nights", type=int, default=365)
    parser.add_argument("--rows-per-shard", type=int, default=1000)
    parser.add_argument("--night-rows", type=int, default=1_000_000, help="new rows of night (a)")
    parser.add_argument("--variants", nargs="+", choices=["a", "b"], default=["a", "b"])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--workdir", default="/tmp/delta-scale-bench")
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--history", help="where the histories are kept (default: the work folder)")
    parser.add_argument(
        "--upgrade",
        action="store_true",
        help="the history was written by older code: bring it to this code's steady state (table properties, "
        "compacted shards and runs) before night 366, timed apart",
    )
    parser.add_argument("--label", default="", help="what code this measures (before / after)")
    parser.add_argument("--json")
    parser.add_argument("--latest-files", nargs="*", type=int, default=[], help="also: latest alone at N files")
    args = parser.parse_args()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "label": args.label,
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": _cpu_model(),
            **{name: _version(name) for name in ("deltalake", "duckdb", "pyarrow", "moto")},
        },
        "code": {
            name: hashlib.sha256((ROOT / "pipeline" / name).read_bytes()).hexdigest()[:12]
            for name in ("tables.py", "runs.py", "incremental.py", "query.py")
        },
        "command": " ".join(["python", *sys.argv]),
        "rows_per_file": ROWS_PER_FILE,
        "loadavg_start": os.getloadavg(),
        "scales": {},
    }
    started = time.perf_counter()

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))

    for rows in args.rows:
        scale(args, rows, results["scales"].setdefault(str(rows), {}), save)
        results["loadavg_after_" + str(rows)] = os.getloadavg()
        save()
    for files in args.latest_files:
        results.setdefault("latest_alone", []).append(latest_of_files(Path(args.workdir), files))
    results["seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_night":
        output, variant, build, night_rows_, options, counter = sys.argv[2:8]
        print(
            json.dumps(
                measure_night(
                    output, variant, json.loads(build), int(night_rows_), json.loads(options), counter or None
                )
            )
        )
    else:
        main()
