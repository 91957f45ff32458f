"""The output contract (one Parquet row per input image) and the filesystem plumbing to write it anywhere.

| column | type |
|---|---|
| image_id, source, status, error | string (error null when ok) |
| label, class_id, score | string, int32, float32 (top-1; null on error) |
| top_k | list<struct<class_id int32, wnid string, label string, score float32>> (best first) |
| embedding | list<float32> of D values (null on error, or everywhere with embedding_dtype none; float16: float32
  values rounded to half precision, which every engine reads and which compress to about half) |
| width, height | int32 (of the original image; null when undecodable) |
| model, model_fingerprint | string |
| run_id, processed_at | string, timestamp[us, UTC] |
"""

from __future__ import annotations

import pyarrow as pa

TOP_K_TYPE = pa.list_(
    pa.struct([("class_id", pa.int32()), ("wnid", pa.string()), ("label", pa.string()), ("score", pa.float32())])
)
MAX_ROWS_PER_FILE = 50_000
# Rows are bundled in Ray's object store until a file's worth is there, so the file size is memory every run holds
# once it is longer than one file; 32 MB keeps that small while leaving few, well-sized files for query engines.
TARGET_FILE_BYTES = 32 * 1024 * 1024


def embedding_type() -> pa.DataType:
    # Not Parquet's FLOAT16, which Spark cannot read and Delta Lake has no type for; not a fixed-size list, which
    # Delta has no type for either (Polars refuses files that hold one).
    return pa.list_(pa.float32())


def output_schema() -> pa.Schema:
    return pa.schema(
        [
            ("image_id", pa.string()),
            ("source", pa.string()),
            ("status", pa.string()),
            ("error", pa.string()),
            ("label", pa.string()),
            ("class_id", pa.int32()),
            ("score", pa.float32()),
            ("top_k", TOP_K_TYPE),
            ("embedding", embedding_type()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("model", pa.string()),
            ("model_fingerprint", pa.string()),
            ("run_id", pa.string()),
            ("processed_at", pa.timestamp("us", tz="UTC")),
        ]
    )


def file_schema() -> pa.Schema:
    """The columns of a data file: all but ``run_id``, which the Delta log gives as a partition value."""
    schema = output_schema()
    return schema.remove(schema.get_field_index("run_id"))


def row_bytes(embedding_dim: int, embedding_dtype: str, top_k: int) -> int:
    """About how many bytes one output row takes in memory."""
    item = 0 if embedding_dtype == "none" else 4  # float16 travels as float32 too
    return 300 + embedding_dim * item + top_k * 40


def rows_per_file(embedding_dim: int, embedding_dtype: str, top_k: int, requested: int | None = None) -> int:
    """About 32 MB of rows per file (4,000 rows of 2048 float32), unless the spec says otherwise."""
    if requested:
        return requested
    return max(1_000, min(MAX_ROWS_PER_FILE, TARGET_FILE_BYTES // row_bytes(embedding_dim, embedding_dtype, top_k)))
