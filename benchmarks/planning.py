"""The driver's work before Ray starts, at a million shards (issue 22): listing a tree of N image files, classifying
them, planning the run (full, and incremental against an output whose `shards` table already covers all but the
newest 1 %), and building the Ray Data plan's read tasks. Time and the driver's peak memory, per step.

    python benchmarks/planning.py --files 1000000 --json benchmarks/results-...-planning.json

The tree is made of empty files on local disk (listing a store is `benchmarks/listing.py`): 1,000 folders of
N/1,000 files. The incremental case commits one run covering 99 % of the shards into a fresh output first (the
`shards` table is what planning reads; a year of nightly history is `benchmarks/delta_commit.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def make_tree(root: Path, files: int, folders: int = 1000) -> None:
    per_folder = files // folders
    for folder in range(folders):
        path = root / f"{folder:04d}"
        path.mkdir(parents=True)
        for index in range(per_folder):
            os.close(os.open(path / f"IMG_{index:06d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))


def cover(location, shards, key: str) -> None:
    """Commit, into the output's tables, one run whose shards are ``shards`` (what an earlier night processed)."""
    import pyarrow as pa

    from pipeline.tables import RUNS, RUNS_SCHEMA, SHARDS, SHARDS_SCHEMA, open_table

    run_id = "20261201T000000Z-000000"
    records = [{**shard.to_dict(), "rows": 1, "partial": False, "run_id": run_id, "work_key": key} for shard in shards]
    from deltalake import write_deltalake

    write_deltalake(open_table(location, SHARDS), pa.Table.from_pylist(records, SHARDS_SCHEMA), mode="append")
    runs = {name: None for name in RUNS_SCHEMA.names} | {"run_id": run_id, "version": 1}
    write_deltalake(open_table(location, RUNS), pa.Table.from_pylist([runs], RUNS_SCHEMA), mode="append")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from pipeline.incremental import plan_run, work_key
    from pipeline.runner import _read_tasks
    from pipeline.runs import OutputLocation
    from pipeline.sources import list_shards
    from pipeline.spec import parse_spec
    from pipeline.tables import ensure_tables

    report: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "files": args.files}
    steps: dict[str, dict] = {}

    def step(name: str, started: float, **extra) -> None:
        steps[name] = {"seconds": round(time.perf_counter() - started, 2), "peak_mib": peak_mib(), **extra}
        print(name, json.dumps(steps[name]), flush=True)

    with tempfile.TemporaryDirectory(prefix="planning-") as folder:
        images, output = Path(folder, "images"), Path(folder, "output")
        started = time.perf_counter()
        make_tree(images, args.files)
        report["tree_seconds"] = round(time.perf_counter() - started, 1)
        steps["start"] = {"peak_mib": peak_mib()}

        started = time.perf_counter()
        listing = list_shards(str(images))
        step("list", started, shards=len(listing.shards))

        spec = parse_spec({"input": str(images), "output": str(output), "incremental": True})
        location = OutputLocation.open(str(output))
        ensure_tables(location)
        key, _ = work_key(spec)
        started = time.perf_counter()
        plan = plan_run(spec, listing.shards, location, key, full=True)
        step("plan_full", started, reads=len(plan.reads))

        started = time.perf_counter()
        tasks = _read_tasks(plan.reads, spec.input.files_per_task)
        records = [{"task": task.to_record()} for task in tasks]
        step("read_tasks", started, tasks=len(tasks))
        del records

        started = time.perf_counter()
        cover(location, listing.shards[: len(listing.shards) * 99 // 100], key)
        report["cover_seconds"] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        plan = plan_run(spec, listing.shards, location, key)
        step("plan_incremental", started, reads=len(plan.reads), unchanged=plan.skipped)
    report["steps"] = steps
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
