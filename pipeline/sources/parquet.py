"""Parquet files with a column of encoded image bytes (and, when present, a key per row).

The image column is ``input.image_column`` or the first of ``image``, ``image_bytes``, ``bytes``, ``jpg``, ``png``
(binary, or a Hugging Face-style struct with a ``bytes`` field). Rows are keyed ``<file URL>#<id>`` with
``input.id_column`` (or a column named ``id``, ``key``, ``image_id`` or ``__key__``), else ``<file URL>#<row>``.
Files are read one row group at a time.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

EXTENSIONS = (".parquet",)
IMAGE_COLUMNS = ("image", "image_bytes", "bytes", "jpg", "jpeg", "png", "img")
ID_COLUMNS = ("id", "key", "image_id", "__key__", "filename", "path")


def _pick(schema: pa.Schema, explicit: str | None, candidates: tuple[str, ...], what: str, url: str) -> str | None:
    if explicit:
        if explicit not in schema.names:
            raise KeyError(f"{url} has no {what} column {explicit!r} (columns: {', '.join(schema.names)})")
        return explicit
    return next((name for name in candidates if name in schema.names), None)


def _image_bytes(column: pa.ChunkedArray | pa.Array) -> list:
    if pa.types.is_struct(column.type):  # {"bytes": ..., "path": ...}
        column = pa.compute.struct_field(column, "bytes")
    return column.to_pylist()


def read(fs, path: str, url: str, options: dict) -> Iterator:
    from pipeline.sources import Record

    with fs.open(path, "rb") as f:
        parquet_file = pq.ParquetFile(f)
        schema = parquet_file.schema_arrow
        image_column = _pick(schema, options.get("image_column"), IMAGE_COLUMNS, "image", url)
        if image_column is None:
            raise KeyError(f"{url}: no image column found; set input.image_column (columns: {', '.join(schema.names)})")
        id_column = _pick(schema, options.get("id_column"), ID_COLUMNS, "id", url)
        columns = [image_column] + ([id_column] if id_column and id_column != image_column else [])
        row = 0
        for group in range(parquet_file.num_row_groups):
            table = parquet_file.read_row_group(group, columns=columns)
            blobs = _image_bytes(table.column(image_column))
            keys = table.column(id_column).to_pylist() if id_column else range(row, row + len(blobs))
            for key, blob in zip(keys, blobs, strict=True):
                yield Record(f"{url}#{key}", url, blob, None if blob is not None else "no image bytes (null)")
            row += len(blobs)
