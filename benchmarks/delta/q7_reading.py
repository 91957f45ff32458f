"""Q7: reading a Delta table: pyarrow dataset in DuckDB, time travel, polars, DuckDB delta_scan."""
import datetime as dt_, os, shutil, time
import pyarrow as pa
import pyarrow.dataset as pds
import duckdb, polars as pl
import deltalake
from deltalake import DeltaTable, write_deltalake, QueryBuilder

print("duckdb", duckdb.__version__, "polars", pl.__version__, "deltalake", deltalake.__version__)
P = "/tmp/delta-research/data/q7"
shutil.rmtree(P, ignore_errors=True)
SCHEMA = pa.schema([("image_id", pa.string()), ("source", pa.string()), ("label", pa.int32()),
                    ("embedding", pa.list_(pa.float32()))])


def batch(lo, hi, src):
    return pa.table({"image_id": [f"img-{i}" for i in range(lo, hi)], "source": [src] * (hi - lo),
                     "label": pa.array(range(lo, hi), pa.int32()),
                     "embedding": pa.array([[float(i)] * 4 for i in range(lo, hi)], pa.list_(pa.float32()))}, schema=SCHEMA)


write_deltalake(P, batch(0, 10, "a"))                     # v0
write_deltalake(P, batch(10, 20, "b"), mode="append")     # v1
t_v1 = dt_.datetime.now(dt_.timezone.utc)
time.sleep(0.05)
DeltaTable(P).delete("label < 5")                          # v2
write_deltalake(P, batch(20, 25, "c"), mode="append")     # v3


def step(name, fn):
    print(f"\n--- {name}")
    try:
        r = fn()
        print("OK", r)
    except Exception as e:
        print("ERROR", type(e).__name__, str(e).replace("\n", " ")[:400])


dt = DeltaTable(P)
print("versions:", [(h["version"], h["operation"]) for h in dt.history()])

# 1. DuckDB over the pyarrow dataset (the portable, no-extension way)
def duck_dataset():
    con = duckdb.connect()
    ds = DeltaTable(P).to_pyarrow_dataset()          # only files of the current snapshot
    con.register("labels", ds)
    r1 = con.execute("select count(*), min(label), max(label) from labels").fetchone()
    r2 = con.execute("select source, count(*) from labels where label >= 10 group by 1 order by 1").fetchall()
    r3 = con.execute("select image_id, embedding[1] from labels where image_id = 'img-21'").fetchall()
    return r1, r2, r3
step("DuckDB: con.register('labels', DeltaTable(p).to_pyarrow_dataset())", duck_dataset)

def duck_pushdown():
    con = duckdb.connect()
    ds = DeltaTable(P).to_pyarrow_dataset()
    con.register("labels", ds)
    plan = con.execute("explain select count(*) from labels where label >= 20").fetchall()[0][1]
    return "filter pushed into ARROW_SCAN" if "label>=20" in plan.replace(" ", "") or "Filters" in plan else plan[:500]
step("DuckDB filter pushdown into the arrow dataset scan", duck_pushdown)

# 2. time travel
step("DeltaTable(p, version=1)", lambda: DeltaTable(P, version=1).to_pyarrow_table().num_rows)
step("DeltaTable(p, version=2) (after delete)", lambda: DeltaTable(P, version=2).to_pyarrow_table().num_rows)
step("dt.load_as_version(1) then dataset in duckdb", lambda: (lambda d: (d.load_as_version(1), duckdb.connect().execute(
    "select count(*) from ds").fetchone() if False else None, (lambda c: (c.register("ds", d.to_pyarrow_dataset()), c.execute("select count(*) from ds").fetchone())[1])(duckdb.connect()))[2])(DeltaTable(P)))
step("dt.load_as_version(datetime right after v1)", lambda: (lambda d: (d.load_as_version(t_v1), d.version())[1])(DeltaTable(P)))
step("DeltaTable(p, version=99)", lambda: DeltaTable(P, version=99).version())

# 3. polars
step("pl.read_delta(p)", lambda: pl.read_delta(P).shape)
step("pl.read_delta(p, version=1)", lambda: pl.read_delta(P, version=1).shape)
step("pl.scan_delta(p).filter(label>=20).collect()", lambda: pl.scan_delta(P).filter(pl.col("label") >= 20).collect().shape)
step("pl.read_delta schema", lambda: dict(pl.read_delta(P).schema))
step("pl.from_arrow(DeltaTable.to_pyarrow_table())", lambda: pl.from_arrow(DeltaTable(P).to_pyarrow_table()).shape)

# 4. delta-rs' own SQL engine (DataFusion inside deltalake, no extra download)
step("deltalake.QueryBuilder SQL", lambda: pa.table(QueryBuilder().register("labels", DeltaTable(P))
                                                   .execute("select source, count(*) as n from labels group by source order by source")
                                                   .read_all()).to_pylist())

# 5. DuckDB's native delta_scan (delta extension)
def duck_delta_scan():
    con = duckdb.connect()
    try:
        con.execute("LOAD delta")
        return "loaded from local extension dir"
    except Exception as e:
        first = f"LOAD delta -> {type(e).__name__}: {str(e)[:160]}"
    try:
        con.execute("INSTALL delta")
    except Exception as e:
        return first + f" | INSTALL delta -> {type(e).__name__}: {str(e)[:250]}"
    con.execute("LOAD delta")
    return con.execute(f"select count(*) from delta_scan('{P}')").fetchone()
step("DuckDB delta_scan (needs the 'delta' extension)", duck_delta_scan)
print("DuckDB extension dir:", duckdb.connect().execute("select current_setting('extension_directory')").fetchone())
print("installed extensions:", duckdb.connect().execute(
    "select extension_name, installed, loaded from duckdb_extensions() where extension_name in ('delta','parquet','httpfs')").fetchall())
