"""Q5: which Arrow types can a Delta table hold (embeddings), and bytes/row on disk for float16 options."""
import io, os, shutil, json
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import DeltaTable, Schema, write_deltalake
from common import write_parquet_and_action

BASE = "/tmp/delta-research/data/q5"
shutil.rmtree(BASE, ignore_errors=True)
os.makedirs(BASE)
D, N = 2048, 1000
rng = np.random.default_rng(0)


def step(name, fn):
    print(f"\n--- {name}")
    try:
        r = fn()
        print("OK", "" if r is None else r)
    except Exception as e:
        print("ERROR", type(e).__name__, str(e).replace("\n", " ")[:350])


small = rng.standard_normal((4, D)).astype(np.float32)
fsl = pa.FixedSizeListArray.from_arrays(pa.array(small.ravel()), D)
ids = pa.array([f"img-{i}" for i in range(4)])

# ---------------- A. fixed_size_list<float32>[2048]
t_fsl = pa.table({"image_id": ids, "emb": fsl})
print("arrow type:", t_fsl.schema.field("emb").type)
step("Schema.from_arrow(fixed_size_list)", lambda: Schema.from_arrow(t_fsl.schema).to_json())
step("write_deltalake(fixed_size_list)", lambda: (write_deltalake(f"{BASE}/fsl", t_fsl),
                                                 str(DeltaTable(f"{BASE}/fsl").schema().to_arrow()).replace("\n", " | "),
                                                 DeltaTable(f"{BASE}/fsl").to_pyarrow_table().schema.field("emb").type)[1:])
step("DeltaTable.create(schema with fixed_size_list)", lambda: str(DeltaTable.create(f"{BASE}/fsl_create", t_fsl.schema).schema().to_arrow()).replace("\n", " | "))

def commit_fsl_parquet_into_list_table():
    # worker writes fixed_size_list parquet; table declared list<float>; driver commits AddAction
    p = f"{BASE}/fsl_commit"
    sch = pa.schema([("image_id", pa.string()), ("emb", pa.list_(pa.float32()))])
    DeltaTable.create(p, sch)
    a = write_parquet_and_action(t_fsl, p, "part-0.parquet")
    DeltaTable(p).create_write_transaction([a], mode="append", schema=sch)
    r = DeltaTable(p).to_pyarrow_table()
    import duckdb, polars as pl
    con = duckdb.connect(); con.register("t", DeltaTable(p).to_pyarrow_dataset())
    return (f"parquet file type={pq.read_schema(p + '/part-0.parquet').field('emb').type}; read back as "
            f"{r.schema.field('emb').type}, len={len(r['emb'][0])}, equal={np.allclose(np.array(r['emb'][0].as_py()), small[0])}; "
            f"duckdb={con.execute('select typeof(emb), len(emb) from t limit 1').fetchall()}; "
            f"polars={pl.read_delta(p).schema['emb']}")
step("pyarrow-written fixed_size_list Parquet committed into a list<float> table", commit_fsl_parquet_into_list_table)

# ---------------- B. list<float32>
t_list = pa.table({"image_id": ids, "emb": pa.array(small.tolist(), pa.list_(pa.float32()))})
step("write_deltalake(list<float32>)", lambda: (write_deltalake(f"{BASE}/list", t_list),
                                               DeltaTable(f"{BASE}/list").to_pyarrow_table().schema.field("emb").type)[1])
step("large_list<float32>", lambda: (write_deltalake(f"{BASE}/llist", t_list.cast(pa.schema([("image_id", pa.string()), ("emb", pa.large_list(pa.float32()))]))),
                                    DeltaTable(f"{BASE}/llist").schema().to_arrow().field("emb").type if hasattr(DeltaTable(f"{BASE}/llist").schema().to_arrow(), "field") else DeltaTable(f"{BASE}/llist").schema().to_json())[1])

# ---------------- C. float16
h = small.astype(np.float16)
t_f16 = pa.table({"image_id": ids, "x": pa.array(h[:, 0]), "emb": pa.array(list(h), pa.list_(pa.float16()))})
print("\nfloat16 arrow schema:", t_f16.schema)
step("Schema.from_arrow(float16 scalar)", lambda: Schema.from_arrow(pa.schema([("x", pa.float16())])).to_json())
step("Schema.from_arrow(list<float16>)", lambda: Schema.from_arrow(pa.schema([("e", pa.list_(pa.float16()))])).to_json())
step("write_deltalake(float16 + list<float16>)", lambda: (write_deltalake(f"{BASE}/f16", t_f16),
                                                          DeltaTable(f"{BASE}/f16").schema().to_json())[1])
