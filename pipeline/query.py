"""DuckDB over an output's Delta Lake tables, local or on object storage.

Views (only committed rows are ever seen: each table is read as of its Delta log, never by listing files):

``predictions``  every committed row (the ``predictions`` table); ``embedding`` is a ``FLOAT[]`` of D values
``latest``       one row per image: its newest committed result (the ``latest`` table). A later run that read a
                 shard whole replaces everything older from that shard; a retry of single images replaces just those.
``errors``       the rows of ``latest`` that failed
``runs``         one row per committed run, in commit order (``seq``; ``version``: of the predictions table)
``shards``       the shards each committed run processed, with their ETag, size and row count

The tables are read through delta-rs into Arrow, so DuckDB needs no extension and no download. The SQL asked is run
as given, file functions (``read_csv``, ``COPY``, ``ATTACH``, ``INSTALL``) included; ``connect(..., safe=True)``
shuts DuckDB off from files, URLs and extensions once the views are registered, for SQL that comes from elsewhere.

Results stream (:func:`export`, :func:`relation`): DuckDB writes files itself (``COPY ... TO``), and readers get
Arrow record batches, so no result is ever held whole in memory.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds

from pipeline import tables
from pipeline.runs import LATEST, PREDICTIONS, RUNS, SHARDS, OutputLocation
from pipeline.storage import identifier, literal

if TYPE_CHECKING:
    from pipeline.vector_index import SimilarIndex

VIEWS = (
    "CREATE VIEW predictions AS SELECT * FROM _predictions",
    "CREATE VIEW latest AS SELECT * FROM _latest",
    "CREATE VIEW errors AS SELECT * FROM latest WHERE status = 'error'",
    "CREATE VIEW runs AS SELECT row_number() OVER (ORDER BY version)::INTEGER AS seq, * FROM _runs ORDER BY version",
    "CREATE VIEW shards AS SELECT s.* FROM _shards s SEMI JOIN _runs r USING (run_id)",  # committed runs' only
)


SAFE_SETTINGS = (
    "SET enable_external_access = false",  # no file, URL or database: read_csv, COPY, ATTACH, INSTALL, glob fail
    "SET autoinstall_known_extensions = false",
    "SET autoload_known_extensions = false",
    "SET lock_configuration = true",  # last: no SET can undo the above
)


def connect(
    output: str | OutputLocation,
    storage_options: dict | None = None,
    *,
    safe: bool = False,
    as_of: int | datetime | None = None,
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the views above registered over ``output``'s tables.

    ``safe``: the connection reads the views and nothing else. The views read Arrow datasets that Python opened, so
    they work on; every file, URL, database and extension DuckDB would open itself is refused, and so is any SET.

    ``as_of``: the output as it was at a version of the predictions table (the ``version`` column of ``runs``), or
    at a time: every view shows what was committed then (:func:`pipeline.tables.as_of`).
    """
    location = output if isinstance(output, OutputLocation) else OutputLocation.open(output, storage_options)
    tables.check_format(location)
    versions = tables.as_of(location, as_of) if as_of is not None else {}
    db = duckdb.connect()
    for name in (PREDICTIONS, LATEST, RUNS, SHARDS):
        db.register(f"_{name}", tables.dataset(location, name, versions.get(name)))
    for view in VIEWS:
        db.execute(view)
    if as_of is not None:  # runs (and so shards) committed by then, though their rows were written later
        db.execute(
            "CREATE OR REPLACE VIEW runs AS SELECT row_number() OVER (ORDER BY version)::INTEGER AS seq, * "
            f"FROM _runs WHERE version <= {versions[PREDICTIONS]} ORDER BY version"
        )
        db.execute("CREATE OR REPLACE VIEW shards AS SELECT s.* FROM _shards s SEMI JOIN runs r USING (run_id)")
    if safe:
        for setting in SAFE_SETTINGS:
            db.execute(setting)
    return db


def dataset(
    output: str | OutputLocation,
    storage_options: dict | None = None,
    table: str = PREDICTIONS,
    as_of: int | str | datetime | None = None,
) -> ds.Dataset:
    """One of the output's tables as a pyarrow dataset (committed files only), as of a version or a time."""
    location = output if isinstance(output, OutputLocation) else OutputLocation.open(output, storage_options)
    return tables.dataset(location, table, as_of)


