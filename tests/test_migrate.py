"""``resnet-pipeline migrate``: outputs written by the code before Delta Lake, converted to the Delta tables.

The old outputs are written by the old code itself: the ``pipeline`` package of commit 93b46f9 (the last before
Delta Lake), taken out of git into a temporary folder and run in a subprocess, which also computes the old query
views (its ``latest`` among them) before anything is migrated. The migrated output must give the same rows.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline import tables
from pipeline.cli import app
from pipeline.migrate import migrate
from pipeline.query import connect
from pipeline.runs import OutputLocation
from pipeline.tables import LegacyOutputError

REPO = Path(__file__).resolve().parents[1]
LEGACY_COMMIT = "93b46f9"  # the last commit whose outputs were manifests and plain Parquet files

A, B, C, D = (f"2026110{day}T000000Z-{letter * 6}" for day, letter in zip("1234", "abcd", strict=True))

# Run by the old code (PYTHONPATH: the old package): writes an old output, prints its query views as JSON.
BUILDER = r"""
import json, sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

import pipeline
from pipeline import runs
from pipeline.manifest import Counts, Manifest, ModelRecord, PlanSummary
from pipeline.query import connect
from pipeline.runs import OutputLocation, StagedOutput, commit, committed_paths, read_manifests, write_staged
from pipeline.sink import output_schema

assert Path(pipeline.__file__).is_relative_to(Path(__file__).parent), pipeline.__file__  # the old code, not ours
scenario, options, result = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
urls = sys.argv[4:]
T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
A, B, C, D = (f"2026110{day}T000000Z-{letter * 6}" for day, letter in zip("1234", "abcd"))


def shard(name):
    return f"file:///images/{name}.tar"


def rows(run_id, day, images, errors=(), float16=False):
    records = []
    for n, (name, index) in enumerate(images):
        ok = (name, index) not in errors
        records.append({
            "image_id": f"{shard(name)}#{index}", "source": shard(name), "status": "ok" if ok else "error",
            "error": None if ok else "corrupt image data", "label": "tench" if ok else None,
            "class_id": 0 if ok else None, "score": 0.5 + day / 100 if ok else None,
            "top_k": [{"class_id": 0, "wnid": "n01440764", "label": "tench", "score": 0.5}] if ok else None,
            "embedding": [0.1 * (index + 1) + 0.01 * day + 0.3 * k for k in range(4)] if ok else None,
            "width": 8, "height": 8, "model": "resnet18", "model_fingerprint": "f" * 64, "run_id": run_id,
            "processed_at": T0 + timedelta(days=day, seconds=n),
        })
    schema = output_schema(4)
    table = pa.Table.from_pylist(records, schema)
    if float16:  # as the code before float16 meant rounded float32 wrote it: Parquet FLOAT16 values
        at = schema.get_field_index("embedding")
        table = table.cast(schema.set(at, pa.field("embedding", pa.list_(pa.float16(), 4))))
    return table


def shards(*entries):
    return [{"url": shard(name), "format": "tar", "size": 1000, "etag": etag, "rows": count, "partial": partial}
            for name, etag, count, partial in entries]


def run(location, run_id, day, mode, files, shard_rows, **plan):
    staged = StagedOutput.of(write_staged(location, run_id, f"{i:05d}.parquet", t) for i, t in enumerate(files))
    model = ModelRecord("resnet18", "random", random_weights=True, seed=0, key="work-key", fingerprint="f" * 64)
    manifest = Manifest(
        run_id=run_id, model=model, plan=PlanSummary(mode=mode, **plan), spec={"name": "legacy"},
        counts=Counts(staged.rows, staged.ok, staged.error), started_at=(T0 + timedelta(days=day)).isoformat(),
        finished_at=(T0 + timedelta(days=day, minutes=1)).isoformat(),
    )
    commit(location, run_id, staged, manifest, shard_rows)


def first(location):  # full: three shards, one image failed
    files = [
        rows(A, 1, [("s1", 0), ("s1", 1), ("s1", 2)]),
        rows(A, 1, [("s2", 0), ("s2", 1), ("s3", 0), ("s3", 1)], errors={("s3", 0)}),
    ]
    read = shards(("s1", "e1", 3, False), ("s2", "e1", 2, False), ("s3", "e1", 2, False))
    run(location, A, 1, "full", files, read, listed=3, to_read=3)


