"""DuckDB over the committed runs of an output location, local or on object storage.

Views (only committed runs are ever seen: every file is taken from a manifest, never from a directory listing):

``predictions``  every committed row; ``embedding`` is a fixed-size ``FLOAT[D]`` array
``latest``       one row per image: its newest committed result. A later run that read a shard whole replaces
                 everything older from that shard; a retry of single images replaces just those images.
``errors``       the rows of ``latest`` that failed
``runs``         one row per committed run, from the manifests, in commit order (``seq``)
``shards``       the shards each run processed, with their ETag, size and row count

Files are read through fsspec (s3fs, gcsfs, ...), so DuckDB needs no extension and no download.
"""

from __future__ import annotations

import warnings
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds

from pipeline.runs import OutputLocation, committed_paths, read_manifests, read_shards
from pipeline.sink import arrow_filesystem, output_schema

LATEST = """
CREATE VIEW latest AS
WITH ordered AS (  -- narrow columns only: deciding which row wins never moves embeddings around
    SELECT p.image_id, p.source, p.run_id, p.processed_at, r.seq FROM predictions p JOIN runs r USING (run_id)
), last_whole AS (  -- the newest run that read each shard whole
    SELECT s.url AS source, max(r.seq) AS seq FROM shards s JOIN runs r USING (run_id)
    WHERE NOT s.partial GROUP BY s.url
), winners AS (
    SELECT o.image_id, o.run_id FROM ordered o LEFT JOIN last_whole w USING (source)
    WHERE o.seq >= coalesce(w.seq, 0)
    QUALIFY row_number() OVER (PARTITION BY o.image_id ORDER BY o.seq DESC, o.processed_at DESC) = 1
)
SELECT p.* FROM predictions p SEMI JOIN winners w ON p.image_id = w.image_id AND p.run_id = w.run_id
"""