class QueryError(ValueError):
    """A question the output cannot answer as asked (unknown label or image); the message says why."""


@dataclass(frozen=True)
class Query:
    """A statement and its parameter values, run where its rows are read: whole (:func:`fetch_arrow`), a batch at a
    time (:func:`relation`) or into a file (:func:`export`)."""

    sql: str
    params: dict[str, Any] = field(default_factory=dict)


def search(
    db: duckdb.DuckDBPyConnection, label: str, *, min_score: float = 0.0, in_top_k: int = 1, limit: int | None = None
) -> pa.Table:
    """Images (from ``latest``) carrying ``label`` (a class name or WordNet id) among their first ``in_top_k``
    labels with at least ``min_score``; best score first."""
    query = search_query(db, label, min_score=min_score, in_top_k=in_top_k, limit=limit)
    return fetch_arrow(db, query.sql, query.params)


def search_query(
    db: duckdb.DuckDBPyConnection, label: str, *, min_score: float = 0.0, in_top_k: int = 1, limit: int | None = None
) -> Query:
    """:func:`search`'s query, not run; raises QueryError for a label no image carries."""
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
    return Query(sql, {"k": in_top_k, "name": label, "min_score": min_score})


def _unknown_label(db: duckdb.DuckDBPyConnection, label: str) -> str:
    import difflib

    from pipeline.model.labels import imagenet_labels

    names = [c.label for c in imagenet_labels()] + [
        row[0] for row in db.execute("SELECT DISTINCT label FROM latest WHERE label IS NOT NULL").fetchall()
    ]
    close = difflib.get_close_matches(label.lower(), sorted({n.lower() for n in names}), n=5, cutoff=0.6)
    hint = f"; did you mean: {', '.join(close)}?" if close else ""
    return f"no image in this output carries the label {label!r} (a class name or a WordNet id like n01440764){hint}"


def similar(
    db: duckdb.DuckDBPyConnection,
    image_id: str,
    k: int = 10,
    index: SimilarIndex | None = None,
    *,
    nprobes: int | None = None,
    refine: int | None = None,
) -> pa.Table:
    """The ``k`` images (from ``latest``) nearest to ``image_id`` by cosine similarity of embeddings, itself first.

    Exact search (one pass over every stored embedding, inside DuckDB) unless ``index`` is given
    (:func:`pipeline.vector_index.open_index`): then approximate, with ``nprobes`` and ``refine`` trading recall
    for time, and a :class:`~pipeline.vector_index.StaleIndexWarning` when runs were committed after it was built.
    """
    query = similar_query(db, image_id, k, index, nprobes=nprobes, refine=refine)
    return fetch_arrow(db, query.sql, query.params)


def similar_query(
    db: duckdb.DuckDBPyConnection,
    image_id: str,
    k: int = 10,
    index: SimilarIndex | None = None,
    *,
    nprobes: int | None = None,
    refine: int | None = None,
) -> Query:
    """:func:`similar`'s query, not run (with an index, the search is done and its rows wait in ``db``); raises
    QueryError for an unknown image or one without an embedding."""
    if index is not None and index.up_to_date and (row := index.indexed_row(image_id)) is not None:
        # latest holds what the index holds: the image's row comes from the index, without a pass over latest
        return index.similar_query(db, image_id, k, nprobes=nprobes, refine=refine, row=row)
    found = db.execute(
        "SELECT embedding IS NOT NULL, status, array_length(embedding) FROM latest WHERE image_id = $id",
        {"id": image_id},
    ).fetchall()
    if not found:
        raise QueryError(f"no image {image_id!r} in this output (image ids are full URLs or paths; see `latest`)")
    has_embedding, status, dimension = found[0]
    if not has_embedding:
        raise QueryError(f"{image_id!r} has no embedding (status {status}; or the run stored none)")
    if index is not None:
        return index.similar_query(db, image_id, k, nprobes=nprobes, refine=refine)
    sql = f"""
        WITH query AS (SELECT embedding::FLOAT[{dimension}] AS q FROM latest WHERE image_id = $id)
        SELECT image_id, array_cosine_similarity(embedding::FLOAT[{dimension}], q) AS similarity, label, score, source
        FROM latest, query WHERE embedding IS NOT NULL
        ORDER BY image_id = $id DESC, similarity DESC, image_id LIMIT $k
    """
    return Query(sql, {"id": image_id, "k": k})


