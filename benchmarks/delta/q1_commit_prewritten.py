"""Q1: workers write Parquet with pyarrow, driver commits them as AddActions."""
import json, os, shutil, time, traceback
import pyarrow as pa
import pyarrow.parquet as pq
import deltalake
from deltalake import DeltaTable, Schema, write_deltalake
from deltalake.transaction import AddAction, create_table_with_add_actions
from common import write_parquet_and_action

print("deltalake", deltalake.__version__, "core", deltalake.rust_core_version())
BASE = "/tmp/delta-research/data/q1"
shutil.rmtree(BASE, ignore_errors=True)
os.makedirs(BASE)

SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("source", pa.string()),
    pa.field("label", pa.int32()),
    pa.field("score", pa.float32()),
    pa.field("ts", pa.timestamp("us", tz="UTC")),
    pa.field("embedding", pa.list_(pa.float32())),
])


def batch(start, n, source="shard-0"):
    import datetime as d
    return pa.table({
        "image_id": [f"img-{i:06d}" for i in range(start, start + n)],
        "source": [source] * n,
        "label": pa.array(range(start, start + n), pa.int32()),
        "score": pa.array([0.5] * n, pa.float32()),
        "ts": pa.array([d.datetime(2024, 1, 1, tzinfo=d.timezone.utc)] * n, pa.timestamp("us", tz="UTC")),
        "embedding": pa.array([[0.1, 0.2, 0.3]] * n, pa.list_(pa.float32())),
    }, schema=SCHEMA)


def step(name, fn):
    print(f"\n--- {name}")
    try:
        r = fn()
        print("OK", "" if r is None else r)
    except Exception as e:
        print("ERROR", type(e).__name__, str(e)[:400])


# ---- A. create empty table first with DeltaTable.create, then commit files
t = f"{BASE}/a"
step("DeltaTable.create(empty)", lambda: DeltaTable.create(t, SCHEMA, mode="error", name="labels",
                                                            configuration={"delta.appendOnly": "false"}).version())
print(os.listdir(f"{t}/_delta_log"))
print("schema nullable image_id:", DeltaTable(t).schema().to_arrow())
acts = [write_parquet_and_action(batch(0, 5), t, "part-00000-run1.parquet"),
        write_parquet_and_action(batch(5, 7), t, "part-00001-run1.parquet")]
print("AddAction example:", acts[0])
dtab = DeltaTable(t)
step("create_write_transaction(append)", lambda: dtab.create_write_transaction(acts, mode="append", schema=SCHEMA))
dtab = DeltaTable(t)
print("version", dtab.version(), "rows", dtab.to_pyarrow_table().num_rows, "count()", dtab.count())
print(dtab.get_add_actions(flatten=True).to_pydict() if hasattr(dtab.get_add_actions(), "to_pydict") else
      pa.table(dtab.get_add_actions(flatten=True)).select(["path", "size_bytes", "num_records", "min.label", "max.label"]).to_pylist())
log1 = open(f"{t}/_delta_log/00000000000000000001.json").read()
print("log v1:\n", log1)

# ---- B. stats / field variants, each on a FRESH table so one broken commit doesn't mask the next
_n = [0]
def fresh():
    _n[0] += 1
    p = f"{BASE}/var{_n[0]}"
    DeltaTable.create(p, SCHEMA)
    a = write_parquet_and_action(batch(0, 5), p, "base.parquet")
    DeltaTable(p).create_write_transaction([a], mode="append", schema=SCHEMA)
    return p

def commit_one(stats, rel="x.parquet", check_filter=False, **kw):
    p = fresh()
    a = write_parquet_and_action(batch(100, 3), p, rel)
    a.stats = stats
    for k, v in kw.items():
        setattr(a, k, v)
    DeltaTable(p).create_write_transaction([a], mode="append", schema=SCHEMA)
    d = DeltaTable(p)
    out = f"v{d.version()} rows(read)={d.to_pyarrow_table().num_rows} count()(from stats)={d.count()}"
    if check_filter:
        # label >= 100 only exists in the new file (labels 100..102)
        ds = d.to_pyarrow_dataset()
        import pyarrow.dataset as pds
        out += f" | to_pyarrow_dataset filter label>=100 -> {ds.to_table(filter=pds.field('label') >= 100).num_rows}"
        out += f" | QueryBuilder -> {pa.table(deltalake.QueryBuilder().register('t', d).execute('select count(*) c from t where label >= 100').read_all())['c'][0]}"
        out += f" | to_pyarrow_table(filters) -> {d.to_pyarrow_table(filters=[('label', '>=', 100)]).num_rows}"
    return out

step("stats='' (empty string)", lambda: commit_one("", check_filter=True))
step("stats='{}'", lambda: commit_one("{}", check_filter=True))
step("stats=None", lambda: commit_one(None, check_filter=True))
step("stats numRecords only (what Ray 2.60 writes)", lambda: commit_one(json.dumps({"numRecords": 3}), check_filter=True))
step("stats WRONG numRecords=999 (is it trusted?)", lambda: commit_one(json.dumps({"numRecords": 999})))
step("stats WRONG max label=50 (really 100..102): data skipping trusts stats?",
     lambda: commit_one(json.dumps({"numRecords": 3, "minValues": {"label": 0}, "maxValues": {"label": 50}, "nullCount": {"label": 0}}), check_filter=True))
