"""Q1b: (1) partition value in AddAction vs value inside the Parquet file; (2) re-committing the same path."""
import json, os, shutil, time
import pyarrow as pa
import duckdb, polars as pl
from deltalake import DeltaTable
from deltalake.transaction import AddAction
from common import write_parquet_and_action
P = "/tmp/delta-research/data/q1b"
shutil.rmtree(P, ignore_errors=True)
S = pa.schema([("image_id", pa.string()), ("source", pa.string())])
DeltaTable.create(P, S, partition_by=["source"])
# file physically contains source='IN-FILE' but AddAction says source='from-log'
t = pa.table({"image_id": ["a", "b"], "source": ["IN-FILE", "IN-FILE"]})
a = write_parquet_and_action(t, P, "source=from-log/part-0.parquet", partition_values={"source": "from-log"})
DeltaTable(P).create_write_transaction([a], mode="append", schema=S, partition_by=["source"])
con = duckdb.connect(); con.register("t", DeltaTable(P).to_pyarrow_dataset())
print("DeltaTable:", DeltaTable(P).to_pyarrow_table()["source"].to_pylist(),
      "| duckdb:", con.execute("select source from t").fetchall(), "| polars:", pl.read_delta(P)["source"].to_list())
# file WITHOUT the partition column (what pyarrow.dataset hive partitioning writes)
a2 = write_parquet_and_action(t.drop_columns(["source"]), P, "source=s2/part-0.parquet", partition_values={"source": "s2"})
DeltaTable(P).create_write_transaction([a2], mode="append", schema=S, partition_by=["source"])
print("file without partition column ->", sorted(DeltaTable(P).to_pyarrow_table()["source"].to_pylist()))
# partition_values missing for a partitioned table
a3 = write_parquet_and_action(t.drop_columns(["source"]), P, "nopv/part-0.parquet", partition_values={})
try:
    DeltaTable(P).create_write_transaction([a3], mode="append", schema=S, partition_by=["source"])
    print("missing partition_values accepted; values read:", sorted(map(str, DeltaTable(P).to_pyarrow_table()["source"].to_pylist())))
except Exception as e:
    print("missing partition_values ->", type(e).__name__, str(e)[:200])
# create_write_transaction without partition_by on a partitioned table
a4 = write_parquet_and_action(t.drop_columns(["source"]), P, "source=s4/part-0.parquet", partition_values={"source": "s4"})
try:
    DeltaTable(P).create_write_transaction([a4], mode="append", schema=S)
    print("partition_by omitted -> accepted")
except Exception as e:
    print("partition_by omitted ->", type(e).__name__, str(e)[:200])

# re-committing the exact same AddAction (same path) = idempotent at the data level
Q = "/tmp/delta-research/data/q1b_dup"
shutil.rmtree(Q, ignore_errors=True)
DeltaTable.create(Q, S)
a = write_parquet_and_action(pa.table({"image_id": ["a", "b", "c"], "source": ["x"] * 3}), Q, "part-fixed-name.parquet")
for _ in range(3):
    DeltaTable(Q).create_write_transaction([a], mode="append", schema=S)
d = DeltaTable(Q)
print(f"same path committed 3x: version={d.version()} rows={d.to_pyarrow_table().num_rows} count()={d.count()} files={len(d.file_uris())}")
