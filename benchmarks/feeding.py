"""How fast Ray Data moves decoded pixels into one model actor, with no decoding and no model: the ceiling a GPU
replica sees from the feeding path alone.

    python benchmarks/feeding.py --images 12800 --block-rows 64 256 --batch-size 256

Tasks emit blocks of ``--block-rows`` rows of 224x224x3 uint8 pixels, as the decode stage does; one actor takes
batches of ``--batch-size`` (sums a pixel per image, returns ids and 2048 zeros per row, as the predictor returns an
embedding); the driver counts the rows. Every run is a fresh Ray cluster; the sizes take turns, ``--repeat`` times,
and the median counts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def feed(images: int, block_rows: int, batch_size: int) -> float:
    import numpy as np
    import ray
    from ray.data import ActorPoolStrategy

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    task_rows = 256

    def produce(batch):
        for _ in batch["task"]:
            for start in range(0, task_rows, block_rows):
                rows = min(block_rows, task_rows - start)
                yield {
                    "image_id": np.array([f"img-{i}" for i in range(rows)], dtype=object),
                    "pixels": np.full((rows, 224, 224, 3), 7, np.uint8),
                }

    class NoModel:
        def __call__(self, batch):
            batch["pixels"][:, 0, 0, 0].sum()
            return {"image_id": batch["image_id"], "embedding": np.zeros((len(batch["image_id"]), 2048), np.float32)}

    tasks = images // task_rows
    dataset = (
        ray.data.from_items([{"task": i} for i in range(tasks)], override_num_blocks=tasks)
        .map_batches(produce, batch_size=1)
        .map_batches(
            NoModel,
            batch_size=batch_size,
            batch_format="numpy",
            compute=ActorPoolStrategy(min_size=1, max_size=1),
            num_cpus=1,
            memory=2**30,  # as the pipeline's actors: keeps Ray Data from fusing the two stages
        )
    )
    started, rows = time.perf_counter(), 0
    for batch in dataset.iter_batches(batch_size=None):
        rows += len(batch["image_id"])
    assert rows == tasks * task_rows, rows
    return rows / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=12800)
    parser.add_argument("--block-rows", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(feed(*args.worker)))
        return

    rates: dict[int, list[float]] = {block_rows: [] for block_rows in args.block_rows}
    for _ in range(args.repeat):  # interleaved, so drift in the machine hits every size alike
        for block_rows in args.block_rows:
            command = [sys.executable, __file__, "--worker", str(args.images), str(block_rows), str(args.batch_size)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            rates[block_rows].append(round(json.loads(done.stdout.strip().splitlines()[-1]), 1))
            print(block_rows, rates[block_rows][-1], flush=True)
    results = {
        f"blocks of {block_rows} rows": {"median_images_per_second": statistics.median(runs), "runs": runs}
        for block_rows, runs in rates.items()
    }
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "command": " ".join(sys.argv),
        "batch_size": args.batch_size,
        "results": results,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