step("pyarrow parquet float16 file committed into a float32-declared table", lambda: (lambda p: (
    DeltaTable.create(p, pa.schema([("image_id", pa.string()), ("x", pa.float32()), ("emb", pa.list_(pa.float32()))])),
    DeltaTable(p).create_write_transaction([write_parquet_and_action(t_f16, p, "f16.parquet")], mode="append",
                                           schema=pa.schema([("image_id", pa.string()), ("x", pa.float32()), ("emb", pa.list_(pa.float32()))])),
    f"parquet physical: {pq.ParquetFile(p + '/f16.parquet').schema.column(1)}".replace("\n", " "),
    DeltaTable(p).to_pyarrow_table().slice(0, 1).to_pylist()[0]["x"],
    float(h[0, 0]))[2:])(f"{BASE}/f16_commit"))

# ---------------- D. candidate float16 encodings readable everywhere: sizes
def emb_data(kind):
    if kind == "normal":
        x = rng.standard_normal((N, D)).astype(np.float32)
    else:  # ResNet-50 avgpool features: ReLU output averaged -> non-negative, ~skewed, some zeros
        x = np.maximum(rng.standard_normal((N, D)) * 0.8 - 0.3, 0).astype(np.float32)
    return x


def encodings(x):
    ids = pa.array([f"img-{i:07d}" for i in range(N)])
    h = x.astype(np.float16)
    return {
        "list<float32>": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), D).cast(pa.list_(pa.float32())),
        "list<float32> of f16-rounded values": pa.FixedSizeListArray.from_arrays(pa.array(h.astype(np.float32).ravel()), D).cast(pa.list_(pa.float32())),
        "binary (2*D bytes, f16 little-endian)": pa.array([r.tobytes() for r in h], pa.binary()),
        "list<int16> (f16 bit patterns)": pa.FixedSizeListArray.from_arrays(pa.array(h.view(np.int16).ravel()), D).cast(pa.list_(pa.int16())),
        # for reference only (not a Delta type):
        "[ref, not Delta] list<float16>": pa.FixedSizeListArray.from_arrays(pa.array(h.ravel()), D).cast(pa.list_(pa.float16())),
    }, ids


rows = []
for kind in ("normal", "relu"):
    x = emb_data(kind)
    encs, ids = encodings(x)
    for name, arr in encs.items():
        t = pa.table({"image_id": ids, "emb": arr})
        for comp in ("zstd", "snappy"):
            for opt in ("default", "no_dict", "bss"):
                kw = dict(compression=comp)
                if opt == "no_dict":
                    kw["use_dictionary"] = ["image_id"]
                if opt == "bss":
                    if "binary" in name:
                        continue
                    kw["use_dictionary"] = ["image_id"]
                    kw["use_byte_stream_split"] = ["emb.list.element"]
                buf = io.BytesIO()
                try:
                    pq.write_table(t, buf, **kw)
                except Exception as e:
                    rows.append((kind, name, comp, opt, f"ERR {e}"))
                    continue
                rows.append((kind, name, comp, opt, buf.tell() / N))

print(f"\n=== bytes/row on disk, {N} rows x {D}-d (raw: float32={4*D} B, float16={2*D} B), plus image_id ===")
print(f"{'data':7} {'encoding':40} {'codec':7} {'options':8} bytes/row")
for r in rows:
    print(f"{r[0]:7} {r[1]:40} {r[2]:7} {r[3]:8} {r[4] if isinstance(r[4], str) else round(r[4])}")

# ---- E. write the three Delta-compatible encodings as Delta tables and read them back in every engine
x = emb_data("relu")[:50]
encs, ids = encodings(x)
import duckdb, polars as pl
for name in ("binary (2*D bytes, f16 little-endian)", "list<int16> (f16 bit patterns)", "list<float32>"):
    p = f"{BASE}/enc_{name.split()[0].replace('<','_').replace('>','')}"
    t = pa.table({"image_id": ids[:50], "emb": encs[name].slice(0, 50)})
    write_deltalake(p, t)
    dt = DeltaTable(p)
    con = duckdb.connect(); con.register("t", dt.to_pyarrow_dataset())
    duck_t = con.execute("select typeof(emb) from t limit 1").fetchone()[0]
    pl_t = pl.read_delta(p).schema["emb"]
    # decode row 0 back to float32 numpy
    v = dt.to_pyarrow_table()["emb"][0]
    if name.startswith("binary"):
        dec = np.frombuffer(v.as_py(), dtype="<f2").astype(np.float32)
    elif name.startswith("list<int16>"):
        dec = np.array(v.as_py(), dtype=np.int16).view(np.float16).astype(np.float32)
    else:
        dec = np.array(v.as_py(), dtype=np.float32)
    print(f"{name:40} delta schema={dt.schema().fields[1].type}  duckdb type={duck_t}  polars={pl_t}  "
          f"max abs err vs float32={np.abs(dec - x[0]).max():.2e}")

# DuckDB-side decode of the binary encoding without Python (for reference)
p = f"{BASE}/enc_binary"
con = duckdb.connect(); con.register("t", DeltaTable(p).to_pyarrow_dataset())
print("duckdb octet_length(emb):", con.execute("select octet_length(emb) from t limit 1").fetchone())
print("polars has Float16 dtype:", hasattr(pl, "Float16"))
