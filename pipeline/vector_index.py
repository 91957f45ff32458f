"""An approximate nearest-neighbour index for ``similar``: a Lance dataset with an IVF-PQ index (cosine) under the
output, built from ``latest``.

Layout under the output URL (the ``_`` prefix keeps input listings and the tables' readers away)::

    _index/similar.lance    Lance dataset: image_id, label, score, source and the embedding of every ok row of
                            ``latest``, with an IVF-PQ index on the embedding (cosine distance)
    _index/similar.json     what it was built from: the Delta versions of ``latest`` and ``predictions``, the Lance
                            version to read, the parameters; written whole, last, so readers see the old index or
                            the new one, never a part

The index is a snapshot: runs committed after it was built are not in it. :func:`open_index` says how many
predictions commits (runs) it is behind, and ``similar`` warns (:class:`StaleIndexWarning`) when it is.

Costs: the Lance dataset holds a copy of the embeddings (4 bytes a value, read back only for the few candidates that
``refine`` re-ranks exactly) and the index about ``num_sub_vectors`` bytes a row (PQ codes).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import tables
from pipeline.credentials import redact_url
from pipeline.query import Query, QueryError
from pipeline.runs import LATEST, PREDICTIONS, RUNS, OutputLocation
from pipeline.storage import literal, read_json, with_retries, write_json

if TYPE_CHECKING:
    import duckdb
    import lance

FOLDER = "_index"
DATASET = "similar.lance"
RECORD = "similar.json"
VECTOR = "embedding"
COLUMNS = ("image_id", "label", "score", "source")  # what ``similar`` prints besides the similarity
METRIC = "cosine"
BATCH_ROWS = 4096
MIN_INDEXED_ROWS = 1024  # fewer rows: no IVF-PQ (too little to train on); the Lance dataset is searched exactly
ROWS_PER_PARTITION = 256  # Lance trains at most rows / 256 IVF partitions
MIN_NPROBES = 20
PROBED_SHARE = 16  # by default 1/16 of the partitions are searched (20 of 316 at 100,000 rows: recall@10 0.996)
# Candidates re-ranked on their stored embeddings, per result: at 1M rows (63 partitions probed) recall@10 is 0.94
# with 10, 0.984 with 50 and 1.0 with 100, at 38, 58 and 109 ms of CPU (benchmarks/RESULTS.md, similarity index).
DEFAULT_REFINE = 50


class VectorIndexError(QueryError):
    """The index cannot be built or read as asked; the message says why."""


class StaleIndexWarning(UserWarning):
    """The index was built before the newest runs were committed: their images are not in it."""


@dataclass(frozen=True)
class IndexRecord:
    """What an index was built from and how (``_index/similar.json``)."""

    predictions_version: int  # the predictions commit that the indexed ``latest`` had merged up to
    latest_version: int
    lance_version: int
    rows: int
    dimension: int
    num_partitions: int  # 0: no IVF-PQ (too few rows), exact search over the Lance dataset
    num_sub_vectors: int
    metric: str
    built_at: str
    build_seconds: float

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> IndexRecord:
        return cls(**{f.name: document[f.name] for f in fields(cls)})


def parameters(
    rows: int, dimension: int, num_partitions: int | None = None, num_sub_vectors: int | None = None
) -> tuple[int, int]:
    """IVF-PQ parameters for ``rows`` vectors of ``dimension``: about sqrt(rows) partitions (at most rows / 256,
    what Lance can train), and sub-vectors of 16 values (8, else the largest divisor up to dimension / 8) so that
    they divide the dimension. Either may be given instead."""
    if num_partitions is None:
        num_partitions = max(1, min(round(math.sqrt(rows)), rows // ROWS_PER_PARTITION))
    if num_sub_vectors is None:
        width = next((w for w in (16, 8) if dimension % w == 0), None)
        num_sub_vectors = (
            dimension // width if width else max(d for d in range(1, max(1, dimension // 8) + 1) if not dimension % d)
        )
    if num_partitions < 1 or num_sub_vectors < 1 or dimension % num_sub_vectors:
        raise VectorIndexError(
            f"num_partitions must be >= 1 and num_sub_vectors must divide the dimension {dimension} "
            f"(got {num_partitions} and {num_sub_vectors})"
        )
    return num_partitions, num_sub_vectors


def _location(output: str | OutputLocation, storage_options: dict | None) -> OutputLocation:
    return output if isinstance(output, OutputLocation) else OutputLocation.open(output, storage_options)


def _uri(location: OutputLocation) -> str:
    return location.table(f"{FOLDER}/{DATASET}")


def _lance_options(location: OutputLocation) -> dict[str, str] | None:
    return location.delta_options or None  # object_store's names serve Lance as they serve delta-rs


def build(
    output: str | OutputLocation,
    storage_options: dict | None = None,
    *,
    num_partitions: int | None = None,
    num_sub_vectors: int | None = None,
    batch_rows: int = BATCH_ROWS,
) -> IndexRecord:
    """Build (or rebuild) the index of ``output`` from its ``latest`` table, as committed now.

    Rows stream from ``latest`` (status ok, with an embedding) into the Lance dataset ``batch_rows`` at a time;
    then the IVF-PQ index is trained and written, then the record. Old Lance versions are removed last.
    """
    import duckdb

    location = _location(output, storage_options)
    tables.check_format(location)
    started = time.perf_counter()
    current = tables.open_table(location, PREDICTIONS).version()
    latest_version = tables.as_of(location, current)[LATEST]
    predictions_version = (tables.merged_version(location, latest_version) or 0) if latest_version else 0
    with duckdb.connect() as db:
        db.register("latest", tables.dataset(location, LATEST, latest_version))
        rows = db.sql(f"SELECT {', '.join(COLUMNS)}, {VECTOR} FROM latest WHERE status = 'ok' AND {VECTOR} IS NOT NULL")
        with rows.to_arrow_reader(batch_rows) as reader:
            dataset, partitions, sub_vectors = write_index(
                reader,
                _uri(location),
                _lance_options(location),
                exists=location.exists(location.path(FOLDER, DATASET)),
                num_partitions=num_partitions,
                num_sub_vectors=num_sub_vectors,
            )
    record = IndexRecord(
        predictions_version=predictions_version,
        latest_version=latest_version,
        lance_version=dataset.version,
        rows=dataset.count_rows(),
        dimension=dataset.schema.field(VECTOR).type.list_size,
        num_partitions=partitions,
        num_sub_vectors=sub_vectors,
        metric=METRIC,
        built_at=datetime.now(timezone.utc).isoformat(),
        build_seconds=round(time.perf_counter() - started, 3),
    )
    write_json(location.fs, location.path(FOLDER, RECORD), asdict(record))
    # Readers follow the record to a version; earlier ones are no longer named by it.
    dataset.cleanup_old_versions(older_than=timedelta(0))
    return record


def write_index(
    rows: pa.RecordBatchReader,
    uri: str,
    storage_options: dict[str, str] | None = None,
    *,
    exists: bool = False,
    num_partitions: int | None = None,
    num_sub_vectors: int | None = None,
) -> tuple[lance.LanceDataset, int, int]:
    """``rows`` (COLUMNS and a list ``embedding``), streamed into the Lance dataset at ``uri`` (replacing it when
    it ``exists``), then its IVF-PQ index trained and written; returns the dataset and the partitions (0: no index,
    too few rows) and sub-vectors used."""
    import lance

    problems: list[VectorIndexError] = []
    try:
        dataset = lance.write_dataset(
            _fixed_size(rows, problems), uri, mode="overwrite" if exists else "create", storage_options=storage_options
        )
    except Exception as error:
        if problems:  # ours, raised while Lance read the rows
            raise problems[0] from None
        raise VectorIndexError(f"cannot write the index at {redact_url(uri)}: {error}") from None
    count, dimension = dataset.count_rows(), dataset.schema.field(VECTOR).type.list_size
    partitions, sub_vectors = parameters(count, dimension, num_partitions, num_sub_vectors)
    if count < MIN_INDEXED_ROWS:
        return dataset, 0, sub_vectors
    dataset.create_index(
        VECTOR, "IVF_PQ", metric=METRIC, num_partitions=partitions, num_sub_vectors=sub_vectors, replace=True
    )
    dataset.create_scalar_index(
        "image_id", "BTREE", replace=True
    )  # the query image's own row, from an up-to-date index
    return dataset, partitions, sub_vectors


def _fixed_size(reader: pa.RecordBatchReader, problems: list[VectorIndexError]) -> pa.RecordBatchReader:
    """The rows with the embedding as a fixed-size list (what Lance indexes), one length for all of them; a row of
    another length ends the stream, with the reason in ``problems``."""
    batches = (batch for batch in reader if batch.num_rows)
    first = next(batches, None)
    if first is None:
        raise VectorIndexError("latest holds no row with an embedding (status ok): nothing to index")
    dimension = pc.list_value_length(first.column(VECTOR)).to_numpy()[0].item()
    schema = pa.schema(
        [reader.schema.field(name) for name in COLUMNS] + [pa.field(VECTOR, pa.list_(pa.float32(), dimension))]
    )

    def convert(batch: pa.RecordBatch) -> pa.RecordBatch:
        column = batch.column(VECTOR)
        lengths = pc.unique(pc.list_value_length(column)).to_pylist()
        if lengths != [dimension]:
            other = next(length for length in lengths if length != dimension)
            problems.append(
                VectorIndexError(
                    f"latest holds embeddings of {dimension} and of {other} values (runs with different models): "
                    "one index needs one length"
                )
            )
            raise problems[-1]
        values = column.flatten().cast(pa.float32())
        vectors = pa.FixedSizeListArray.from_arrays(values, dimension)
        return pa.RecordBatch.from_arrays([*(batch.column(n) for n in COLUMNS), vectors], schema=schema)

    def all_batches():
        yield convert(first)
        for batch in batches:
            yield convert(batch)

    return pa.RecordBatchReader.from_batches(schema, all_batches())


def read_record(location: OutputLocation) -> IndexRecord | None:
    """The record of the output's index; None when none was built."""
    try:
        return IndexRecord.from_json(read_json(location.fs, location.path(FOLDER, RECORD)))
    except FileNotFoundError:
        return None


