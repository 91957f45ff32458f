"""What the similarity index (``resnet-pipeline index``, ``pipeline.vector_index``) costs and what it finds, against
exact ``similar``, at 100,000 and 1,000,000 embeddings of 2048 float32 values.

Embeddings: a mixture of Gaussians of low intrinsic dimension, like a network's embeddings rather than uniform
noise: ``rows / 1000`` cluster centres in a 48-d latent space (spread 3), each row its centre plus unit noise there,
mapped to 2048-d by one random linear map, plus isotropic noise (0.3 a value).

Sizes up to ``--real-output-max`` rows (default 100,000) are written as a real output (data files of the output
contract committed with ``tables.commit``, which merges them into ``latest``) and indexed with ``vector_index.build``;
larger ones as one Parquet file shaped like ``latest`` (writing and merging 8 GB through a real commit would take
most of the time budget), indexed with ``vector_index.write_index`` over the same DuckDB reader. Both are queried
through ``pipeline.query.similar`` (a view ``latest`` over the Parquet file for the latter).

Measured per size: the build's wall time and peak resident memory (in a fresh process: ``ru_maxrss``), the index's
size on disk (the Lance data, a copy of the embeddings, and the IVF-PQ index), latency of exact ``similar``
(``--exact-queries`` of them: each one is a pass over every embedding) and of ``similar`` through the index (50
queries per setting), and recall@10 against exact top-10 (computed once for all queries with NumPy, a batch of rows
at a time) for a few ``nprobes``/``refine`` settings. Load average before and after each step.

    python benchmarks/similar_index.py --rows 100000 1000000 --workdir /tmp/similar-index-bench \
        --json benchmarks/results-2026-12-02-cpu2-similar-index.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import tables, vector_index  # noqa: E402
from pipeline.manifest import Counts, Manifest, ModelRecord  # noqa: E402
from pipeline.query import connect, similar  # noqa: E402
from pipeline.runs import OutputLocation, StagedOutput, write_data_file  # noqa: E402
from pipeline.sink import output_schema  # noqa: E402

LATENT = 48
CHUNK = 25_000
# None: the index's own default (1/16 of the partitions probed, DEFAULT_REFINE), what `similar` does unless told.
SETTINGS = (
    {"nprobes": 5, "refine": 0},
    {"nprobes": 20, "refine": 10},
    {"nprobes": 60, "refine": 20},
    {"nprobes": None, "refine": None},
    {"nprobes": 125, "refine": 50},
)
RUN_ID = "20261202T120000Z-bench0"


def embeddings(rows: int, dim: int, seed: int = 0):
    """Chunks of (first row, float32 embeddings) of the clustered mixture described above."""
    rng = np.random.default_rng(seed)
    centres = 3.0 * rng.standard_normal((max(10, rows // 1000), LATENT), dtype=np.float32)
    mapping = rng.standard_normal((LATENT, dim), dtype=np.float32) / np.sqrt(LATENT)
    for start in range(0, rows, CHUNK):
        count = min(CHUNK, rows - start)
        latent = centres[rng.integers(0, len(centres), count)] + rng.standard_normal((count, LATENT), dtype=np.float32)
        yield start, latent @ mapping + 0.3 * rng.standard_normal((count, dim), dtype=np.float32)


def latest_rows(start: int, vectors: np.ndarray) -> pa.Table:
    """Rows of the output schema (ok, one label) for images ``start``..; ids name their shard like real ones."""
    count, dim = vectors.shape
    schema = output_schema()
    ids = [f"s3://bucket/shards/{i // 1000:05d}.tar#{i:07d}.jpg" for i in range(start, start + count)]
    columns: dict[str, Any] = {
        "image_id": ids,
        "source": [i.split("#")[0] for i in ids],
        "status": ["ok"] * count,
        "label": ["tench"] * count,
        "class_id": pa.array([0] * count, pa.int32()),
        "score": pa.array(np.full(count, 0.5, dtype=np.float32)),
        "embedding": pa.ListArray.from_arrays(
            pa.array(np.arange(count + 1, dtype=np.int32) * dim), pa.array(vectors.reshape(-1))
        ),
        "width": pa.array([640] * count, pa.int32()),
        "height": pa.array([480] * count, pa.int32()),
        "model": ["resnet50"] * count,
        "model_fingerprint": ["0" * 64] * count,
        "run_id": [RUN_ID] * count,
        "processed_at": pa.array([datetime.now(timezone.utc)] * count, pa.timestamp("us", tz="UTC")),
    }
    return pa.table({f.name: columns.get(f.name, pa.nulls(count, f.type)) for f in schema}, schema=schema)


def write_output(folder: Path, rows: int, dim: int) -> None:
    """A real output: one committed run holding every row (its files of about 32 MB, as the pipeline writes)."""
    location = OutputLocation.open(str(folder))
    tables.ensure_tables(location)
    staged = [
        write_data_file(
            location, RUN_ID, f"part-{start + offset:07d}.parquet", latest_rows(start, vectors).slice(offset, 4000)
        )
        for start, vectors in embeddings(rows, dim)
        for offset in range(0, len(vectors), 4000)
    ]
    output = StagedOutput.of(staged)
    manifest = Manifest(RUN_ID, ModelRecord("resnet50", "random", key="bench"), counts=Counts(rows, rows, 0))
    shards = [{"url": "s3://bucket/shards", "format": "webdataset", "size": 1, "etag": "x", "rows": rows}]
    tables.commit(location, RUN_ID, output, manifest, shards)


def write_parquet(path: Path, rows: int, dim: int) -> None:
    """One Parquet file with ``latest``'s columns (uncompressed: random floats do not compress anyway)."""
    with pq.ParquetWriter(path, output_schema(), compression="none") as writer:
        for start, vectors in embeddings(rows, dim):
            writer.write_table(latest_rows(start, vectors), row_group_size=5000)


