"""Q2: attach a run manifest to a commit via CommitProperties(custom_metadata=...)."""
import json, os, shutil, time
import pyarrow as pa
from deltalake import DeltaTable, write_deltalake, CommitProperties
from common import write_parquet_and_action

BASE = "/tmp/delta-research/data/q2"
shutil.rmtree(BASE, ignore_errors=True)
T = f"{BASE}/t"
SCHEMA = pa.schema([("image_id", pa.string()), ("label", pa.int32())])
DeltaTable.create(T, SCHEMA)


def commit(custom_metadata, n=1):
    a = write_parquet_and_action(pa.table({"image_id": ["a"] * n, "label": pa.array([1] * n, pa.int32())}),
                                 T, f"part-{time.time_ns()}.parquet")
    DeltaTable(T).create_write_transaction(
        [a], mode="append", schema=SCHEMA,
        commit_properties=CommitProperties(custom_metadata=custom_metadata))
    return DeltaTable(T).history(limit=1)[0]


def step(name, fn):
    print(f"\n--- {name}")
    try:
        r = fn()
        print("OK", r if len(str(r)) < 900 else str(r)[:900] + "...")
    except Exception as e:
        print("ERROR", type(e).__name__, str(e)[:300])


manifest = {
    "run_id": "run-2024-06-01T12:00:00Z-7f3a",
    "model": "resnet50", "model_sha256": "ab" * 32,
    "num_images": 12345, "num_failed": 3, "score_threshold": 0.25,
    "shards": ["s3://bucket/shard-000.tar", "s3://bucket/shard-001.tar"],
    "git": {"commit": "deadbeef", "dirty": False},
}
step("nested JSON-able values (dict/list/int/float/bool) as top-level keys",
     lambda: commit(manifest))
h = DeltaTable(T).history(limit=1)[0]
print("type(num_images)", type(h["num_images"]), "type(shards)", type(h["shards"]), "type(git)", type(h["git"]))
step("manifest serialized into ONE string key (recommended)",
     lambda: commit({"ray_pipeline.manifest": json.dumps(manifest), "userMetadata": "run-7f3a"}))
h = DeltaTable(T).history(limit=1)[0]
print("round-trip equal:", json.loads(h["ray_pipeline.manifest"]) == manifest)
step("NaN value", lambda: commit({"x": float("nan")}))
step("non-string top-level key (int)", lambda: commit({1: "a"}))
step("reserved key 'operation'", lambda: commit({"operation": "MY_OP"}))
step("reserved key 'timestamp'", lambda: commit({"timestamp": 1}))
step("userMetadata non-string", lambda: commit({"userMetadata": {"a": 1}}))
step("readVersion float", lambda: commit({"readVersion": 1.0}))
step("key colliding with 'engineInfo'", lambda: commit({"engineInfo": "me"}))
step("None value", lambda: commit({"x": None}))
for size in (64 * 1024, 1024 * 1024, 16 * 1024 * 1024):
    def big(size=size):
        t0 = time.time()
        h = commit({"blob": "x" * size})
        t1 = time.time()
        d = DeltaTable(T)
        hist = d.history()
        t2 = time.time()
        return f"size={size}: commit {t1-t0:.2f}s, history() {t2-t1:.2f}s, blob len back={len(h['blob'])}, log file={os.path.getsize(f'{T}/_delta_log/{d.version():020d}.json')} B"
    step(f"{size} byte value", big)

print("\n--- last 3 history entries (keys only)")
for e in DeltaTable(T).history(limit=3):
    print(e["version"], sorted(k for k in e.keys() if k != "blob"))
# history() includes ALL versions (newest first); each entry has 'version' added by the python wrapper
print("history len:", len(DeltaTable(T).history()), "version:", DeltaTable(T).version())
# also works through write_deltalake
write_deltalake(T, pa.table({"image_id": ["w"], "label": pa.array([2], pa.int32())}), mode="append",
                commit_properties=CommitProperties(custom_metadata={"via": "write_deltalake"}))
print("write_deltalake commitInfo:", {k: v for k, v in DeltaTable(T).history(1)[0].items()})
