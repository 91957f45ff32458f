"""Q5b: (1) where exactly does a pyarrow fixed_size_list Parquet file break when committed into a
list<float> Delta table, and what fixes it; (2) float16 Parquet file in a float32 table per engine;
(3) bytes/row when the *delta-rs writer* (write_deltalake / MERGE rewrite) writes the embeddings."""
import io, os, shutil, json
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import duckdb, polars as pl
from deltalake import DeltaTable, write_deltalake, WriterProperties, ColumnProperties
from common import write_parquet_and_action

BASE = "/tmp/delta-research/data/q5b"
shutil.rmtree(BASE, ignore_errors=True); os.makedirs(BASE)
D = 2048
rng = np.random.default_rng(1)
x = rng.standard_normal((4, D)).astype(np.float32)
LIST_SCHEMA = pa.schema([("image_id", pa.string()), ("emb", pa.list_(pa.float32()))])


def readers(p):
    out = {}
    for name, fn in {
        "DeltaTable.to_pyarrow_table": lambda: DeltaTable(p).to_pyarrow_table()["emb"].type,
        "to_pyarrow_dataset": lambda: DeltaTable(p).to_pyarrow_dataset().to_table()["emb"].type,
        "duckdb(register dataset)": lambda: (lambda c: (c.register("t", DeltaTable(p).to_pyarrow_dataset()),
                                                        c.execute("select typeof(emb), count(*) from t group by 1").fetchall())[1])(duckdb.connect()),
        "polars.read_delta": lambda: pl.read_delta(p).schema["emb"],
        "QueryBuilder(datafusion)": lambda: __import__("deltalake").QueryBuilder().register("t", DeltaTable(p)).execute("select count(*) from t").read_all().to_pylist() if hasattr(__import__("deltalake").QueryBuilder().register("t", DeltaTable(p)).execute("select count(*) from t").read_all(), "to_pylist") else "ok",
    }.items():
        try:
            out[name] = str(fn())
        except Exception as e:
            out[name] = "ERROR " + type(e).__name__ + ": " + str(e).splitlines()[0][:120]
    return out


def case(name, table, **pq_kw):
    p = f"{BASE}/{name}"
    DeltaTable.create(p, LIST_SCHEMA)
    collector = []
    os.makedirs(p, exist_ok=True)
    pq.write_table(table, f"{p}/part-0.parquet", **pq_kw)
    from deltalake.transaction import AddAction
    import time
    a = AddAction("part-0.parquet", os.path.getsize(f"{p}/part-0.parquet"), {}, int(time.time() * 1000), True,
                  json.dumps({"numRecords": table.num_rows}))
    try:
        DeltaTable(p).create_write_transaction([a], mode="append", schema=LIST_SCHEMA)
        print(f"\n[{name}] commit OK")
    except Exception as e:
        print(f"\n[{name}] COMMIT ERROR {e}")
        return
    for k, v in readers(p).items():
        print(f"   {k:30} {v}")


fsl = pa.table({"image_id": [f"i{i}" for i in range(4)],
                "emb": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), D)})
case("fsl_default", fsl)
case("fsl_store_schema_false", fsl, store_schema=False)
case("fsl_cast_to_list", fsl.cast(LIST_SCHEMA))
# list written with pyarrow's default list element name 'item' vs Delta's 'element'
lst_item = pa.table({"image_id": [f"i{i}" for i in range(4)], "emb": pa.array(x.tolist(), pa.list_(pa.float32()))})
print("\npyarrow list field name:", lst_item.schema.field("emb").type, "| delta schema:", DeltaTable(f"{BASE}/fsl_cast_to_list").schema().to_arrow())
case("list_item_name", lst_item)
case("large_list", lst_item.cast(pa.schema([("image_id", pa.string()), ("emb", pa.large_list(pa.float32()))])))

# float16 parquet in a float32 table, per engine
F32 = pa.schema([("image_id", pa.string()), ("emb", pa.list_(pa.float32()))])
p = f"{BASE}/f16_in_f32"
DeltaTable.create(p, F32)
t16 = pa.table({"image_id": ["a"], "emb": pa.array([x[0].astype(np.float16)], pa.list_(pa.float16()))})
DeltaTable(p).create_write_transaction([write_parquet_and_action(t16, p, "f16.parquet")], mode="append", schema=F32)
print("\n[float16 parquet committed into list<float32> table]")
for k, v in readers(p).items():
    print(f"   {k:30} {v}")

# ---- delta-rs writer sizes (what write_deltalake and MERGE rewrites produce)
N = 1000
xr = np.maximum(rng.standard_normal((N, D)) * 0.8 - 0.3, 0).astype(np.float32)  # ReLU-like
xn = rng.standard_normal((N, D)).astype(np.float32)
print(f"\n=== delta-rs writer (write_deltalake) bytes/row, {N} x {D}-d ===")
for kind, xx in (("normal", xn), ("relu", xr)):
    h = xx.astype(np.float16)
    encs = {
        "list<float32>": pa.FixedSizeListArray.from_arrays(pa.array(xx.ravel()), D).cast(pa.list_(pa.float32())),
        "list<float32> f16-rounded": pa.FixedSizeListArray.from_arrays(pa.array(h.astype(np.float32).ravel()), D).cast(pa.list_(pa.float32())),
        "binary f16": pa.array([r.tobytes() for r in h], pa.binary()),
        "list<int16> f16 bits": pa.FixedSizeListArray.from_arrays(pa.array(h.view(np.int16).ravel()), D).cast(pa.list_(pa.int16())),
    }
    for ename, arr in encs.items():
        t = pa.table({"image_id": [f"img-{i:07d}" for i in range(N)], "emb": arr})
        for wp_name, wp in (("default", None), ("ZSTD", WriterProperties(compression="ZSTD")),
                            ("ZSTD+dict", WriterProperties(compression="ZSTD", default_column_properties=ColumnProperties(dictionary_enabled=True)))):
            p = f"{BASE}/w_{kind}_{ename.replace(' ', '_').replace('<','').replace('>','')}_{wp_name.replace('+','_')}"
            write_deltalake(p, t, writer_properties=wp)
            size = sum(os.path.getsize(os.path.join(p, f)) for f in os.listdir(p) if f.endswith(".parquet"))
            codec = pq.ParquetFile([os.path.join(p, f) for f in os.listdir(p) if f.endswith(".parquet")][0]).metadata.row_group(0).column(1).compression
            print(f"{kind:7} {ename:28} {wp_name:10} codec={codec:7} {size / N:8.0f} B/row")
