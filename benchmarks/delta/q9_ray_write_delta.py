"""Q9 (extra): what Ray 2.60's built-in Dataset.write_delta does with an embedding column produced by a
Ray Data map_batches (numpy ndarray -> Ray tensor extension type), on 1 CPU.
Run with the separate venv: /tmp/delta-research/rayvenv/bin/python q9_ray_write_delta.py"""
import os, shutil, json
import numpy as np
import pyarrow as pa
import ray
from deltalake import DeltaTable, Schema

P = "/tmp/delta-research/data/q9"
shutil.rmtree(P, ignore_errors=True)
ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
D = 16


def label(batch):
    n = len(batch["id"])
    return {"image_id": np.array([f"img-{i}" for i in batch["id"]]),
            "label": np.arange(n, dtype=np.int32),
            "embedding": np.random.default_rng(0).standard_normal((n, D)).astype(np.float16)}


ds = ray.data.range(20, override_num_blocks=2).map_batches(label, batch_format="numpy")
print("ray schema:", ds.schema())
arrow_schema = ds.schema().base_schema if hasattr(ds.schema(), "base_schema") else None
print("arrow schema:", arrow_schema)
for f in arrow_schema:
    print(" field", f.name, type(f.type).__name__, f.type, "storage:", getattr(f.type, "storage_type", None))
try:
    print("Schema.from_arrow:", Schema.from_arrow(arrow_schema).to_json())
except Exception as e:
    print("Schema.from_arrow ERROR:", type(e).__name__, str(e).splitlines()[0][:200])

for name, dsx in (
    ("float16 tensor column as produced", ds),
    ("float32 tensor column", ds.map_batches(lambda b: {**b, "embedding": b["embedding"].astype(np.float32)}, batch_format="numpy")),
    ("float32 as python lists -> list<float>", ds.map_batches(
        lambda b: pa.table({"image_id": b["image_id"], "label": b["label"],
                            "embedding": pa.array(list(b["embedding"].astype(np.float32)), pa.list_(pa.float32()))}),
        batch_format="numpy")),
):
    path = f"{P}/{name.split()[0]}_{abs(hash(name)) % 1000}"
    try:
        dsx.write_delta(path)
        d = DeltaTable(path)
        print(f"\n[{name}] write_delta OK: delta schema {d.schema().to_json()}")
        print("   parquet file arrow type:", __import__("pyarrow.parquet", fromlist=["x"]).read_schema(d.file_uris()[0]).field("embedding").type)
        try:
            import polars as pl
            print("   polars:", pl.read_delta(path).schema["embedding"])
        except Exception as e:
            print("   polars ERROR:", type(e).__name__, str(e).splitlines()[0][:200])
        print("   deltalake read:", d.to_pyarrow_table().schema.field("embedding").type, "rows", d.to_pyarrow_table().num_rows)
        print("   add.stats:", json.loads(open(f"{path}/_delta_log/00000000000000000000.json").read().splitlines()[-1])["add"]["stats"])
    except Exception as e:
        print(f"\n[{name}] write_delta ERROR:", type(e).__name__, str(e).splitlines()[0][:300])
ray.shutdown()
