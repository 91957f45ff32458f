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


def claims(name: str) -> bool:
    """Whether a file of this (lower-case) name is a shard of this layout, when the format is ``auto``."""
    return name.endswith(EXTENSIONS)


class ColumnError(KeyError):
    """A Parquet file without the columns the spec names (or without any image column); ``field`` is the spec's."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field

    def __str__(self) -> str:  # KeyError's own would quote the message
        return str(self.args[0])


def _pick(schema: pa.Schema, explicit: str | None, candidates: tuple[str, ...], what: str, url: str) -> str | None:
    if explicit:
        if explicit not in schema.names:
            columns = ", ".join(schema.names)
            raise ColumnError(f"{url} has no {what} column {explicit!r} (columns: {columns})", f"input.{what}_column")
        return explicit
    return next((name for name in candidates if name in schema.names), None)


def columns(schema: pa.Schema, url: str, options: dict) -> tuple[str, str | None]:
    """The image column and the id column (None: rows are keyed by their position) of a file with ``schema``."""
    image_column = _pick(schema, options.get("image_column"), IMAGE_COLUMNS, "image", url)
    if image_column is None:
        raise ColumnError(
            f"{url} has no image column: set input.image_column (columns: {', '.join(schema.names)}; looked for "
            f"{', '.join(IMAGE_COLUMNS)})",
            "input.image_column",
        )
    id_column = _pick(schema, options.get("id_column"), ID_COLUMNS, "id", url)
    return image_column, id_column if id_column != image_column else None


def check(fs, path: str, url: str, options: dict) -> None:
    """Raise :class:`ColumnError` unless the file has the columns a read needs (reads the footer only)."""
    with fs.open(path, "rb") as f:
        columns(pq.read_schema(f), url, options)


def _image_bytes(column: pa.ChunkedArray | pa.Array) -> list:
    if pa.types.is_struct(column.type):  # {"bytes": ..., "path": ...}
        column = pa.compute.struct_field(column, "bytes")
    return column.to_pylist()


def read(fs, path: str, url: str, options: dict) -> Iterator:
    from pipeline.sources import Record

    with fs.open(path, "rb") as f:
        parquet_file = pq.ParquetFile(f)
        schema = parquet_file.schema_arrow
        image_column, id_column = columns(schema, url, options)
        wanted = [image_column] + ([id_column] if id_column else [])
        row = 0
        for group in range(parquet_file.num_row_groups):
            table = parquet_file.read_row_group(group, columns=wanted)
            blobs = _image_bytes(table.column(image_column))
            keys = table.column(id_column).to_pylist() if id_column else range(row, row + len(blobs))
            for key, blob in zip(keys, blobs, strict=True):
                yield Record(f"{url}#{key}", url, blob, None if blob is not None else "no image bytes (null)")
            row += len(blobs)
