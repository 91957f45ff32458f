"""The write stage of the Ray plan: a run's rows as data files of a chosen size in the predictions table's folder,
each described as it is written (see :mod:`pipeline.runner`; the commit is :mod:`pipeline.tables`)."""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa
from ray.data import Datasink
from ray.data._internal.execution.interfaces import TaskContext
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import WriteResult

from pipeline.runs import OutputLocation, StagedFile, write_data_file


class RunSink(Datasink):
    """The output side of a run's Ray plan: writes its rows as data files, a file per ``rows_per_file`` rows, and
    keeps what each write task wrote (:class:`~pipeline.runs.StagedFile`: path, size, Delta stats, rows per shard),
    so that nothing is read back before the commit. A file is invisible until a Delta commit adds it.

    Files are named by the write task's index: a task Ray retries writes the same names again, and only the files
    the final attempts reported (``written``) are committed; anything else in the run's folder is removed with it.
    """

    def __init__(self, location: OutputLocation, run_id: str, rows_per_file: int, schema: pa.Schema) -> None:
        self.location, self.run_id, self.rows_per_file, self.schema = location, run_id, rows_per_file, schema
        self.written: list[StagedFile] = []

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks: Iterable[Block], ctx: TaskContext) -> list[StagedFile]:
        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        tables = [table.select(self.schema.names).cast(self.schema) for table in tables if table.num_rows]
        if not tables:
            return []
        table = pa.concat_tables(tables).combine_chunks()
        return [  # write_data_file retries what a store fails transiently
            write_data_file(
                self.location,
                self.run_id,
                f"part-{ctx.task_idx:06d}-{index:03d}.parquet",
                table.slice(start, self.rows_per_file),
            )
            for index, start in enumerate(range(0, table.num_rows, self.rows_per_file))
        ]

    def on_write_complete(self, write_result: WriteResult[list[StagedFile]]) -> None:
        self.written = [file for files in write_result.write_returns for file in files]