def rewrite(location, run_id):  # incremental: shard s2 changed (image 1 gone, image 2 new), read whole again
    files, read = [rows(run_id, 2, [("s2", 0), ("s2", 2)])], shards(("s2", "e2", 2, False))
    run(location, run_id, 2, "incremental", files, read, listed=3, to_read=1, skipped_unchanged=2)


def views(location):
    db = connect(location)
    def query(sql):
        return json.loads(json.dumps(db.sql(sql).to_arrow_table().to_pylist(), default=str))
    return {
        "predictions": query("SELECT * FROM predictions ORDER BY run_id, image_id"),
        "latest": query("SELECT * FROM latest ORDER BY image_id"),
        "runs": query("SELECT run_id, mode, rows, ok, error, work_key, committed_at FROM runs ORDER BY seq"),
        "shards": query("SELECT run_id, url, etag, rows, partial FROM shards ORDER BY run_id, url"),
    }


location = OutputLocation.open(urls[0], options)
if scenario == "history":
    first(location)
    rewrite(location, B)
    # retry-failed: only the failed image of s3 read again (a partial shard), now fine
    run(location, C, 3, "retry-failed", [rows(C, 3, [("s3", 0)])], shards(("s3", "e1", 1, True)), listed=3, to_read=1)
    found = views(location)
elif scenario == "died-in-commit":  # the driver of the second run died inside its commit, after its intent
    replica = OutputLocation.open(urls[1], options)
    for output in (location, replica):
        first(output)
    rewrite(replica, D)
    def die(location, intent):
        raise RuntimeError("the driver died here")
    runs.finish_commit = die
    try:
        rewrite(location, D)
    except RuntimeError:
        pass
    found = views(replica)  # as the old code saw it once its next run had rolled the commit forward
elif scenario == "float16":
    files = [rows(A, 1, [("s1", 0), ("s1", 1), ("s1", 2)], errors={("s1", 1)}, float16=True)]
    run(location, A, 1, "full", files, shards(("s1", "e1", 3, False)))
    run(location, B, 2, "incremental", [rows(B, 2, [("s2", 0), ("s2", 1)])], shards(("s2", "e1", 2, False)))
    # DuckDB reads no FLOAT16: the old views cannot be built; the rows are the files' own, float16 read as float32
    tables = []
    for path in committed_paths(location, read_manifests(location)):
        table = pq.read_table(path)
        at = table.schema.get_field_index("embedding")
        tables.append(table.set_column(at, "embedding", table.column(at).cast(pa.list_(pa.float32()))))
    found = {"predictions": json.loads(json.dumps(pa.concat_tables(tables).to_pylist(), default=str))}