def connect(output: str | OutputLocation, storage_options: dict | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the views above registered over ``output``'s committed runs."""
    location = output if isinstance(output, OutputLocation) else OutputLocation.open(output, storage_options)
    manifests = read_manifests(location)
    db = duckdb.connect()
    db.register("_predictions", dataset(location, manifests=manifests))
    db.register("_runs", _runs_table(manifests))
    db.register("_shards", read_shards(location, manifests))
    db.execute("CREATE VIEW predictions AS SELECT * FROM _predictions")
    db.execute("CREATE VIEW runs AS SELECT * FROM _runs")
    db.execute("CREATE VIEW shards AS SELECT * FROM _shards")
    db.execute(LATEST)
    db.execute("CREATE VIEW errors AS SELECT * FROM latest WHERE status = 'error'")
    return db


def dataset(
    output: str | OutputLocation, storage_options: dict | None = None, manifests: list[dict] | None = None
) -> ds.Dataset:
    """A pyarrow dataset of every committed row (files named by manifests, read through fsspec)."""
    location = output if isinstance(output, OutputLocation) else OutputLocation.open(output, storage_options)
    manifests = read_manifests(location) if manifests is None else manifests
    files = committed_paths(location, manifests)
    if not files:
        return ds.dataset(output_schema(2048, "float32").empty_table())
    return ds.dataset(files, format="parquet", filesystem=arrow_filesystem(location.fs))


RUN_COLUMNS = {
    "seq": pa.int32(),
    "run_id": pa.string(),
    "name": pa.string(),
    "mode": pa.string(),
    "started_at": pa.string(),
    "committed_at": pa.string(),
    "wall_seconds": pa.float64(),
    "rows": pa.int64(),
    "ok": pa.int64(),
    "error": pa.int64(),
    "images_per_second": pa.float64(),
    "architecture": pa.string(),
    "weights": pa.string(),
    "fingerprint": pa.string(),
    "work_key": pa.string(),
    "shards_read": pa.int64(),
    "shards_skipped": pa.int64(),
    "shards_adopted": pa.int64(),
}


def _runs_table(manifests: list[dict[str, Any]]) -> pa.Table:
    rows = []
    for seq, m in enumerate(manifests, start=1):
        model, counts, plan = m.get("model", {}), m.get("counts", {}), m.get("plan", {})
        fingerprint = model.get("fingerprint")
        rows.append(
            {
                "seq": seq,
                "run_id": m["run_id"],
                "name": m.get("spec", {}).get("name"),
                "mode": plan.get("mode", "full"),
                "started_at": m.get("started_at"),
                "committed_at": m.get("committed_at") or m.get("finished_at"),
                "wall_seconds": m.get("wall_seconds"),
                "rows": counts.get("rows"),
                "ok": counts.get("ok"),
                "error": counts.get("error"),
                "images_per_second": m.get("images_per_second"),
                "architecture": model.get("architecture"),
                "weights": model.get("weights"),
                "fingerprint": ",".join(fingerprint) if isinstance(fingerprint, list) else fingerprint,
                "work_key": model.get("key"),
                "shards_read": plan.get("to_read"),
                "shards_skipped": plan.get("skipped_unchanged"),
                "shards_adopted": plan.get("adopted"),
            }
        )
    return pa.Table.from_pylist(rows, pa.schema(list(RUN_COLUMNS.items())))


class QueryError(ValueError):
    """A question the output cannot answer as asked (unknown label or image); the message says why."""


def search(
    db: duckdb.DuckDBPyConnection, label: str, *, min_score: float = 0.0, in_top_k: int = 1, limit: int | None = None
) -> pa.Table:
    """Images (from ``latest``) carrying ``label`` (a class name or WordNet id) among their first ``in_top_k``
    labels with at least ``min_score``; best score first."""
    found = db.execute(
        "SELECT DISTINCT t.label, t.wnid FROM (SELECT unnest(top_k) AS t FROM latest WHERE status = 'ok') "
        "WHERE lower(t.label) = lower($name) OR t.wnid = $name",
        {"name": label},
    ).fetchall()
    if not found:
        raise QueryError(_unknown_label(db, label))
    sql = f"""
        SELECT image_id, t.label, t.wnid, t.score, rank, source, run_id FROM (
            SELECT image_id, source, run_id, unnest(top_k[1:$k]) AS t, generate_subscripts(top_k[1:$k], 1) AS rank
            FROM latest WHERE status = 'ok'
        ) WHERE (lower(t.label) = lower($name) OR t.wnid = $name) AND t.score >= $min_score
        ORDER BY t.score DESC, image_id {"LIMIT " + str(int(limit)) if limit else ""}
    """
    return fetch_arrow(db, sql, {"k": in_top_k, "name": label, "min_score": min_score})


def _unknown_label(db: duckdb.DuckDBPyConnection, label: str) -> str:
    import difflib

    from pipeline.model.labels import imagenet_labels

    names = [c.label for c in imagenet_labels()] + [
        row[0] for row in db.execute("SELECT DISTINCT label FROM latest WHERE label IS NOT NULL").fetchall()
    ]
    close = difflib.get_close_matches(label.lower(), sorted({n.lower() for n in names}), n=5, cutoff=0.6)
    hint = f"; did you mean: {', '.join(close)}?" if close else ""
    return f"no image in this output carries the label {label!r} (a class name or a WordNet id like n01440764){hint}"


def similar(db: duckdb.DuckDBPyConnection, image_id: str, k: int = 10) -> pa.Table:
    """The ``k`` images (from ``latest``) nearest to ``image_id`` by cosine similarity of embeddings, itself first.

    Exact search: one pass over every stored embedding, inside DuckDB.
    """
    found = db.execute(
        "SELECT embedding IS NOT NULL, status, array_length(embedding) FROM latest WHERE image_id = $id",
        {"id": image_id},
    ).fetchall()
    if not found:
        raise QueryError(f"no image {image_id!r} in this output (image ids are full URLs or paths; see `latest`)")
    has_embedding, status, dimension = found[0]
    if not has_embedding:
        raise QueryError(f"{image_id!r} has no embedding (status {status}; or the run stored none)")
    return fetch_arrow(
        db,
        f"""
        WITH query AS (SELECT embedding::FLOAT[{dimension}] AS q FROM latest WHERE image_id = $id)
        SELECT image_id, array_cosine_similarity(embedding::FLOAT[{dimension}], q) AS similarity, label, score, source
        FROM latest, query WHERE embedding IS NOT NULL
        ORDER BY image_id = $id DESC, similarity DESC, image_id LIMIT $k
        """,
        {"id": image_id, "k": k},
    )


def fetch_arrow(db: duckdb.DuckDBPyConnection, sql: str, params: dict[str, Any] | None = None) -> pa.Table:
    """A query's result as Arrow, through ``execute`` so that a caller's unfinished result never blocks it."""
    with warnings.catch_warnings():  # "an extra copy of the rows": small results here (k rows, matches)
        warnings.simplefilter("ignore", UserWarning)
        return db.execute(sql, params or {}).to_arrow_table()