def fetch_arrow(db: duckdb.DuckDBPyConnection, sql: str, params: dict[str, Any] | None = None) -> pa.Table:
    """A query's result as Arrow, through ``execute`` so that a caller's unfinished result never blocks it."""
    with warnings.catch_warnings():  # "an extra copy of the rows": small results here (k rows, matches)
        warnings.simplefilter("ignore", UserWarning)
        return db.execute(sql, params or {}).to_arrow_table()


# --- streamed results: files, CSV and JSON lines ------------------------------------------------------------------

FORMATS = ("csv", "json", "parquet")
BATCH_ROWS = 10_000
NESTED = ("list", "array", "struct", "map", "union")  # DuckDB type ids CSV cannot hold


def relation(
    db: duckdb.DuckDBPyConnection, query: Query, output_format: str | None = None
) -> duckdb.DuckDBPyRelation | None:
    """The query's rows, not yet run: ``to_arrow_reader()`` streams them. A statement that is no query (SET,
    CREATE) runs now; None when it returns nothing.

    For ``csv`` the nested columns (``top_k``, ``embedding``) are left out: CSV cannot hold them, JSON and Parquet can.
    """
    rel = db.sql(query.sql, params=query.params or None)
    if rel is None or output_format != "csv":
        return rel
    flat = [name for name, kind in zip(rel.columns, rel.types, strict=True) if kind.id not in NESTED]
    if not flat:
        raise QueryError(f"no column fits in CSV ({', '.join(rel.columns)} are nested): use JSON or Parquet")
    return rel if len(flat) == len(rel.columns) else rel.project(", ".join(identifier(name) for name in flat))


def export(db: duckdb.DuckDBPyConnection, query: Query, output_format: str, path: Path) -> None:
    """Every row of the query into ``path`` (csv, json lines or parquet), streamed.

    DuckDB writes the file itself (``COPY ... TO``). A safe connection may not write files: there the rows come out
    in Arrow batches, written by pyarrow (Parquet) or Python (CSV, JSON lines).
    """
    rel = relation(db, query, output_format)
    if rel is None:
        raise QueryError("the statement returns no rows to write")
    if db.execute("SELECT current_setting('enable_external_access')").fetchall() == [(True,)]:
        rel.create_view("_export")  # parameter values become literals: COPY takes none
        db.execute(f"COPY _export TO {literal(str(path))} (FORMAT {output_format})")
        return
    import pyarrow.parquet as pq

    with rel.to_arrow_reader(BATCH_ROWS) as reader:
        if output_format == "parquet":
            with pq.ParquetWriter(path, reader.schema) as writer:
                for batch in reader:
                    writer.write_batch(batch)
        else:
            with Path(path).open("w", encoding="utf-8", newline="") as f:
                f.writelines(text_lines(reader, output_format))


def text_lines(reader: pa.RecordBatchReader, output_format: str) -> Iterator[str]:
    """CSV (a header, then rows) or JSON lines (one object per row), as text, a batch at a time."""
    names = reader.schema.names
    if output_format == "csv":
        yield _csv_text([names])
    for batch in reader:
        if output_format == "csv":
            yield _csv_text(rows(batch))
        else:
            yield "".join(json.dumps(dict(zip(names, row, strict=True)), default=str) + "\n" for row in rows(batch))


def rows(batch: pa.RecordBatch) -> Iterator[tuple]:
    """A batch's rows as tuples (columns in order, so two columns of one name stay two)."""
    return zip(*(column.to_pylist() for column in batch.columns), strict=True)


def _csv_text(records: Iterator[tuple] | list[list[str]]) -> str:
    sink = io.StringIO()
    csv.writer(sink, lineterminator="\n").writerows(records)
    return sink.getvalue()
