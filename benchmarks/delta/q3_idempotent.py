"""Q3: idempotent commits with application transactions (SetTransaction / 'txn' action)."""
import json, os, shutil, time
import pyarrow as pa
from deltalake import DeltaTable, write_deltalake, CommitProperties, Transaction
from common import write_parquet_and_action

BASE = "/tmp/delta-research/data/q3"
shutil.rmtree(BASE, ignore_errors=True)
T = f"{BASE}/t"
SCHEMA = pa.schema([("image_id", pa.string()), ("label", pa.int32())])
DeltaTable.create(T, SCHEMA)
RUN = "20240601-7f3a"
APP_ID = f"resnet-pipeline-{RUN}"


def step(name, fn):
    print(f"\n--- {name}")
    try:
        r = fn()
        print("OK", "" if r is None else r)
    except Exception as e:
        print("ERROR", type(e).__name__, str(e)[:300])


def idempotent_commit(table_uri, actions, app_id, txn_version, manifest, storage_options=None):
    """Driver-side commit that is safe to retry: skip if app_id already reached txn_version."""
    dt = DeltaTable(table_uri, storage_options=storage_options)
    done = dt.transaction_version(app_id)          # int | None
    if done is not None and done >= txn_version:
        return f"SKIPPED: {app_id} already committed at txn version {done} (table v{dt.version()})"
    dt.create_write_transaction(
        actions, mode="append", schema=dt.schema(),   # Delta Schema accepted directly
        commit_properties=CommitProperties(
            custom_metadata={"pipeline.manifest": json.dumps(manifest)},
            app_transactions=[Transaction(app_id=app_id, version=txn_version,
                                          last_updated=int(time.time() * 1000))],
            max_commit_retries=15,
        ),
    )
    return f"COMMITTED table v{DeltaTable(table_uri, storage_options=storage_options).version()}"


def batch(n, tag):
    return pa.table({"image_id": [f"{tag}-{i}" for i in range(n)], "label": pa.array([1] * n, pa.int32())})


print("before:", DeltaTable(T).transaction_version(APP_ID))
acts = [write_parquet_and_action(batch(10, "a"), T, f"part-{RUN}-00000.parquet")]
step("first commit (txn version 1)", lambda: idempotent_commit(T, acts, APP_ID, 1, {"run": RUN}))
print("after: transaction_version =", DeltaTable(T).transaction_version(APP_ID))
print("log:", open(f"{T}/_delta_log/00000000000000000001.json").read().splitlines()[1])
step("retry of the same driver commit (e.g. driver restarted)", lambda: idempotent_commit(T, acts, APP_ID, 1, {"run": RUN}))
print("rows:", DeltaTable(T).to_pyarrow_table().num_rows)

# --- does delta-rs itself refuse a commit whose txn version is <= the recorded one? (no pre-check)
def raw(v, app=APP_ID):
    a = [write_parquet_and_action(batch(1, f"raw{v}"), T, f"raw-{time.time_ns()}.parquet")]
    DeltaTable(T).create_write_transaction(a, mode="append", schema=SCHEMA,
        commit_properties=CommitProperties(app_transactions=[Transaction(app, v)]))
    return f"committed; now transaction_version={DeltaTable(T).transaction_version(app)}"
step("raw commit with SAME txn version 1 (no client check)", lambda: raw(1))
step("raw commit with LOWER txn version 0", lambda: raw(0))
step("raw commit with version 5", lambda: raw(5))
step("two Transactions in one commit (multi app ids)", lambda: (
    DeltaTable(T).create_write_transaction([write_parquet_and_action(batch(1, "m"), T, "m.parquet")], mode="append", schema=SCHEMA,
        commit_properties=CommitProperties(app_transactions=[Transaction("app-x", 3), Transaction("app-y", 7)])),
    (DeltaTable(T).transaction_version("app-x"), DeltaTable(T).transaction_version("app-y")))[1])
step("same app_id twice in one commit", lambda: (
    DeltaTable(T).create_write_transaction([write_parquet_and_action(batch(1, "d"), T, "d.parquet")], mode="append", schema=SCHEMA,
        commit_properties=CommitProperties(app_transactions=[Transaction("app-z", 1), Transaction("app-z", 2)])),
    DeltaTable(T).transaction_version("app-z"))[1])
step("unknown app id", lambda: DeltaTable(T).transaction_version("nope"))
step("transaction_version on an older snapshot (version=1)", lambda: DeltaTable(T, version=1).transaction_version(APP_ID))

# after checkpoint, txn must still be known (it is part of the checkpoint state)
d = DeltaTable(T); d.create_checkpoint()
shutil.rmtree(f"{BASE}/t_copy", ignore_errors=True)
print("\nafter checkpoint:", DeltaTable(T).transaction_version(APP_ID), os.listdir(f"{T}/_delta_log"))

# write_deltalake accepts the same commit_properties
write_deltalake(T, batch(2, "wd"), mode="append",
                commit_properties=CommitProperties(app_transactions=[Transaction("wd-app", 42)]))
print("write_deltalake txn:", DeltaTable(T).transaction_version("wd-app"))

# Transaction fields
tx = Transaction("a", 1)
print("Transaction repr:", tx, "fields:", tx.app_id, tx.version, tx.last_updated)
