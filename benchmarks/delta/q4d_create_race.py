"""Q4d: two drivers creating the same table at the same moment (first run of a pipeline)."""
import multiprocessing as mp, shutil, sys
import pyarrow as pa
sys.path.insert(0, "/tmp/delta-research")
S = pa.schema([("image_id", pa.string())])


def w(url, so, mode, bar, q):
    from deltalake import DeltaTable
    bar.wait()
    try:
        d = DeltaTable.create(url, S, mode=mode, storage_options=so)
        q.put(f"OK v{d.version()}")
    except Exception as e:
        q.put(f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")


def race(url, so, mode):
    ctx = mp.get_context("spawn"); bar, q = ctx.Barrier(2), ctx.Queue()
    ps = [ctx.Process(target=w, args=(url, so, mode, bar, q)) for _ in range(2)]
    [p.start() for p in ps]; r = [q.get(timeout=120) for _ in ps]; [p.join() for p in ps]
    from deltalake import DeltaTable
    print(f"{url} mode={mode}: {r}; final version={DeltaTable(url, storage_options=so).version()}")


if __name__ == "__main__":
    shutil.rmtree("/tmp/delta-research/data/q4d", ignore_errors=True)
    for mode in ("ignore", "error"):
        for i in range(3):
            race(f"/tmp/delta-research/data/q4d/{mode}{i}", None, mode)
    from motoserver import moto_server
    with moto_server() as (ep, s3, so, pid):
        for mode in ("ignore", "error"):
            for i in range(3):
                race(f"s3://delta/{mode}{i}", so, mode)
