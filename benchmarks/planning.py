"""The driver's work before and while it starts Ray, at a million shards (issue 22): preflight (listing a tree of N
image files and classifying them), planning the run against an output with a year of nightly history (incremental:
365 committed runs covered 99 % of the files, a night at a time), planning it whole, building the read tasks, and
handing them to Ray Data. Time, the step's peak memory and what the driver still holds after it, per step.

    python benchmarks/planning.py --files 1000000 --json benchmarks/results-...-planning.json

The tree is made of empty files on local disk (listing a store is `benchmarks/listing.py`): 1,000 folders of
N/1,000 files. The history is written straight into the `shards` and `runs` tables (one append to each a night, as
`tables.commit` makes them); the rest of a night's commit is `benchmarks/delta_commit.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.delta_commit import peak_mib, reset_peak  # noqa: E402


def resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def make_tree(root: Path, files: int, folders: int = 1000) -> None:
    per_folder = files // folders
    for folder in range(folders):
        path = root / f"{folder:04d}"
        path.mkdir(parents=True)
        for index in range(per_folder):
            os.close(os.open(path / f"IMG_{index:06d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))


def write_history(location, shards, key: str, nights: int) -> None:
    """``nights`` committed runs in the output's ``shards`` and ``runs`` tables, each covering the next slice of
    ``shards`` (what a year of nightly runs over a growing bucket leaves)."""
    import pyarrow as pa
    from deltalake import write_deltalake

    from pipeline.tables import RUNS, RUNS_SCHEMA, SHARDS, SHARDS_SCHEMA, open_table

    per_night = -(-len(shards) // nights)
    for night in range(nights):
        run_id = f"2026{night // 28 % 12 + 1:02d}{night % 28 + 1:02d}T000000Z-{night:06d}"
        covered = shards.table.slice(night * per_night, per_night)
        extra = {"rows": 1, "partial": False, "run_id": run_id, "work_key": key}
        for name, value in extra.items():
            covered = covered.append_column(name, pa.array([value] * covered.num_rows))
        write_deltalake(
            open_table(location, SHARDS), covered.select(SHARDS_SCHEMA.names).cast(SHARDS_SCHEMA), mode="append"
        )
        runs = {name: None for name in RUNS_SCHEMA.names} | {"run_id": run_id, "version": night + 1}
        write_deltalake(open_table(location, RUNS), pa.Table.from_pylist([runs], RUNS_SCHEMA), mode="append")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--nights", type=int, default=365)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from pipeline.incremental import plan_run, work_key
    from pipeline.runner import preflight
    from pipeline.runs import OutputLocation
    from pipeline.spec import parse_spec
    from pipeline.tables import ensure_tables, recover

    report: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()},
        "files": args.files,
        "nights": args.nights,
    }
    steps: dict[str, dict] = {}

    def step(name: str, work, **extra):
        reset_peak()
        started = time.perf_counter()
        result = work()
        steps[name] = {
            "seconds": round(time.perf_counter() - started, 2),
            "peak_mib": round(peak_mib()),
            "held_mib": round(resident_mib()),
            **{key: value(result) for key, value in extra.items()},
        }
        print(name, json.dumps(steps[name]), flush=True)
        return result

    with tempfile.TemporaryDirectory(prefix="planning-") as folder:
        images, output = Path(folder, "images"), Path(folder, "output")
        started = time.perf_counter()
        make_tree(images, args.files)
        report["tree_seconds"] = round(time.perf_counter() - started, 1)
        steps["start"] = {"held_mib": round(resident_mib())}
        print("start", steps["start"], flush=True)

        spec = parse_spec(
            {"input": str(images), "output": str(output), "incremental": True, "model": {"weights": "random"}}
        )
        listing = step("preflight", lambda: preflight(spec), shards=lambda listing: len(listing.shards))
        location = OutputLocation.open(str(output))
        ensure_tables(location)
        key, _ = work_key(spec)
        started = time.perf_counter()
        write_history(location, listing.shards[: len(listing.shards) * 99 // 100], key, args.nights)
        report["history_seconds"] = round(time.perf_counter() - started, 1)

        step("ensure_tables_and_recover", lambda: (ensure_tables(location), recover(location)))
        plan = step(
            "plan_incremental",
            lambda: plan_run(spec, listing.shards, location, key),
            reads=lambda plan: len(plan.reads),
            unchanged=lambda plan: plan.skipped,
        )
        plan = step(
            "plan_full", lambda: plan_run(spec, listing.shards, location, key, full=True), reads=lambda p: len(p.reads)
        )
        tasks = step("read_tasks", lambda: plan.reads.tasks(spec.input.files_per_task), tasks=len)

        import ray

        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
        try:
            step(
                "ray_data_plan",
                lambda: ray.data.from_items([{"task": task} for task in tasks], override_num_blocks=len(tasks)),
                blocks=lambda dataset: dataset.num_blocks(),
            )
        finally:
            ray.shutdown()
    report["steps"] = steps
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
