"""Q4 (part 2): two processes committing to the same Delta table at the same time,
on the local filesystem and on S3 (moto standalone server over http on loopback).

Each round: both processes write one Parquet file, load the table (same snapshot version),
wait on a barrier, then commit. So both always try to write the SAME next log version;
exactly one wins it, the other must detect `VersionAlreadyExists` and (for blind appends)
rebase + retry at the next version, or fail if max_commit_retries=0.
"""
import io, json, multiprocessing as mp, os, shutil, sys, time, traceback
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(__file__))
ROUNDS = int(os.environ.get("ROUNDS", "10"))
ROWS = 7
SCHEMA = pa.schema([("image_id", pa.string()), ("worker", pa.int32()), ("round", pa.int32())])


def make_fs(url, so):
    if url.startswith("s3://"):
        ep = so["AWS_ENDPOINT_URL"]
        return pafs.S3FileSystem(access_key=so["AWS_ACCESS_KEY_ID"], secret_key=so["AWS_SECRET_ACCESS_KEY"],
                                 region=so["AWS_REGION"], endpoint_override=ep.split("://")[1],
                                 scheme=ep.split("://")[0]), url[len("s3://"):]
    return pafs.LocalFileSystem(), url


def write_file(url, so, rel, tbl):
    """Worker side: write Parquet with pyarrow, return an AddAction."""
    from deltalake.transaction import AddAction
    fs, root = make_fs(url, so)
    sink = io.BytesIO()
    pq.write_table(tbl, sink, compression="zstd")
    data = sink.getvalue()
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(f"{root}/{rel}"), exist_ok=True)
    with fs.open_output_stream(f"{root}/{rel}") as f:
        f.write(data)
    return AddAction(rel, len(data), {}, int(time.time() * 1000), True, json.dumps({"numRecords": tbl.num_rows}))