Path(result).write_text(json.dumps(found))
"""


@pytest.fixture(scope="session")
def legacy(tmp_path_factory) -> Path:
    """The old ``pipeline`` package, out of git, with the builder above beside it."""
    root = tmp_path_factory.mktemp("legacy")
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", LEGACY_COMMIT, "pipeline"], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root, filter="data")
    (root / "build.py").write_text(BUILDER)
    return root


def build(legacy: Path, scenario: str, *urls: str, options: dict | None = None) -> dict:
    """An old output written by the old code; returns its views as the old code computed them."""
    result = legacy / f"{scenario}-{time.monotonic_ns()}.json"
    process = subprocess.run(
        [sys.executable, str(legacy / "build.py"), scenario, json.dumps(options or {}), str(result), *urls],
        cwd=legacy,
        env={**os.environ, "PYTHONPATH": str(legacy)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    return json.loads(result.read_text())


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def views(output: str | OutputLocation) -> dict:
    db = connect(output)

    def query(sql: str) -> list[dict]:
        return normal(json.loads(json.dumps(db.sql(sql).to_arrow_table().to_pylist(), default=str)))

    return {
        "predictions": query("SELECT * FROM predictions ORDER BY run_id, image_id"),
        "latest": query("SELECT * FROM latest ORDER BY image_id"),
        "runs": query("SELECT run_id, mode, rows, ok, error, work_key, committed_at FROM runs ORDER BY seq"),
        "shards": query("SELECT run_id, url, etag, rows, partial FROM shards ORDER BY run_id, url"),
    }


def normal(rows: list[dict]) -> list[dict]:
    """Timestamps as one string whatever time zone a reader gave them in."""
    for row in rows:
        if row.get("processed_at"):
            row["processed_at"] = datetime.fromisoformat(row["processed_at"]).astimezone(timezone.utc).isoformat()
    return rows


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def pairs(rows: list[dict]) -> list[tuple[str, str]]:
    return [(row["image_id"].rsplit("/", 1)[-1], row["run_id"][-6:]) for row in rows]


def assert_migrated(output: str | OutputLocation, old: dict) -> None:
    """The Delta tables give what the old views gave, and nothing of the old format is left."""
    new = views(output)
    for name in ("predictions", "latest", "runs", "shards"):
        assert new[name] == normal(old[name]), name
    location = output if isinstance(output, OutputLocation) else OutputLocation.open(output)
    everything = location.find(location.root)
    assert not [p for p in everything if "/_runs/" in p or "/_staging/" in p]
    data = {
        p[len(location.path("predictions")) + 1 :]
        for p in everything
        if p.endswith(".parquet") and "/predictions/" in p
    }
    committed = tables.open_table(location, "predictions").get_add_actions(flatten=True).column("path").to_pylist()
    assert data == set(committed) and all("/migrated-" in path for path in data)  # no old part file left
    tables.check_format(location)


def test_migrate_gives_the_old_views_and_resumes_when_cut_short(legacy, tmp_path):
    out = tmp_path / "out"
    old = build(legacy, "history", str(out))
    # what the old latest view said: s2 read whole again by B (image 1 gone), s3#0 retried by C, the rest A's
    assert pairs(old["latest"]) == [
        ("s1.tar#0", "aaaaaa"),
        ("s1.tar#1", "aaaaaa"),
        ("s1.tar#2", "aaaaaa"),
        ("s2.tar#0", "bbbbbb"),
        ("s2.tar#2", "bbbbbb"),
        ("s3.tar#0", "cccccc"),
        ("s3.tar#1", "aaaaaa"),
    ]
    old_parts = sorted(str(p.relative_to(out)) for p in out.rglob("part-*.parquet"))
    assert len(old_parts) == 4 and all(p.startswith("predictions/run-") for p in old_parts)

    # Before: the new code refuses the old output in one line that says what to do.
    with pytest.raises(LegacyOutputError, match=f"resnet-pipeline migrate (file://)?{out}$") as refused:
        connect(str(out))
    assert "\n" not in str(refused.value)
    for command in (["query", str(out), "SELECT 1"], ["retry-failed", str(out)]):
        result = cli(*command)
        assert result.exit_code == 2 and "resnet-pipeline migrate" in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr

    before = files(out)
    dry = cli("migrate", str(out), "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "Dry run" in dry.stdout and "3 would commit" in dry.stdout and "rows     10" in dry.stdout, dry.stdout
    assert files(out) == before  # nothing written, nothing removed

    # Cut short: run B's data file cannot be read. A is committed, B and C are left as they were.
    b_part = out / next(p for p in old_parts if B in p)
    good = b_part.read_bytes()
    b_part.write_bytes(b"not parquet")
    stopped = cli("migrate", str(out))
    assert stopped.exit_code == 1 and B in stopped.stderr, stopped.output
    assert len(list((out / "_runs").glob("*.json"))) == 3  # the old manifests stay until every run is committed
    assert all((out / p).exists() for p in old_parts if A not in p)
    committed = tables.dataset(OutputLocation.open(str(out)), "runs").to_table().column("run_id").to_pylist()
    assert committed == [A]

    # Cut short again, after B's commit began (its intent written): the shards table takes no commit.
    b_part.write_bytes(good)
    location = OutputLocation.open(str(out))
    block = out / "shards" / "_delta_log" / f"{tables.open_table(location, 'shards').version() + 1:020d}.json"
    block.mkdir()  # where the next commit's log entry goes
    stopped = cli("migrate", str(out))
    assert stopped.exit_code == 1 and "run it again to resume" in stopped.stderr, stopped.output
    assert json.loads((out / "_staging" / B / "_commit.json").read_text())["manifest"]["run_id"] == B
    assert tables.dataset(location, "runs").to_table().column("run_id").to_pylist() == [A]
    assert len(list((out / "_runs").glob("*.json"))) == 3

    block.rmdir()
    dry = cli("migrate", str(out), "--dry-run")
    assert f"run {B}: would finish its commit cut short" in dry.stdout, dry.stdout
    done = cli("migrate", str(out))
    assert done.exit_code == 0, done.output
    assert "1 committed to the Delta tables, 1 cut short and finished, 1 committed before" in done.stdout
    assert_migrated(str(out), old)

    import polars as pl

    assert pl.read_delta(str(out / "predictions")).height == len(old["predictions"])
    latest = pl.read_delta(str(out / "latest")).sort("image_id")
    assert pairs(latest.select("image_id", "run_id").to_dicts()) == pairs(old["latest"])
    assert pl.read_delta(str(out / "predictions")).schema["embedding"] == pl.List(pl.Float32)

    # Once more: nothing to do, and nothing done.
    versions = {name: tables.open_table(OutputLocation.open(str(out)), name).version() for name in tables.TABLES}
    again = cli("migrate", str(out))
    assert again.exit_code == 0 and "already a Delta Lake output" in again.stdout, again.output
    assert versions == {name: tables.open_table(OutputLocation.open(str(out)), name).version() for name in versions}


def test_a_commit_the_old_code_left_half_done_is_rolled_forward(legacy, tmp_path):
    out, replica = tmp_path / "out", tmp_path / "replica"
    old = build(legacy, "died-in-commit", str(out), str(replica))
    assert len(list((out / "_runs").glob("*.json"))) == 1 and (out / "_staging" / D / "_commit.json").exists()
    result = cli("migrate", str(out))
    assert result.exit_code == 0, result.output
    new = views(str(out))
    for rows in (new["runs"], old["runs"]):  # committed_at: when each copy was committed
        for row in rows:
            row.pop("committed_at")
    assert [row["run_id"] for row in new["runs"]] == [A, D]
    for name in ("predictions", "latest", "runs", "shards"):
        assert new[name] == normal(old[name]), name
    assert not (out / "_staging").exists() and not (out / "_runs").exists()


def test_float16_embeddings_become_float32_values(legacy, tmp_path):
    out = tmp_path / "out"
    old = build(legacy, "float16", str(out))
    (first_file,) = (out / "predictions" / f"run-{A}").glob("part-*.parquet")
    assert pa.types.is_float16(pq.read_schema(first_file).field("embedding").type.value_type)  # Parquet FLOAT16
    result = cli("migrate", str(out))
    assert result.exit_code == 0, result.output
    new = views(str(out))
    assert new["predictions"] == normal(old["predictions"])
    assert [row["run_id"] for row in new["latest"]] == [A, A, A, B, B]
    first = next(row for row in new["predictions"] if row["run_id"] == A and row["embedding"])
    values = np.array(first["embedding"], np.float32)
    assert np.array_equal(values, values.astype(np.float16).astype(np.float32))  # half precision, as float32
    (data,) = (out / "predictions" / f"run_id={A}").glob("*.parquet")
    assert pq.read_schema(data).field("embedding").type == pa.list_(pa.float32())


def test_not_an_output(tmp_path):
    (tmp_path / "something").mkdir()
    (tmp_path / "something" / "file.txt").write_text("hello")
    for path in (tmp_path / "something", tmp_path / "missing"):
        result = cli("migrate", str(path))
        assert result.exit_code == 2 and "not a resnet-pipeline output" in result.stderr, result.output
    assert not (tmp_path / "missing").exists()


def test_migrate_on_s3(legacy, s3):
    fs, bucket, options = s3
    url = f"s3://{bucket}/out"
    old = build(legacy, "history", url, options=options)
    location = OutputLocation.open(url, options)
    with pytest.raises(LegacyOutputError):
        connect(location)
    summary = migrate(location)
    assert summary.migrated == [A, B, C] and summary.removed == 4 + 3 + 3  # part files, shards files, manifests
    assert_migrated(location, old)
    assert summary.bytes_after == sum(fs.size(p) for p in fs.find(f"{bucket}/out/predictions") if "/run_id=" in p)
