"""Q6b: MERGE worst case: `latest` rows of every shard are mixed in every file (e.g. after
optimize.compact() or because rows arrive shuffled) and image_ids are hashes, so no file can be
skipped and every file holding a touched row is rewritten.
Run pinned to one core: taskset -c 0 venv/bin/python q6b_merge_worstcase.py N DIM"""
import hashlib, os, shutil, sys, time
import numpy as np
import pyarrow as pa
from deltalake import DeltaTable, write_deltalake, WriterProperties

N = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
DIM = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
SHARDS, FILES = 20, 10
PER = N // SHARDS
P = f"/tmp/delta-research/data/q6b_{N}_{DIM}"
shutil.rmtree(P, ignore_errors=True)
rng = np.random.default_rng(0)
WP = WriterProperties(compression="ZSTD")
SCHEMA = pa.schema([pa.field("image_id", pa.string(), nullable=False), ("source", pa.string()),
                    ("label", pa.int32()), ("run_id", pa.string()), ("embedding", pa.list_(pa.float32()))])


def hid(src, i):
    return hashlib.sha1(f"{src}/{i}".encode()).hexdigest()


def rows(ids, sources, run_id):
    n = len(ids)
    e = rng.standard_normal((n, DIM)).astype(np.float16).astype(np.float32)
    return pa.table({"image_id": ids, "source": sources, "label": pa.array(rng.integers(0, 1000, n), pa.int32()),
                     "run_id": [run_id] * n,
                     "embedding": pa.FixedSizeListArray.from_arrays(pa.array(e.ravel()), DIM).cast(pa.list_(pa.float32()))},
                    schema=SCHEMA)


keys = [(f"shard-{s:02d}", i) for s in range(SHARDS) for i in range(PER)]
order = rng.permutation(len(keys))
DeltaTable.create(P, SCHEMA)
t0 = time.time()
for chunk in np.array_split(order, FILES):           # every file gets rows of every shard
    ks = [keys[j] for j in chunk]
    write_deltalake(P, rows([hid(s, i) for s, i in ks], [s for s, _ in ks], "run-1"), mode="append", writer_properties=WP)
size = sum(os.path.getsize(os.path.join(P, f)) for f in os.listdir(P) if f.endswith(".parquet"))
print(f"built {N} rows dim={DIM}: {FILES} files, {size/1e6:.0f} MB in {time.time()-t0:.1f}s")

src = pa.concat_tables([
    rows([hid("shard-03", i) for i in range(400)] + [hid("shard-03", f"new{i}") for i in range(100)], ["shard-03"] * 500, "run-2"),
    rows([hid("shard-07", i) for i in range(0, 1000, 2)], ["shard-07"] * 500, "run-2")])
expected = N - (PER - 400) - (PER - 500) + 100
dt = DeltaTable(P)
t0 = time.time()
m = (dt.merge(src, "t.image_id = s.image_id", source_alias="s", target_alias="t", writer_properties=WP)
     .when_matched_update_all().when_not_matched_insert_all()
     .when_not_matched_by_source_delete(predicate="t.source IN ('shard-03', 'shard-07')").execute())
el = time.time() - t0
d2 = DeltaTable(P)
print(f"MERGE {el:.1f}s rows={d2.count()} (expected {expected})",
      {k: m[k] for k in m if k.startswith("num_") or k.endswith("_ms")})
size2 = sum(os.path.getsize(os.path.join(P, f)) for f in os.listdir(P) if f.endswith(".parquet"))
print(f"bytes on disk before {size/1e6:.0f} MB, after (old+new files until vacuum) {size2/1e6:.0f} MB")
