"""The commit protocol, leases, recovery, the reading patterns, and transient storage faults (no Ray needed).

Runs here are made of real Parquet files in the contract's schema, committed with the pipeline's own functions; the
S3 tests go through moto's server over HTTP, with the fault-injecting proxy in between where the test is about
faults.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timedelta, timezone

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline import runs
from pipeline.manifest import Counts, Manifest, ModelRecord
from pipeline.query import connect
from pipeline.runs import (
    Lease,
    OutputLocation,
    StagedFile,
    StagedOutput,
    commit,
    committed_files,
    lease_expired,
    read_manifests,
    recover,
    write_staged,
)
from pipeline.sink import output_schema
from pipeline.sources import Shard, list_shards, read_shard
from pipeline.storage import is_transient, with_retries
from tests.faults import FaultProxy
from tests.layouts import tar_shard

# The reading pattern the README documents for plain DuckDB: rows of committed runs only.
DUCKDB_PATTERN = """
SELECT p.* FROM read_parquet('{out}/predictions/*/*.parquet') p
WHERE p.run_id IN (SELECT run_id FROM read_json('{out}/_runs/*.json', columns = {{run_id: 'VARCHAR'}}))
"""


def rows(run_id: str, image_ids: list[str], status: str = "ok") -> pa.Table:
    schema = output_schema(4)
    now = datetime.now(timezone.utc)
    return pa.Table.from_pylist(
        [
            {
                "image_id": image_id,
                "source": image_id.split("#")[0],
                "status": status,
                "error": None if status == "ok" else "corrupt image data",
                "label": "tench" if status == "ok" else None,
                "class_id": 0 if status == "ok" else None,
                "score": 0.5 if status == "ok" else None,
                "top_k": [{"class_id": 0, "wnid": "n01440764", "label": "tench", "score": 0.5}]
                if status == "ok"
                else None,
                "embedding": [0.1, 0.2, 0.3, 0.4] if status == "ok" else None,
                "width": 8,
                "height": 8,
                "model": "resnet18",
                "model_fingerprint": "f" * 64,
                "run_id": run_id,
                "processed_at": now,
            }
            for image_id in image_ids
        ],
        schema,
    )


def stage(location: OutputLocation, run_id: str, tables: list[pa.Table]) -> list[StagedFile]:
    return [write_staged(location, run_id, f"part-{index}.parquet", table) for index, table in enumerate(tables)]


def commit_run(location: OutputLocation, run_id: str, tables: list[pa.Table], shards: list[dict] | None = None) -> str:
    staged = StagedOutput.of(stage(location, run_id, tables))
    if shards is None:
        sources = sorted({s for t in tables for s in t.column("source").to_pylist()})
        shards = [{"url": s, "format": "images", "size": 1, "etag": "e", "rows": 1, "partial": False} for s in sources]
    manifest = Manifest(run_id, ModelRecord("resnet18", "random"), counts=Counts(staged.rows, staged.ok, staged.error))
    return commit(location, run_id, staged, manifest, shards)


def visible_ids(out: str) -> dict[str, list[str]]:
    """What each documented reading pattern sees: the query views, committed_files + pyarrow, plain DuckDB SQL."""
    with connect(out) as db:
        query = sorted(r[0] for r in db.execute("SELECT image_id FROM predictions").fetchall())
    files = committed_files(out)
    arrow = sorted(ds.dataset(files, format="parquet").to_table().column("image_id").to_pylist()) if files else []
    try:
        plain = sorted(r[0] for r in duckdb.sql(DUCKDB_PATTERN.format(out=out)).fetchall())
    except duckdb.IOException:  # no file matches the globs yet
        plain = []
    return {"query": query, "pyarrow": arrow, "duckdb": plain}


def test_a_committed_run_is_visible_to_every_reading_pattern(tmp_path):
    out = str(tmp_path / "out")
    location = OutputLocation.open(out)
    manifest_url = commit_run(location, "run-a", [rows("run-a", ["/i/1.jpg", "/i/2.jpg"]), rows("run-a", ["/i/3.jpg"])])
    assert manifest_url.endswith("_runs/run-a.json")
    expected = ["/i/1.jpg", "/i/2.jpg", "/i/3.jpg"]
    assert visible_ids(out) == {"query": expected, "pyarrow": expected, "duckdb": expected}
    assert sorted(os.listdir(out)) == ["_runs", "predictions"]  # staging removed


def test_a_commit_cut_short_is_invisible_then_finished_by_the_next_run(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    location = OutputLocation.open(out)
    commit_run(location, "run-a", [rows("run-a", ["/i/1.jpg"])])

    real_write_json = runs.write_json

    def die_at_the_manifest(fs, path, document):
        if path.endswith("_runs/run-b.json"):
            raise KeyboardInterrupt("driver killed")  # the files are moved; the manifest is never written
        real_write_json(fs, path, document)

    monkeypatch.setattr(runs, "write_json", die_at_the_manifest)
    with pytest.raises(KeyboardInterrupt):
        commit_run(location, "run-b", [rows("run-b", ["/i/2.jpg", "/i/3.jpg"])])
    monkeypatch.setattr(runs, "write_json", real_write_json)

    assert os.listdir(f"{out}/predictions/run-run-b")  # the moved files are there...
    assert visible_ids(out) == {"query": ["/i/1.jpg"], "pyarrow": ["/i/1.jpg"], "duckdb": ["/i/1.jpg"]}  # ...unseen

    assert recover(location) == []  # it had decided its content: rolled forward, not offered for adoption
    assert [m.run_id for m in read_manifests(location)] == ["run-a", "run-b"]
    expected = ["/i/1.jpg", "/i/2.jpg", "/i/3.jpg"]
    assert visible_ids(out) == {"query": expected, "pyarrow": expected, "duckdb": expected}
    assert not os.path.exists(f"{out}/_staging")


def test_recovery_keeps_live_runs_offers_crashed_ones_and_removes_orphans(tmp_path):
    out = str(tmp_path / "out")
    location = OutputLocation.open(out)
    stage(location, "crashed", [rows("crashed", ["/i/1.jpg"])])
    runs.write_json(
        location.fs,
        location.path("_staging", "crashed", "_lease.json"),
        {"run_id": "crashed", "key": "k1", "host": socket.gethostname(), "pid": 2**22 + 17, "started_at": _ago(1)},
    )
    os.makedirs(f"{out}/predictions/run-orphan")  # files no manifest names and no live run is committing
    pq.write_table(rows("orphan", ["/i/9.jpg"]), f"{out}/predictions/run-orphan/part-00000.parquet")
    with Lease(location, "alive", "k1"):
        stage(location, "alive", [rows("alive", ["/i/2.jpg"])])
        crashed = recover(location)
        assert [(run.run_id, run.key) for run in crashed] == [("crashed", "k1")]
        assert os.path.exists(f"{out}/_staging/alive/part-0.parquet")  # never touched while its driver lives
    assert not os.path.exists(f"{out}/predictions/run-orphan")
    assert visible_ids(out)["query"] == []


def test_leases_expire_when_the_driver_is_gone_or_silent():
    here = socket.gethostname()
    assert not lease_expired({"host": here, "pid": os.getpid(), "started_at": _ago(1), "heartbeat_at": _ago(1)})
    assert lease_expired({"host": here, "pid": 2**22 + 17, "started_at": _ago(1), "heartbeat_at": _ago(1)})
    assert not lease_expired({"host": "elsewhere", "pid": 1, "started_at": _ago(60), "heartbeat_at": _ago(60)})
    assert lease_expired({"host": "elsewhere", "pid": 1, "started_at": _ago(900), "heartbeat_at": _ago(400)})
    assert lease_expired(None)


def test_a_run_left_by_an_exception_is_adoptable_by_a_rerun_in_the_same_process(tmp_path):
    """Ctrl-C in a notebook: the process (and its pid) lives on, yet the run it was doing is over."""
    location = OutputLocation.open(str(tmp_path / "out"))
    with pytest.raises(KeyboardInterrupt), Lease(location, "stopped", "k1"):
        stage(location, "stopped", [rows("stopped", ["/i/1.jpg"])])
        raise KeyboardInterrupt
    assert [(run.run_id, run.key) for run in recover(location)] == [("stopped", "k1")]
    with Lease(location, "finished", "k1"):
        stage(location, "finished", [rows("finished", ["/i/2.jpg"])])
    assert "finished" not in [run.run_id for run in recover(location)]  # a lease ends by its exception only


def test_latest_view_takes_the_newest_row_per_image_and_a_whole_reread_replaces_a_shard(tmp_path):
    out = str(tmp_path / "out")
    location = OutputLocation.open(out)
    tar = "/in/shard-0.tar"
    whole = {"url": tar, "format": "webdataset", "size": 10, "etag": "v1", "rows": 3, "partial": False}
    commit_run(
        location, "r1", [rows("r1", [f"{tar}#a.jpg", f"{tar}#b.jpg"]), rows("r1", [f"{tar}#c.jpg"], "error")], [whole]
    )
    retry = {**whole, "rows": 1, "partial": True}
    commit_run(location, "r2", [rows("r2", [f"{tar}#c.jpg"])], [retry])  # retried: c is fine now
    with connect(out) as db:
        latest = dict(db.execute("SELECT image_id, run_id FROM latest").fetchall())
        assert latest == {f"{tar}#a.jpg": "r1", f"{tar}#b.jpg": "r1", f"{tar}#c.jpg": "r2"}
        assert db.execute("SELECT count(*) FROM errors").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM predictions").fetchone() == (4,)  # history stays
    rewritten = {**whole, "etag": "v2", "rows": 2}  # the shard changed: b is gone, d is new
    commit_run(location, "r3", [rows("r3", [f"{tar}#a.jpg", f"{tar}#d.jpg"])], [rewritten])
    with connect(out) as db:
        latest = dict(db.execute("SELECT image_id, run_id FROM latest").fetchall())
        assert latest == {f"{tar}#a.jpg": "r3", f"{tar}#d.jpg": "r3"}
        modes = db.execute("SELECT run_id, seq, rows FROM runs ORDER BY seq").fetchall()
        assert [m[0] for m in modes] == ["r1", "r2", "r3"]


def test_transient_errors_are_told_from_permanent_ones(s3, monkeypatch):
    monkeypatch.setattr("s3fs.S3FileSystem.retries", 1)
    fs, bucket, storage_options = s3
    fs.pipe_file(f"{bucket}/x.jpg", b"data")
    with FaultProxy(storage_options["endpoint_url"], slow_down=1.0) as proxy:
        flaky = fsspec.filesystem(
            "s3",
            endpoint_url=proxy.endpoint,
            config_kwargs={"retries": {"max_attempts": 1}},
            skip_instance_cache=True,
        )
        with pytest.raises(Exception) as slow_down:
            flaky.cat_file(f"{bucket}/x.jpg")
        assert is_transient(slow_down.value), repr(slow_down.value)
        proxy.enabled = False
        with pytest.raises(FileNotFoundError) as missing:
            flaky.cat_file(f"{bucket}/missing.jpg")
        assert not is_transient(missing.value)
        calls = []
        with pytest.raises(ValueError):
            with_retries(lambda: calls.append(1) or int("not a number"))
        assert len(calls) == 1  # a permanent error is not retried


def test_a_shard_read_through_dropped_connections_loses_and_repeats_nothing(s3, monkeypatch):
    """s3fs and botocore retries are turned off, so the pipeline's own retry does all the work here."""
    monkeypatch.setattr("pipeline.storage.BASE_DELAY", 0.01)
    monkeypatch.setattr("s3fs.S3FileSystem.retries", 1)
    fs, bucket, storage_options = s3
    names = [f"{i:02d}.jpg" for i in range(12)]
    fs.pipe_file(f"{bucket}/in/shard.tar", tar_shard([(name, name.encode() * 500) for name in names]))
    for name in names[:4]:
        fs.pipe_file(f"{bucket}/in/files/{name}", name.encode())
    with FaultProxy(storage_options["endpoint_url"], slow_down=0.15, drop_before=0.1, drop_after=0.1, seed=7) as proxy:
        options = {
            "endpoint_url": proxy.endpoint,
            "config_kwargs": {"retries": {"max_attempts": 1}},
            "default_block_size": 2048,  # many range requests per tar: many chances to fail mid-stream
            "skip_instance_cache": True,
        }
        (tar,) = list_shards(f"s3://{bucket}/in/", "webdataset", options)
        records = list(read_shard(tar, {"storage_options": options}))
        files = [
            r
            for s in list_shards(f"s3://{bucket}/in/files/", "images", options)
            for r in read_shard(s, {"storage_options": options})
        ]
    assert proxy.counts["slow_down"] and proxy.counts["drop_before"] and proxy.counts["drop_after"], proxy.counts
    assert [r.error for r in records + files] == [None] * 16
    assert [r.image_id.rsplit("#", 1)[1] for r in records] == names
    assert all(r.data == r.image_id.rsplit("#", 1)[1].encode() * 500 for r in records)


