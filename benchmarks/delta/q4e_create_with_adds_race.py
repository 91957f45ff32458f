"""Q4e: two drivers racing create_table_with_add_actions (what Ray 2.60 does for a new table)."""
import multiprocessing as mp, shutil, sys, os
import pyarrow as pa
sys.path.insert(0, "/tmp/delta-research")
S = pa.schema([("image_id", pa.string())])


def w(url, wid, bar, q):
    from deltalake import Schema
    from deltalake.transaction import create_table_with_add_actions
    from common import write_parquet_and_action
    a = write_parquet_and_action(pa.table({"image_id": [f"w{wid}-{i}" for i in range(5)]}), url, f"part-w{wid}.parquet")
    bar.wait()
    try:
        create_table_with_add_actions(url, Schema.from_arrow(S), [a], mode="error")
        q.put(f"w{wid} OK")
    except Exception as e:
        q.put(f"w{wid} {type(e).__name__}: {str(e).splitlines()[0][:100]}")


if __name__ == "__main__":
    from deltalake import DeltaTable
    for i in range(4):
        url = f"/tmp/delta-research/data/q4e/t{i}"
        shutil.rmtree(url, ignore_errors=True); os.makedirs(url)
        ctx = mp.get_context("spawn"); bar, q = ctx.Barrier(2), ctx.Queue()
        ps = [ctx.Process(target=w, args=(url, k, bar, q)) for k in range(2)]
        [p.start() for p in ps]; r = [q.get(timeout=60) for _ in ps]; [p.join() for p in ps]
        d = DeltaTable(url)
        print(r, "| version", d.version(), "rows", d.to_pyarrow_table().num_rows,
              "| ops", [h["operation"] for h in d.history()], "| metadata ids differ:",
              len({l for v in range(d.version() + 1) for l in open(f"{url}/_delta_log/{v:020d}.json") if '"metaData"' in l}) > 1)
