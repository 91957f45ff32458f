"""Q4 (part 3): which storage_options does delta-rs 1.6 need for an S3-compatible endpoint over http?
Also: reading the S3 table from pyarrow dataset / polars / DuckDB."""
import os, json, time
import pyarrow as pa
from deltalake import DeltaTable, write_deltalake
from motoserver import moto_server

tbl = pa.table({"image_id": ["a", "b"], "label": pa.array([1, 2], pa.int32())})


def step(name, fn):
    print(f"\n--- {name}")
    t0 = time.time()
    try:
        r = fn()
        print(f"OK ({time.time()-t0:.1f}s)", "" if r is None else r)
    except Exception as e:
        print(f"ERROR ({time.time()-t0:.1f}s)", type(e).__name__, str(e).replace("\n", " ")[:300])


with moto_server() as (endpoint, s3, so, pid):
    def w(uri, opts):
        write_deltalake(uri, tbl, mode="append", storage_options=opts)
        return f"version={DeltaTable(uri, storage_options=opts).version()}"

    step("full options (endpoint, allow_http, region, key, secret)", lambda: w("s3://delta/full", so))
    step("without AWS_ALLOW_HTTP", lambda: w("s3://delta/nohttp", {k: v for k, v in so.items() if k != "AWS_ALLOW_HTTP"}))
    step("without AWS_REGION", lambda: w("s3://delta/noregion", {k: v for k, v in so.items() if k != "AWS_REGION"}))
    step("lower-case object_store keys (aws_endpoint, allow_http...)", lambda: w("s3://delta/lower", {
        "aws_endpoint": endpoint, "aws_allow_http": "true", "aws_region": "us-east-1",
        "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}))
    step("AWS_S3_LOCKING_PROVIDER=dynamodb (removed in 1.x; expect ignored + error log)",
         lambda: w("s3://delta/dynamo", dict(so, AWS_S3_LOCKING_PROVIDER="dynamodb")))
    step("conditional_put=etag (object_store key)", lambda: w("s3://delta/etag", dict(so, conditional_put="etag")))
    step("s3a:// scheme", lambda: w("s3a://delta/s3a", so))

    def via_env():
        old = dict(os.environ)
        os.environ.update(so)
        try:
            write_deltalake("s3://delta/env", tbl, mode="append")
            return f"version={DeltaTable('s3://delta/env').version()} (options from environment variables)"
        finally:
            os.environ.clear(); os.environ.update(old)
    step("no storage_options, everything in env vars", via_env)

    # ---- reading
    d = DeltaTable("s3://delta/full", storage_options=so)
    step("to_pyarrow_dataset() with no filesystem argument", lambda: d.to_pyarrow_dataset().to_table().num_rows)
    step("to_pyarrow_table()", lambda: d.to_pyarrow_table().num_rows)

    def duck():
        import duckdb
        con = duckdb.connect()
        con.register("labels", d.to_pyarrow_dataset())
        return con.execute("select count(*), sum(label) from labels").fetchall()
    step("DuckDB over to_pyarrow_dataset()", duck)

    def polars():
        import polars as pl
        return pl.read_delta("s3://delta/full", storage_options=so).shape
    step("polars.read_delta(s3://..., storage_options=so)", polars)

    def polars_scan():
        import polars as pl
        return pl.scan_delta("s3://delta/full", storage_options=so).select(pl.len()).collect().item()
    step("polars.scan_delta(...).select(pl.len())", polars_scan)
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="delta", Prefix="full/")["Contents"])
    print("\nobjects under s3://delta/full/:", keys)