step("stats nullCount only for some columns", lambda: commit_one(json.dumps({"numRecords": 3, "nullCount": {"label": 0}}), check_filter=True))
step("invalid JSON stats", lambda: commit_one("not json"))
step("modification_time=0", lambda: commit_one(json.dumps({"numRecords": 3}), modification_time=0))
step("wrong size (size=1) -> commit accepted, then read fails?", lambda: commit_one(json.dumps({"numRecords": 3}), size=1))
step("size larger than file (size+100)", lambda: commit_one(json.dumps({"numRecords": 3}), size=10**6))
step("partition_values on unpartitioned table", lambda: commit_one(json.dumps({"numRecords": 3}), partition_values={"source": "x"}))
step("data_change=False", lambda: commit_one(json.dumps({"numRecords": 3}), data_change=False))
step("path in subfolder 'run=1/part.parquet' (not a partition)", lambda: commit_one(json.dumps({"numRecords": 3}), rel="sub/dir/x.parquet"))

def missing_file():
    p = fresh()
    a = AddAction("does-not-exist.parquet", 123, {}, int(time.time() * 1000), True, json.dumps({"numRecords": 1}))
    DeltaTable(p).create_write_transaction([a], mode="append", schema=SCHEMA)
    d = DeltaTable(p)
    out = f"COMMITTED version={d.version()}"
    try:
        d.to_pyarrow_table()
    except Exception as e:
        out += f"; read -> {type(e).__name__}: {str(e).splitlines()[0][:150]}"
    return out
step("AddAction for a file that does not exist", missing_file)

def abs_path():
    p = fresh()
    a = write_parquet_and_action(batch(200, 2), p, "abs.parquet")
    a.path = os.path.join(p, "abs.parquet")
    DeltaTable(p).create_write_transaction([a], mode="append", schema=SCHEMA)
    d = DeltaTable(p)
    return f"committed; path stored as {json.loads(open(p+'/_delta_log/00000000000000000002.json').read().splitlines()[1])['add']['path']!r}; rows={d.to_pyarrow_table().num_rows}; file_uris={d.file_uris()[-1]}"
step("absolute path in AddAction", abs_path)

def dup_path():
    p = fresh()
    a = write_parquet_and_action(batch(100, 3), p, "dup.parquet")
    DeltaTable(p).create_write_transaction([a], mode="append", schema=SCHEMA)
    DeltaTable(p).create_write_transaction([a], mode="append", schema=SCHEMA)
    d = DeltaTable(p)
    return f"same AddAction committed twice: v{d.version()} rows={d.to_pyarrow_table().num_rows} files={len(d.file_uris())}"
step("commit the same file twice (retry without idempotency)", dup_path)

def mismatched_file_schema():
    p = fresh()
    tb = pa.table({"image_id": ["z"], "label": pa.array([1], pa.int64())})  # missing cols, label int64
    a = write_parquet_and_action(tb, p, "odd.parquet")
    DeltaTable(p).create_write_transaction([a], mode="append", schema=SCHEMA)
    d = DeltaTable(p)
    r = d.to_pyarrow_table()
    return f"commit accepted; read rows={r.num_rows}, last row={r.slice(r.num_rows-1).to_pylist()}"
step("file whose Parquet schema differs from table (missing cols, int64 vs int32)", mismatched_file_schema)

# ---- C. first commit = create table with files (what Ray 2.60 does)
t2 = f"{BASE}/b"
os.makedirs(t2)
acts2 = [write_parquet_and_action(batch(0, 4, "shard-a"), t2, "source=shard-a/part-0.parquet", {"source": "shard-a"}),
         write_parquet_and_action(batch(4, 4, "shard-b"), t2, "source=shard-b/part-0.parquet", {"source": "shard-b"})]
step("create_table_with_add_actions(partitioned)", lambda: create_table_with_add_actions(
    t2, Schema.from_arrow(SCHEMA), acts2, mode="error", partition_by=["source"], name="labels"))
d2 = DeltaTable(t2)
print("v", d2.version(), "partitions", d2.metadata().partition_columns, "rows", d2.to_pyarrow_table().num_rows)
print(d2.to_pyarrow_table().select(["image_id", "source"]).to_pylist()[:5])
# partition column was ALSO written into the parquet file by pyarrow here (write_table of full table)
print("parquet file columns:", pq.read_schema(f"{t2}/source=shard-a/part-0.parquet").names)

# ---- D. schema handling in create_write_transaction
def wider_schema():
    wider = SCHEMA.append(pa.field("extra", pa.string()))
    tb = batch(300, 2).append_column("extra", pa.array(["e", "e"]))
    a = write_parquet_and_action(tb, t, "wider.parquet")
    DeltaTable(t).create_write_transaction([a], mode="append", schema=wider)
    d = DeltaTable(t)
    return f"table schema now has extra? {'extra' in d.schema().to_arrow().names if hasattr(d.schema().to_arrow(),'names') else d.schema()}"
step("append with wider schema= (schema evolution?)", wider_schema)

# ---- E. write_deltalake with an empty table to create
t3 = f"{BASE}/c"
step("write_deltalake(empty table)", lambda: (write_deltalake(t3, SCHEMA.empty_table()), DeltaTable(t3).version())[1])
step("DeltaTable.create(mode='ignore') on existing", lambda: DeltaTable.create(t3, SCHEMA, mode="ignore").version())
step("DeltaTable.create(mode='error') on existing", lambda: DeltaTable.create(t3, SCHEMA, mode="error").version())
step("DeltaTable.is_deltatable", lambda: (DeltaTable.is_deltatable(t3), DeltaTable.is_deltatable(f"{BASE}/nope")))
