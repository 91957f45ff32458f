"""Q8b: automatic checkpoints (post-commit hook) with create_write_transaction commits."""
import os, shutil, json
import pyarrow as pa
from deltalake import DeltaTable, PostCommitHookProperties
from common import write_parquet_and_action
P = "/tmp/delta-research/data/q8b"
shutil.rmtree(P, ignore_errors=True)
S = pa.schema([("image_id", pa.string())])
DeltaTable.create(P, S, configuration={"delta.checkpointInterval": "10"})
for i in range(25):
    a = write_parquet_and_action(pa.table({"image_id": [f"x{i}"]}), P, f"p{i}.parquet")
    DeltaTable(P).create_write_transaction([a], mode="append", schema=S)
print("checkpoints (interval=10):", sorted(f for f in os.listdir(P + "/_delta_log") if "checkpoint" in f))
# disabling the hook per commit
a = write_parquet_and_action(pa.table({"image_id": ["y"]}), P, "py.parquet")
DeltaTable(P).create_write_transaction([a], mode="append", schema=S,
    post_commithook_properties=PostCommitHookProperties(create_checkpoint=False))
print("version", DeltaTable(P).version(), "rows", DeltaTable(P).count())