def test_only_the_wanted_images_are_read_again(tmp_path):
    names = [f"{i}.jpg" for i in range(5)]
    path = tmp_path / "shard.tar"
    path.write_bytes(tar_shard([(name, b"x") for name in names]))
    shard = Shard(str(path), "webdataset")
    wanted = {f"{path}#1.jpg", f"{path}#3.jpg"}
    assert [r.image_id for r in read_shard(shard, {}, only=wanted)] == sorted(wanted)


def test_a_permanently_unreadable_shard_is_one_error_row_with_the_reason(s3):
    _, bucket, storage_options = s3
    shard = Shard(f"s3://{bucket}/gone.tar", "webdataset")
    (record,) = read_shard(shard, {"storage_options": storage_options})
    assert record.image_id == f"s3://{bucket}/gone.tar#unreadable"
    assert record.error.startswith("unreadable shard: FileNotFoundError")
    (image,) = read_shard(Shard(f"s3://{bucket}/gone.jpg", "images"), {"storage_options": storage_options})
    assert image.image_id == f"s3://{bucket}/gone.jpg" and image.error.startswith("unreadable file")


def _ago(seconds: float) -> str:
    return (datetime.now(timezone.utc) - timedelta(seconds=seconds)).isoformat()


def test_manifests_are_written_whole(tmp_path):
    location = OutputLocation.open(str(tmp_path))
    runs.write_json(location.fs, location.path("_runs", "x.json"), {"run_id": "x"})
    assert json.loads((tmp_path / "_runs" / "x.json").read_text()) == {"run_id": "x"}
    assert os.listdir(tmp_path / "_runs") == ["x.json"]  # no temporary file left beside it