def parquet_db(path: Path):
    import duckdb

    db = duckdb.connect()
    db.execute(f"CREATE VIEW latest AS SELECT * FROM read_parquet('{path}')")
    return db


def _build_child(kind: str, place: str, queue) -> None:  # in a spawned process: its peak memory is the build's
    started = time.perf_counter()
    if kind == "output":
        record = vector_index.build(place)
        info = {"num_partitions": record.num_partitions, "num_sub_vectors": record.num_sub_vectors}
    else:
        db = parquet_db(Path(place))
        sql = f"SELECT {', '.join(vector_index.COLUMNS)}, embedding FROM latest WHERE status = 'ok'"
        with db.sql(sql).to_arrow_reader(vector_index.BATCH_ROWS) as reader:
            dataset, partitions, sub_vectors = vector_index.write_index(reader, str(Path(place).parent / "index.lance"))
        info = {"num_partitions": partitions, "num_sub_vectors": sub_vectors, "lance_version": dataset.version}
    info["seconds"] = round(time.perf_counter() - started, 1)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    info["cpu_seconds"] = round(usage.ru_utime + usage.ru_stime, 1)  # the share of the cores it got, on a busy machine
    info["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    queue.put(info)


def build_in_child(kind: str, place: str) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_build_child, args=(kind, place, queue))
    process.start()
    info = queue.get()
    process.join()
    return info