def worker(wid, url, so, barrier, q, max_retries, app_id_mode):
    from deltalake import DeltaTable, CommitProperties, Transaction
    for r in range(ROUNDS):
        tbl = pa.table({"image_id": [f"w{wid}-r{r}-{i}" for i in range(ROWS)],
                        "worker": pa.array([wid] * ROWS, pa.int32()), "round": pa.array([r] * ROWS, pa.int32())})
        act = write_file(url, so, f"part-w{wid}-r{r:03d}.parquet", tbl)
        dt = DeltaTable(url, storage_options=so)
        read_v = dt.version()
        txns = None
        if app_id_mode:  # both processes claim the SAME app_id/version -> exactly one may commit
            app = f"resnet-pipeline-run{r}"
            if dt.transaction_version(app) is not None:
                barrier.wait()
                q.put((wid, r, read_v, "SKIPPED(already committed)", None))
                continue
            txns = [Transaction(app, 1)]
        barrier.wait()  # both now hold a snapshot at the same version
        t0 = time.time()
        try:
            dt.create_write_transaction([act], mode="append", schema=SCHEMA,
                commit_properties=CommitProperties(max_commit_retries=max_retries, app_transactions=txns,
                                                   custom_metadata={"writer": wid, "round": r}))
            dt2 = DeltaTable(url, storage_options=so)
            # find the version this commit landed at (commitInfo carries writer/round)
            mine = [h["version"] for h in dt2.history(limit=6) if h.get("writer") == wid and h.get("round") == r]
            q.put((wid, r, read_v, "OK", mine[0] if mine else None))
        except Exception as e:
            q.put((wid, r, read_v, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}", None))


def run_case(name, url, so, max_retries=None, app_id_mode=False):
    from deltalake import DeltaTable
    print(f"\n===== {name}: url={url} max_commit_retries={max_retries} app_id_mode={app_id_mode}")
    DeltaTable.create(url, SCHEMA, storage_options=so)
    ctx = mp.get_context("spawn")
    barrier, q = ctx.Barrier(2), ctx.Queue()
    ps = [ctx.Process(target=worker, args=(w, url, so, barrier, q, max_retries, app_id_mode)) for w in (0, 1)]
    [p.start() for p in ps]
    res = [q.get(timeout=300) for _ in range(2 * ROUNDS)]
    [p.join() for p in ps]
    ok = [x for x in res if x[3] == "OK"]
    failed = [x for x in res if x[3] not in ("OK",) and not x[3].startswith("SKIPPED")]
    skipped = [x for x in res if x[3].startswith("SKIPPED")]
    dt = DeltaTable(url, storage_options=so)
    t = dt.to_pyarrow_table()
    hist = [h for h in dt.history() if h["operation"] == "WRITE"]
    # a commit whose version > readVersion+1 was rebased onto a concurrent winner (i.e. it retried)
    # a commit that landed at version > read_version+1 lost the race for read_version+1 and was rebased
    retried = [x for x in ok if x[4] is not None and x[4] > x[2] + 1]
    files = dt.file_uris()
    print(f"commits OK={len(ok)} failed={len(failed)} skipped={len(skipped)}; table version={dt.version()} "
          f"(expected {len(ok)}); rows={t.num_rows} (expected {ROWS * len(ok)}); files={len(files)}; "
          f"distinct image_ids={len(set(t['image_id'].to_pylist()))}")
    print(f"history: {len(hist)} WRITE commits; commits rebased after losing a version race: {len(retried)};"
          f" sample commitInfo keys: {sorted(hist[0].keys()) if hist else None}")
    for x in failed[:3]:
        print("  failure sample:", x)
    assert dt.version() == len(ok), "version count mismatch -> a commit was lost or double-counted!"
    assert t.num_rows == ROWS * len(ok), "row count mismatch -> LOST UPDATE"
    if app_id_mode:
        for r in range(ROUNDS):
            assert dt.transaction_version(f"resnet-pipeline-run{r}") == 1
        assert len(ok) == ROUNDS, "each app_id must be committed exactly once"
    print("CHECKS PASSED")
    return ok, failed


if __name__ == "__main__":
    base = "/tmp/delta-research/data/q4"
    shutil.rmtree(base, ignore_errors=True)
    which = sys.argv[1:] or ["local", "s3"]
    if "local" in which:
        run_case("LOCAL default retries", f"{base}/local_default", None)
        run_case("LOCAL max_commit_retries=0", f"{base}/local_noretry", None, 0)
        run_case("LOCAL same app_id race", f"{base}/local_appid", None, app_id_mode=True)
    if "s3" in which:
        from motoserver import moto_server
        with moto_server() as (endpoint, s3, so, pid):
            print("moto endpoint", endpoint, "storage_options", so)
            run_case("S3/moto default retries", "s3://delta/t_default", so, None)
            run_case("S3/moto max_commit_retries=0", "s3://delta/t_noretry", so, 0)
            run_case("S3/moto same app_id race", "s3://delta/t_appid", so, None, app_id_mode=True)
            keys = [o["Key"] for o in s3.list_objects_v2(Bucket="delta", Prefix="t_default/_delta_log/")["Contents"]]
            print("t_default/_delta_log keys (no leftover tmp commit files?):", [k.split("/")[-1] for k in keys][:8], "...", len(keys))
    if "s3nocond" in which:
        # NEGATIVE CONTROL: same test against a moto that ignores If-None-Match (a store without
        # conditional writes). Expect: both writers report success for the same version, one commit
        # silently overwritten -> lost rows. Proves the checks above would catch a broken store.
        from motoserver import moto_server
        with moto_server(no_conditional=True) as (endpoint, s3, so, pid):
            try:
                run_case("S3/moto-WITHOUT-conditional-put (negative control)", "s3://delta/t_nocond", so, None)
            except AssertionError as e:
                print("NEGATIVE CONTROL DETECTED CORRUPTION (expected):", e)
                from deltalake import DeltaTable
                d = DeltaTable("s3://delta/t_nocond", storage_options=so)
                print("  table version", d.version(), "rows", d.to_pyarrow_table().num_rows)
