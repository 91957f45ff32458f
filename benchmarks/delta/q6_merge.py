"""Q6: keep a `latest` table (one row per image_id) current with MERGE, including deleting rows of
re-read shards that disappeared. List-typed embedding column. Rough timing.

Run pinned to one core:  taskset -c 0 venv/bin/python q6_merge.py [N_ROWS] [DIM]
"""
import os, shutil, sys, time, json
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable, write_deltalake, WriterProperties

N = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
DIM = int(sys.argv[2]) if len(sys.argv) > 2 else 256
SHARDS = 20
PER = N // SHARDS
BASE = f"/tmp/delta-research/data/q6_{N}_{DIM}"
shutil.rmtree(BASE, ignore_errors=True)
rng = np.random.default_rng(0)
WP = WriterProperties(compression="ZSTD")

SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("source", pa.string()),
    pa.field("label", pa.int32()),
    pa.field("score", pa.float32()),
    pa.field("run_id", pa.string()),
    pa.field("embedding", pa.list_(pa.float32())),
])


def rows(ids, source, run_id):
    n = len(ids)
    e = rng.standard_normal((n, DIM)).astype(np.float16).astype(np.float32)  # f16-rounded values
    return pa.table({
        "image_id": ids, "source": [source] * n,
        "label": pa.array(rng.integers(0, 1000, n), pa.int32()),
        "score": pa.array(rng.random(n), pa.float32()),
        "run_id": [run_id] * n,
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(e.ravel()), DIM).cast(pa.list_(pa.float32())),
    }, schema=SCHEMA)


def build(path, partition_by=None):
    DeltaTable.create(path, SCHEMA, partition_by=partition_by)
    t0 = time.time()
    for s in range(SHARDS):
        src = f"shard-{s:02d}"
        write_deltalake(path, rows([f"{src}/img-{i:06d}" for i in range(PER)], src, "run-1"),
                        mode="append", writer_properties=WP)
    dt = DeltaTable(path)
    print(f"built {path}: {N} rows, dim={DIM}, files={len(dt.file_uris())}, "
          f"{sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs if f.endswith('.parquet'))/1e6:.1f} MB, {time.time()-t0:.1f}s")


# source batch: re-read shard-03 (now 500 rows: 400 existing ids updated + 100 new ids)
#               re-read shard-07 (now 500 rows: all existing ids, updated)
# -> the other 4600 + 4500 rows of those shards are gone and must be deleted; other shards untouched.
REREAD = ["shard-03", "shard-07"]
src = pa.concat_tables([
    rows([f"shard-03/img-{i:06d}" for i in range(400)] + [f"shard-03/new-{i:06d}" for i in range(100)], "shard-03", "run-2"),
    rows([f"shard-07/img-{i:06d}" for i in range(0, 1000, 2)], "shard-07", "run-2"),
])
assert src.num_rows == 1000
in_list = ", ".join(f"'{s}'" for s in REREAD)
expected = N - (PER - 400) - (PER - 500) + 100


def merge(path, predicate, label):
    dt = DeltaTable(path)
    v0 = dt.version()
    t0 = time.time()
    m = (dt.merge(source=src, predicate=predicate, source_alias="s", target_alias="t",
                  writer_properties=WP)
         .when_matched_update_all()
         .when_not_matched_insert_all()
         .when_not_matched_by_source_delete(predicate=f"t.source IN ({in_list})")
         .execute())
    el = time.time() - t0
    dt = DeltaTable(path)
    t = dt.to_pyarrow_table(columns=["image_id", "source", "run_id"])
    ok = (t.num_rows == expected and pc.count_distinct(t["image_id"]).as_py() == t.num_rows
          and pc.sum(pc.equal(t["run_id"], "run-2")).as_py() == 1000)
    print(f"\n[{label}] MERGE {el:.2f}s  v{v0}->v{dt.version()}  rows={t.num_rows} (expected {expected}) correct={ok}")
    print("   metrics:", {k: m[k] for k in m if k.startswith("num_") or k.endswith("_ms")})
    return el


# A. unpartitioned, plain key predicate (not_matched_by_source forces a full target scan)
build(f"{BASE}/a")
merge(f"{BASE}/a", "t.image_id = s.image_id", "A unpartitioned, predicate t.image_id = s.image_id")

# B. same table, add the shard filter to the join predicate so untouched files can be skipped.
#    Only valid if an image_id never moves between sources (otherwise you'd insert a duplicate).
build(f"{BASE}/b")
merge(f"{BASE}/b", f"t.image_id = s.image_id AND t.source IN ({in_list})",
      "B unpartitioned, predicate + t.source IN (...)")

# C. partitioned by source + shard filter in predicate -> partition pruning
build(f"{BASE}/c", partition_by=["source"])
merge(f"{BASE}/c", f"t.image_id = s.image_id AND t.source IN ({in_list})",
      "C partitioned by source, predicate + t.source IN (...)")

# D. plain upsert without the delete clause (common case: new labels only)
build(f"{BASE}/d")
dt = DeltaTable(f"{BASE}/d")
t0 = time.time()
m = (dt.merge(src, "t.image_id = s.image_id", source_alias="s", target_alias="t", writer_properties=WP)
     .when_matched_update_all().when_not_matched_insert_all().execute())
print(f"\n[D unpartitioned upsert only] MERGE {time.time()-t0:.2f}s rows={DeltaTable(f'{BASE}/d').count()}",
      {k: m[k] for k in m if k.startswith("num_")})

# E. realistic ids: hash-like image_ids (no ordering by shard), so image_id min/max stats cannot prune
import hashlib
def hid(src, i):
    return hashlib.sha1(f"{src}/{i}".encode()).hexdigest()
def build_hashed(path):
    DeltaTable.create(path, SCHEMA)
    for s_ in range(SHARDS):
        sn = f"shard-{s_:02d}"
        write_deltalake(path, rows([hid(sn, i) for i in range(PER)], sn, "run-1"), mode="append", writer_properties=WP)
src_h = pa.concat_tables([
    rows([hid("shard-03", i) for i in range(400)] + [hid("shard-03", f"new{i}") for i in range(100)], "shard-03", "run-2"),
    rows([hid("shard-07", i) for i in range(0, 1000, 2)], "shard-07", "run-2")])
for label, pred in (("E hashed ids, plain predicate", "t.image_id = s.image_id"),
                    ("E2 hashed ids, predicate + t.source IN (...)", f"t.image_id = s.image_id AND t.source IN ({in_list})")):
    pth = f"{BASE}/{label.split()[0].lower()}"
    build_hashed(pth)
    dt = DeltaTable(pth); t0 = time.time()
    m = (dt.merge(src_h, pred, source_alias="s", target_alias="t", writer_properties=WP)
         .when_matched_update_all().when_not_matched_insert_all()
         .when_not_matched_by_source_delete(predicate=f"t.source IN ({in_list})").execute())
    print(f"\n[{label}] MERGE {time.time()-t0:.2f}s rows={DeltaTable(pth).count()} (expected {expected})",
          {k: m[k] for k in m if k.startswith("num_") or k.endswith("_ms")})
print("\nhistory op:", {k: DeltaTable(f"{BASE}/a").history(1)[0][k] for k in ("operation", "operationParameters")})
