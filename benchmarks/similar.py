"""How fast is exact `similar` over N stored embeddings?

Builds an output location the way the pipeline leaves one (committed runs, Parquet files of the output contract,
one manifest per run) holding N rows with D-dimensional embeddings, then times, in one process:

  (a) `pipeline.query.similar`: connect (read the manifests, register the views) + the DuckDB query, cold and warm;
  (b) a baseline: read the `embedding` column with pyarrow and rank with NumPy (what a user would write by hand).

    python benchmarks/similar.py --rows 100000 --dim 2048 --workdir /tmp/similar-bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.query import connect, dataset, similar
from pipeline.runs import OutputLocation, commit, inspect_staged
from pipeline.sink import output_schema


def build(root: Path, rows: int, dim: int, runs: int, rows_per_file: int, seed: int = 0) -> str:
    """``runs`` committed runs sharing ``rows`` images; image 1 is a near-duplicate of image 0."""
    if root.exists():
        shutil.rmtree(root)
    location = OutputLocation.open(str(root))
    rng = np.random.default_rng(seed)
    schema = output_schema(dim)
    per_run = rows // runs
    for run in range(runs):
        run_id = f"20261129T0000{run:02d}Z-bench{run}"
        for start in range(run * per_run, (run + 1) * per_run, rows_per_file):
            count = min(rows_per_file, (run + 1) * per_run - start)
            embeddings = rng.standard_normal((count, dim), dtype=np.float32)
            if start == 0:
                embeddings[1] = embeddings[0] + 0.05 * rng.standard_normal(dim, dtype=np.float32)
            ids = [f"s3://bucket/images/{i:07d}.jpg" for i in range(start, start + count)]
            table = pa.table(
                {
                    "image_id": ids,
                    "source": ids,
                    "status": ["ok"] * count,
                    "error": pa.nulls(count, pa.string()),
                    "label": ["tench"] * count,
                    "class_id": pa.array([0] * count, pa.int32()),
                    "score": pa.array(rng.random(count, dtype=np.float32)),
                    "top_k": pa.array(
                        [[{"class_id": 0, "wnid": "n01440764", "label": "tench", "score": 0.5}]] * count,
                        schema.field("top_k").type,
                    ),
                    "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), dim),
                    "width": pa.array([640] * count, pa.int32()),
                    "height": pa.array([480] * count, pa.int32()),
                    "model": ["resnet50"] * count,
                    "model_fingerprint": ["0" * 64] * count,
                    "run_id": [run_id] * count,
                    "processed_at": pa.array([datetime.now(timezone.utc)] * count, pa.timestamp("us", tz="UTC")),
                },
                schema=schema,
            )
            staging = location.staging(run_id)
            os.makedirs(staging, exist_ok=True)
            pq.write_table(table, f"{staging}/part-{start:07d}.parquet")
        shards = [{"url": f"s3://bucket/images/{run}", "format": "images", "size": 1, "etag": "x", "rows": per_run}]
        commit(location, run_id, inspect_staged(location, run_id), {"run_id": run_id}, shards)
    return str(root)


def timed(function, repeat: int = 3) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - started)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=4, help="committed runs the rows are spread over")
    parser.add_argument("--rows-per-file", type=int, default=15_000, help="about 128 MB files at 2048-d")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/similar-bench"))
    parser.add_argument("--json", type=Path, help="write the numbers here too")
    args = parser.parse_args()

    started = time.perf_counter()
    output = build(args.workdir, args.rows, args.dim, args.runs, args.rows_per_file)
    build_seconds = time.perf_counter() - started
    query_id = "s3://bucket/images/0000000.jpg"

    def pipeline_cold():
        with connect(output) as db:
            return similar(db, query_id, args.k).column("image_id").to_pylist()

    db = connect(output)
    similar(db, query_id, args.k)  # warm the file cache and DuckDB

    def pipeline_warm():
        return similar(db, query_id, args.k).column("image_id").to_pylist()

    def numpy_baseline():
        table = dataset(output).to_table(columns=["image_id", "embedding"])
        ids = table.column("image_id").to_pylist()
        vectors = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, args.dim)
        query = vectors[ids.index(query_id)]
        scores = vectors @ query / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(query))
        best = np.argsort(-scores)[: args.k]
        return [ids[i] for i in best]

    cold, nearest = timed(pipeline_cold)
    warm, _ = timed(pipeline_warm)
    baseline, expected = timed(numpy_baseline)
    assert nearest[:2] == ["s3://bucket/images/0000000.jpg", "s3://bucket/images/0000001.jpg"], nearest
    assert nearest == expected, (nearest, expected)
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "command": f"python benchmarks/similar.py --rows {args.rows} --dim {args.dim} --runs {args.runs}",
        "rows": args.rows,
        "dim": args.dim,
        "runs": args.runs,
        "build_seconds": round(build_seconds, 1),
        "similar_cold_seconds": round(cold, 3),
        "similar_warm_seconds": round(warm, 3),
        "numpy_baseline_seconds": round(baseline, 3),
        "baseline_over_similar_cold": round(baseline / cold, 2),
    }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
