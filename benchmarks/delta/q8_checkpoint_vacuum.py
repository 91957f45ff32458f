"""Q8: checkpoints, optimize.compact(), vacuum(), and orphan (uncommitted) files from crashed writers."""
import json, os, shutil, time
import pyarrow as pa
import pyarrow.parquet as pq
import duckdb, polars as pl
from deltalake import DeltaTable, write_deltalake
from common import write_parquet_and_action

BASE = "/tmp/delta-research/data/q8"
shutil.rmtree(BASE, ignore_errors=True)
SCHEMA = pa.schema([("image_id", pa.string()), ("label", pa.int32())])


def b(lo, hi):
    return pa.table({"image_id": [f"img-{i}" for i in range(lo, hi)], "label": pa.array(range(lo, hi), pa.int32())})


def files(p):
    return sorted(os.path.relpath(os.path.join(r, f), p) for r, _, fs in os.walk(p) for f in fs
                  if "_delta_log" not in r)


def visible(p):
    d = DeltaTable(p)
    con = duckdb.connect(); con.register("t", d.to_pyarrow_dataset())
    return {"DeltaTable": d.to_pyarrow_table().num_rows,
            "duckdb(to_pyarrow_dataset)": con.execute("select count(*) from t").fetchone()[0],
            "polars.read_delta": pl.read_delta(p).height,
            "QueryBuilder": pa.table(__import__("deltalake").QueryBuilder().register("t", d).execute("select count(*) c from t").read_all())["c"][0].as_py(),
            "file_uris": len(d.file_uris())}


def crash_writer(p, name):
    """A worker that wrote its Parquet file and died before the driver committed it."""
    os.makedirs(os.path.dirname(os.path.join(p, name)), exist_ok=True)
    pq.write_table(b(1000, 1100), os.path.join(p, name))


# ---------- A. orphans are invisible to readers
P = f"{BASE}/a"
DeltaTable.create(P, SCHEMA)
for i in range(5):
    write_deltalake(P, b(i * 10, i * 10 + 10), mode="append")         # v1..v5, 5 small files
print("committed rows:", DeltaTable(P).count())
crash_writer(P, "part-crashed-00001.parquet")
crash_writer(P, "source=x/part-crashed-00002.parquet")                 # looks like a partition dir
crash_writer(P, "_staging/part-crashed-00003.parquet")                 # underscore dir
crash_writer(P, ".hidden-part-crashed.parquet")                        # dot file
print("\n[A] files on disk:", files(P))
print("[A] readers see rows:", visible(P), "(50 committed, orphan files hold 100 rows each)")

# ---------- B. vacuum: default retention keeps fresh orphans; retention 0 removes them
print("\n[B] vacuum() default (dry_run=True, 168h):", DeltaTable(P).vacuum())
print("[B] vacuum(retention_hours=0) with enforce_retention_duration=True ->", end=" ")
try:
    DeltaTable(P).vacuum(retention_hours=0)
except Exception as e:
    print(type(e).__name__, str(e)[:150])
dry = DeltaTable(P).vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=True)
print("[B] dry run, retention 0:", dry)
deleted = DeltaTable(P).vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
print("[B] deleted:", deleted)
print("[B] files left:", files(P))
# NOTE: in deltalake 1.6 the default vacuum is 'lite' (full=False): it only deletes files that the log
# marked as removed; files never mentioned in the log (orphans) need full=True.
dry = DeltaTable(P).vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=True, full=True)
print("[B] dry run, retention 0, full=True:", dry)
print("[B] full=True with DEFAULT retention (168h) dry run:", DeltaTable(P).vacuum(full=True))
deleted = DeltaTable(P).vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False, full=True)
print("[B] deleted (full=True):", deleted)
print("[B] files left:", files(P))
print("[B] history:", [(h["version"], h["operation"], h.get("operationParameters"), h.get("operationMetrics")) for h in DeltaTable(P).history(3)])

# ---------- C. compaction, then vacuum removes the compacted-away files
m = DeltaTable(P).optimize.compact()
print("\n[C] optimize.compact() metrics:", {k: m[k] for k in ("numFilesAdded", "numFilesRemoved", "totalConsideredFiles", "totalFilesSkipped") if k in m})
d = DeltaTable(P)
print("[C] version", d.version(), "active files", len(d.file_uris()), "files on disk", len(files(P)), "rows", d.count())
print("[C] vacuum dry-run (retention 0):", len(d.vacuum(retention_hours=0, enforce_retention_duration=False)), "files")
print("[C] time travel to before compaction still works before vacuum:", DeltaTable(P, version=5).to_pyarrow_table().num_rows)
d.vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
print("[C] after vacuum files on disk:", files(P))
try:
    DeltaTable(P, version=5).to_pyarrow_table()
    print("[C] time travel to v5 after vacuum: OK?!")
except Exception as e:
    print("[C] time travel to v5 after vacuum ->", type(e).__name__, str(e).splitlines()[0][:120])

# ---------- D. checkpoints; lite vs full vacuum with orphans older than the last checkpoint
P = f"{BASE}/d"
DeltaTable.create(P, SCHEMA)
write_deltalake(P, b(0, 10), mode="append")
crash_writer(P, "part-crashed-before-checkpoint.parquet")
write_deltalake(P, b(10, 20), mode="append")
DeltaTable(P).create_checkpoint()
print("\n[D] _delta_log:", sorted(os.listdir(f"{P}/_delta_log")))
print("[D] _last_checkpoint:", open(f"{P}/_delta_log/_last_checkpoint").read())
crash_writer(P, "part-crashed-after-checkpoint.parquet")
write_deltalake(P, b(20, 30), mode="append")
d = DeltaTable(P)
print("[D] vacuum(full=False) dry run:", d.vacuum(retention_hours=0, enforce_retention_duration=False, full=False))
print("[D] vacuum(full=True)  dry run:", d.vacuum(retention_hours=0, enforce_retention_duration=False, full=True))
print("[D] table config:", d.metadata().configuration, "| checkpointInterval default -> auto checkpoint every 100 commits")

# ---------- E. DANGER: vacuum(retention 0) racing an in-flight writer
P = f"{BASE}/e"
DeltaTable.create(P, SCHEMA)
write_deltalake(P, b(0, 10), mode="append")
act = write_parquet_and_action(b(100, 110), P, "part-inflight.parquet")   # worker done, driver not yet committed
DeltaTable(P).vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False, full=True)  # someone runs FULL vacuum
DeltaTable(P).create_write_transaction([act], mode="append", schema=SCHEMA)                # driver commits
try:
    print("\n[E] read after commit:", DeltaTable(P).to_pyarrow_table().num_rows)
except Exception as e:
    print("\n[E] vacuum(0h) deleted the in-flight file; commit still succeeded; read ->", type(e).__name__,
          str(e).splitlines()[0][:140])