def partitions_of(dataset) -> int:
    (index,) = dataset.stats.index_stats("embedding_idx")["indices"]  # pylance 14: per index, not at the top
    return index["num_partitions"]


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def exact_top10(db, queries: list[str], dim: int) -> tuple[dict[str, set[str]], float]:
    """Exact top-10 of every query by cosine similarity, in one pass over ``latest`` with NumPy, 50,000 rows at a
    time (the running best 10 of each query kept between batches); returns them and the pass's seconds."""
    started = time.perf_counter()
    found = db.execute(
        "SELECT image_id, embedding FROM latest WHERE image_id IN (SELECT unnest($ids))", {"ids": queries}
    ).fetchall()
    position = {image_id: i for i, (image_id, _) in enumerate(found)}
    q = np.array([vector for _, vector in found], dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    best_scores = np.full((len(q), 10), -np.inf, dtype=np.float32)
    best_ids = np.empty((len(q), 10), dtype=object)
    sql = "SELECT image_id, embedding FROM latest WHERE status = 'ok' AND embedding IS NOT NULL"
    with db.sql(sql).to_arrow_reader(50_000) as reader:
        for batch in reader:
            ids = np.array(batch.column(0).to_pylist(), dtype=object)
            vectors = batch.column(1).flatten().to_numpy().reshape(-1, dim)
            scores = (vectors @ q.T) / np.linalg.norm(vectors, axis=1, keepdims=True)
            all_scores = np.concatenate([best_scores, scores.T], axis=1)
            all_ids = np.concatenate([best_ids, np.broadcast_to(ids, (len(q), len(ids)))], axis=1)
            keep = np.argpartition(-all_scores, 9, axis=1)[:, :10]
            best_scores = np.take_along_axis(all_scores, keep, axis=1)
            best_ids = np.take_along_axis(all_ids, keep, axis=1)
    seconds = time.perf_counter() - started
    return {image_id: set(best_ids[position[image_id]]) for image_id in queries}, seconds


def latencies(function, queries: list[str]) -> dict[str, float]:
    """Wall and CPU seconds (this process, all its threads) per query: median and 95th percentile."""
    times, cpu = [], []
    for image_id in queries:
        started, started_cpu = time.perf_counter(), time.process_time()
        function(image_id)
        times.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return {
        "queries": len(times),
        "median_s": round(float(np.median(times)), 4),
        "p95_s": round(float(np.percentile(times, 95)), 4),
        "cpu_median_s": round(float(np.median(cpu)), 4),
        "cpu_p95_s": round(float(np.percentile(cpu, 95)), 4),
    }


def parse_setting(text: str) -> dict[str, int | None]:
    """``NPROBES:REFINE``, either ``default`` for the index's own."""
    nprobes, refine = (None if value == "default" else int(value) for value in text.split(":"))
    return {"nprobes": nprobes, "refine": refine}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def measure(
    rows: int,
    dim: int,
    workdir: Path,
    real_output: bool,
    queries_n: int,
    exact_n: int,
    reuse: bool = False,
    settings: tuple[dict[str, int | None], ...] = SETTINGS,
) -> dict[str, Any]:
    folder = workdir / f"{rows}"
    result: dict[str, Any] = {"rows": rows, "dim": dim, "load_before": load()}
    if not reuse:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    started = time.perf_counter()
    if reuse:
        result["data"] = "reused: written and indexed by an earlier invocation"
    elif real_output:
        write_output(folder / "out", rows, dim)
        result["data"] = "real output (one committed run, latest merged)"
    else:
        write_parquet(folder / "latest.parquet", rows, dim)
        result["data"] = "one Parquet file shaped like latest (no Delta commit)"
    if not reuse:
        result["write_seconds"] = round(time.perf_counter() - started, 1)
        result["load_after_write"] = load()
        kind, place = ("output", str(folder / "out")) if real_output else ("parquet", str(folder / "latest.parquet"))
        result["build"] = build_in_child(kind, place)
        print(json.dumps({key: result[key] for key in ("rows", "write_seconds", "build")}), flush=True)
        result["load_after_build"] = load()
    lance_path = folder / "out" / vector_index.FOLDER / vector_index.DATASET if real_output else folder / "index.lance"
    result["index_bytes"] = {
        "total": folder_bytes(lance_path),
        "ivf_pq_index": folder_bytes(lance_path / "_indices"),
        "embeddings_copy_and_columns": folder_bytes(lance_path / "data"),
    }

    if real_output:
        db, index = connect(str(folder / "out")), vector_index.open_index(str(folder / "out"))
    else:
        import lance

        db = parquet_db(folder / "latest.parquet")
        dataset = lance.dataset(str(lance_path))
        record = vector_index.IndexRecord(
            0, 0, dataset.version, rows, dim, partitions_of(dataset),
            dim // 16, vector_index.METRIC, "", 0.0,
        )  # fmt: skip
        index = vector_index.SimilarIndex(OutputLocation.open(str(folder)), record, dataset, 0, 0)
    rng = np.random.default_rng(1)
    picked = sorted(rng.choice(rows, queries_n, replace=False).tolist())
    queries = [f"s3://bucket/shards/{i // 1000:05d}.tar#{i:07d}.jpg" for i in picked]
    exact, seconds = exact_top10(db, queries, dim)
    result["numpy_exact_pass_all_queries_s"] = round(seconds, 1)
    if exact_n:
        result["exact_similar"] = latencies(lambda q: similar(db, q, 10), queries[:exact_n])
        result["load_after_exact"] = load()
    result["index_similar"] = []
    for knobs in settings:
        answers: dict[str, list[str]] = {}

        def ask(image_id: str, knobs=knobs, answers=answers) -> None:
            answers[image_id] = similar(db, image_id, 10, index, **knobs).column("image_id").to_pylist()

        timing = latencies(ask, queries)
        assert all(answers[q][0] == q for q in queries)
        recall = np.mean([len(set(answers[q]) & exact[q]) / 10 for q in queries])
        refine = vector_index.DEFAULT_REFINE if knobs["refine"] is None else knobs["refine"]
        used = {"nprobes": knobs["nprobes"] or index.default_nprobes, "refine": refine}
        defaults = knobs["nprobes"] is None and knobs["refine"] is None
        recall_at_10 = round(float(recall), 3)
        result["index_similar"].append({**used, "defaults": defaults, **timing, "recall_at_10": recall_at_10})
        print(json.dumps(result["index_similar"][-1]), flush=True)
    result["load_after"] = load()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--real-output-max", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--exact-queries", type=int, nargs="+", default=[20, 5], help="per size, in order")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/similar-index-bench"))
    parser.add_argument("--reuse", action="store_true", help="query outputs and indexes an earlier run left")
    parser.add_argument(
        "--settings",
        nargs="+",
        metavar="NPROBES:REFINE",
        help="index settings to ask with instead of the built-in ones; 'default' for either: the index's own",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import duckdb
    import lance

    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {memory:.0f} GiB",
        "versions": {"python": platform.python_version(), "lance": lance.__version__, "duckdb": duckdb.__version__},
        "command": "python " + " ".join(sys.argv),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sizes": [],
    }
    settings = tuple(map(parse_setting, args.settings)) if args.settings else SETTINGS
    for rows, exact_n in zip(args.rows, args.exact_queries, strict=False):
        measured = measure(
            rows, args.dim, args.workdir, rows <= args.real_output_max, args.queries, exact_n, args.reuse, settings
        )
        results["sizes"].append(measured)
        print(json.dumps(measured, indent=2), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
    results["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