@dataclass
class SimilarIndex:
    """An output's index, opened at the version its record names, and how far the output has moved on since."""

    location: OutputLocation
    record: IndexRecord
    dataset: lance.LanceDataset
    current_version: int  # of the predictions table, now
    runs_since: int  # runs committed after the index was built
    name: str = ""  # the output as the user named it (credentials redacted)

    @property
    def up_to_date(self) -> bool:
        return self.stale_message() is None

    def stale_message(self) -> str | None:
        """A line saying how far behind the output the index is; None when it is up to date."""
        behind = self.current_version - self.record.predictions_version
        if not self.runs_since and behind <= 0:
            return None
        runs = f"{self.runs_since} run{'s' if self.runs_since != 1 else ''}"
        return (
            f"the similarity index is {behind} version{'s' if behind != 1 else ''} behind the output (built at "
            f"predictions version {self.record.predictions_version}, now {self.current_version}; {runs} committed "
            "since): images of newer runs are missing from it and changed ones show their old labels; rebuild it "
            f"with `resnet-pipeline index {self.name or redact_url(self.location.url())}`, or use --exact"
        )

    @property
    def default_nprobes(self) -> int:
        """Partitions searched unless told: the same share of them at every size, so that recall holds."""
        return max(MIN_NPROBES, -(-self.record.num_partitions // PROBED_SHARE))

    def search(self, vector: np.ndarray, k: int, nprobes: int | None = None, refine: int | None = None) -> pa.Table:
        """The ``k`` nearest rows to ``vector``: COLUMNS and ``similarity`` (1 - cosine distance), best first.

        ``nprobes``: IVF partitions searched (more: better recall, slower); ``refine``: re-rank ``refine * k``
        candidates on their stored embeddings (exact similarities; 0: PQ-approximate ones).
        """
        nearest: dict[str, Any] = {"column": VECTOR, "q": vector.astype(np.float32), "k": k, "metric": METRIC}
        if self.record.num_partitions:
            nearest["nprobes"] = nprobes or self.default_nprobes
            refine = DEFAULT_REFINE if refine is None else refine
            if refine:
                nearest["refine_factor"] = refine
        found = self.dataset.to_table(columns=[*COLUMNS, "_distance"], nearest=nearest)
        similarity = pc.subtract(pa.scalar(1.0, pa.float32()), found.column("_distance").cast(pa.float32()))
        return found.drop_columns(["_distance"]).add_column(1, "similarity", similarity)

    def indexed_row(self, image_id: str) -> tuple | None:
        """The image's row as indexed (COLUMNS, then the embedding), through the index on ``image_id``; None when
        it is not in the index."""
        found = self.dataset.to_table(columns=[*COLUMNS, VECTOR], filter=f"image_id = {literal(image_id)}")
        return tuple(column[0].as_py() for column in found.columns) if found.num_rows else None

    def similar_query(
        self,
        db: duckdb.DuckDBPyConnection,
        image_id: str,
        k: int,
        nprobes: int | None = None,
        refine: int | None = None,
        row: tuple | None = None,
    ) -> Query:
        """``similar``'s rows from the index: the image first (``row``, else its row in ``latest`` now), then its
        ``k - 1`` nearest others, as a query over a table registered in ``db``."""
        if row is None:
            row = db.execute(
                f"SELECT {', '.join(COLUMNS)}, {VECTOR} FROM latest WHERE image_id = $id", {"id": image_id}
            ).fetchall()[0]
        query_vector = np.asarray(row[-1], dtype=np.float32)
        if len(query_vector) != self.record.dimension:
            raise QueryError(
                f"{image_id!r} has an embedding of {len(query_vector)} values, the index holds {self.record.dimension}"
                f": rebuild it (resnet-pipeline index) or use --exact"
            )
        message = self.stale_message()
        if message:
            warnings.warn(message, StaleIndexWarning, stacklevel=3)
        hits = self.search(query_vector, k + 1, nprobes, refine)
        others = hits.filter(pc.not_equal(hits.column("image_id"), image_id)).slice(0, k - 1)
        itself = pa.table({**dict(zip(COLUMNS, ([value] for value in row[:-1]), strict=True)), "similarity": [1.0]})
        result = pa.concat_tables([itself.select(others.column_names).cast(others.schema), others])
        result = result.append_column("position", pa.array(range(result.num_rows), pa.int32()))
        db.register("_similar_index", result)
        return Query("SELECT image_id, similarity, label, score, source FROM _similar_index ORDER BY position")


def open_index(output: str | OutputLocation, storage_options: dict | None = None) -> SimilarIndex | None:
    """The output's index, at the Lance version its record names; None when none was built."""
    import lance

    location = _location(output, storage_options)
    record = read_record(location)
    if record is None:
        return None
    uri = _uri(location)
    try:
        dataset = with_retries(
            lambda: lance.dataset(uri, version=record.lance_version, storage_options=_lance_options(location))
        )
    except Exception as error:
        raise VectorIndexError(
            f"cannot read the similarity index at {redact_url(uri)} ({error}): rebuild it (resnet-pipeline index) "
            "or use --exact"
        ) from None
    current = tables.open_table(location, PREDICTIONS).version()
    versions = tables.dataset(location, RUNS).to_table(columns=["version"]).column("version")
    runs_since = pc.sum(pc.greater(versions, record.predictions_version)).as_py() or 0
    name = redact_url(output) if isinstance(output, str) else redact_url(location.url())
    return SimilarIndex(location, record, dataset, current, runs_since, name)
