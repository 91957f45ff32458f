"""Shared helpers: build a Delta AddAction from a Parquet file written by pyarrow."""
import json
import os
import time
import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
from deltalake.transaction import AddAction

# Delta stats are only meaningful for "leaf" primitive columns. Skip nested
# (list/struct/map) and binary columns: Delta does not collect min/max for them.
_STATS_OK = (pa.types.is_integer, pa.types.is_floating, pa.types.is_string,
             pa.types.is_large_string, pa.types.is_boolean, pa.types.is_date,
             pa.types.is_timestamp, pa.types.is_decimal)


def _jsonable(v):
    if isinstance(v, (dt.datetime,)):
        # Delta stats timestamps: ISO-8601 with millisecond precision, UTC 'Z'
        if v.tzinfo is None:
            v = v.replace(tzinfo=dt.timezone.utc)
        return v.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    if isinstance(v, dt.date):
        return v.isoformat()
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return v


def stats_from_parquet_metadata(md: pq.FileMetaData, schema: pa.Schema) -> dict:
    """numRecords + per-column minValues/maxValues/nullCount from row-group stats."""
    out = {"numRecords": md.num_rows, "minValues": {}, "maxValues": {}, "nullCount": {}}
    # map top-level column name -> parquet leaf column index (only flat columns)
    leaf_idx = {md.schema.column(i).path: i for i in range(md.num_columns)}
    for f in schema:
        if not any(p(f.type) for p in _STATS_OK) or f.name not in leaf_idx:
            continue
        ci = leaf_idx[f.name]
        mins, maxs, nulls, ok = [], [], 0, True
        for rg in range(md.num_row_groups):
            st = md.row_group(rg).column(ci).statistics
            if st is None:
                ok = False
                break
            nulls += st.null_count if st.has_null_count else 0
            if st.has_min_max:
                mins.append(st.min)
                maxs.append(st.max)
        if not ok:
            continue
        out["nullCount"][f.name] = nulls
        if mins:
            out["minValues"][f.name] = _jsonable(min(mins))
            out["maxValues"][f.name] = _jsonable(max(maxs))
    return out


def write_parquet_and_action(table: pa.Table, table_root: str, rel_path: str,
                             partition_values=None, compression="zstd") -> AddAction:
    """What a worker does: write a Parquet file into the table folder, return AddAction."""
    full = os.path.join(table_root, rel_path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    collector = []
    pq.write_table(table, full, compression=compression, metadata_collector=collector)
    md = collector[0]
    return AddAction(
        path=rel_path,                       # RELATIVE to table root, '/'-separated
        size=os.path.getsize(full),          # bytes on storage
        partition_values=partition_values or {},  # {col: str|None}; {} if unpartitioned
        modification_time=int(time.time() * 1000),  # epoch millis
        data_change=True,                    # True for real appends
        stats=json.dumps(stats_from_parquet_metadata(md, table.schema)),
    )
