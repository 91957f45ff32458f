"""The Delta commit protocol, leases, recovery, adoption, ``latest``, and transient storage faults (no Ray needed).

Runs here are made of real Parquet data files in the output schema, written with ``runs.write_data_file`` and
committed with ``tables.commit`` onto real Delta tables (delta-rs); they are read back the ways a user reads them:
``deltalake.DeltaTable``, ``polars.read_delta``, DuckDB over the Arrow dataset, and the ``pipeline.query`` views.
The S3 tests go through moto's server over HTTP, with the fault-injecting proxy in between where the test is about
faults.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from pipeline import runs, tables
from pipeline.incremental import Plan, adopt, adoptable
from pipeline.manifest import Counts, Manifest, ModelRecord
from pipeline.query import connect
from pipeline.runs import (
    LATEST,
    PREDICTIONS,
    SHARDS,
    TABLES,
    Lease,
    OutputLocation,
    StagedFile,
    StagedOutput,
    lease_expired,
    read_intent,
    record_progress,
    write_data_file,
)
from pipeline.sink import output_schema
from pipeline.sources import Shard, ShardRead, ShardReads, list_shards, read_shard
from pipeline.storage import is_transient, with_retries, write_json
from pipeline.tables import RUN_KEY, AdoptionLost, CrashedRun, commit, ensure_tables, finish_commit, recover
from tests.faults import FaultProxy, FaultProxyProcess, FirstTry
from tests.layouts import tar_shard

DEAD_PID = 2**22 + 17  # above Linux's largest pid: no process has it


def rows(run_id: str, image_ids: list[str], status: str = "ok") -> pa.Table:
    """Rows of the output schema, one per image (``source``: the image id up to ``#``)."""
    now = datetime.now(timezone.utc)
    ok = status == "ok"
    return pa.Table.from_pylist(
        [
            {
                "image_id": image_id,
                "source": image_id.split("#")[0],
                "status": status,
                "error": None if ok else "corrupt image data",
                "label": "tench" if ok else None,
                "class_id": 0 if ok else None,
                "score": 0.5 if ok else None,
                "top_k": [{"class_id": 0, "wnid": "n01440764", "label": "tench", "score": 0.5}] if ok else None,
                "embedding": [0.1, 0.2, 0.3, 0.4] if ok else None,
                "width": 8,
                "height": 8,
                "model": "resnet18",
                "model_fingerprint": "f" * 64,
                "run_id": run_id,
                "processed_at": now,
            }
            for image_id in image_ids
        ],
        output_schema(),
    )


def stage(location: OutputLocation, run_id: str, parts: list[pa.Table]) -> list[StagedFile]:
    """The run's data files (predictions/run_id=<run>/part-NNNNN.parquet) and their staging records."""
    return [write_data_file(location, run_id, f"part-{index:05d}.parquet", part) for index, part in enumerate(parts)]


def whole_shards(parts: list[pa.Table]) -> list[dict]:
    """A shards record (read whole) for every source in the rows, with its row count."""
    counts = Counter(s for part in parts for s in part.column("source").to_pylist())
    return [shard_record(url, rows=n) for url, n in sorted(counts.items())]


def shard_record(url: str, rows: int, etag: str = "e1", partial: bool = False, key: str = "k1") -> dict:
    return {"url": url, "format": "webdataset", "size": 100, "etag": etag, "rows": rows, "partial": partial,
            "work_key": key}  # fmt: skip


def manifest_of(run_id: str, staged: StagedOutput, key: str = "k1") -> Manifest:
    return Manifest(
        run_id, ModelRecord("resnet18", "random", key=key), counts=Counts(staged.rows, staged.ok, staged.error)
    )


def commit_run(
    location: OutputLocation,
    run_id: str,
    parts: list[pa.Table],
    shards: list[dict] | None = None,
    adopted: list[StagedFile] = (),
    **kwargs,
) -> int:
    """Write a run's data files and commit them (with ``adopted`` files of a crashed run); returns the version."""
    ensure_tables(location)
    staged = StagedOutput.of([*adopted, *stage(location, run_id, parts)])
    shards = whole_shards(parts) if shards is None else shards
    return commit(location, run_id, staged, manifest_of(run_id, staged), shards, **kwargs)


def dead_lease(location: OutputLocation, run_id: str, key: str = "k1") -> None:
    """The lease a driver on this host left when it was killed: its process is gone."""
    started = _ago(5)
    write_json(
        location.fs,
        location.staging(run_id, "_lease.json"),
        {"run_id": run_id, "key": key, "host": socket.gethostname(), "pid": DEAD_PID, "started_at": started,
         "heartbeat_at": started},
    )  # fmt: skip


def table_uri(location: OutputLocation, name: str = PREDICTIONS) -> str:
    return location.table(name)


def delta(location: OutputLocation, name: str = PREDICTIONS, version: int | None = None) -> DeltaTable:
    return DeltaTable(table_uri(location, name), version=version, storage_options=location.delta_options or None)


def pairs(table: pa.Table) -> list[tuple[str, str]]:
    return sorted(zip(table.column("image_id").to_pylist(), table.column("run_id").to_pylist(), strict=True))


def visible(location: OutputLocation, version: int | None = None) -> dict[str, list]:
    """(image_id, run_id) of every predictions row, as each reader sees it (as of ``version``: all but the views).

    polars reads through pyarrow (``use_pyarrow``): its own Delta reader takes partition values from hive-style paths,
    not from the log (test_polars_native_reader_takes_the_run_id_from_the_log), so of it only the image ids count.
    """
    import polars as pl

    seen: dict[str, list] = {"deltalake": pairs(delta(location, version=version).to_pyarrow_table())}
    options = location.delta_options or None
    frame = pl.read_delta(table_uri(location), version=version, storage_options=options, use_pyarrow=True)
    seen["polars"] = sorted(zip(frame["image_id"].to_list(), frame["run_id"].to_list(), strict=True))
    native = pl.read_delta(table_uri(location), version=version, storage_options=options)
    seen["polars (own reader): images"] = sorted(native["image_id"].to_list())
    with duckdb.connect() as db:
        db.register("p", delta(location, version=version).to_pyarrow_dataset())
        seen["duckdb"] = sorted(db.execute("SELECT image_id, run_id FROM p").fetchall())
    if version is None:
        with connect(location) as db:
            seen["views"] = sorted(db.execute("SELECT image_id, run_id FROM predictions").fetchall())
    return seen


def everywhere(expected: list[tuple[str, str]], views: bool = True) -> dict[str, list]:
    readers = ["deltalake", "polars", "duckdb", *(["views"] if views else [])]
    return {
        **{reader: sorted(expected) for reader in readers},
        "polars (own reader): images": sorted(image for image, _ in expected),
    }


def run_commits(location: OutputLocation, name: str, run_id: str) -> list[int]:
    """The versions of ``name``'s commits that belong to ``run_id`` (its commit metadata says so)."""
    return commits_per_run(location, name).get(run_id, [])


def commits_per_run(location: OutputLocation, name: str) -> dict[str, list[int]]:
    """Run id -> the versions of ``name``'s commits that belong to it (read when nobody commits)."""
    commits: dict[str, list[int]] = {}
    for entry in delta(location, name).history():
        if RUN_KEY in entry:
            commits.setdefault(entry[RUN_KEY], []).append(entry["version"])
    return {run_id: sorted(versions) for run_id, versions in commits.items()}


def view(location: OutputLocation, sql: str) -> list[tuple]:
    with connect(location) as db:
        return db.execute(sql).fetchall()


def staging_left(location: OutputLocation) -> list[str]:
    return location.list(location.path("_staging"))


def data_files(location: OutputLocation) -> list[str]:
    """Every Parquet file under predictions/run_id=*/, relative to the table."""
    root = location.path(PREDICTIONS)
    return sorted(p[len(root) + 1 :] for p in location.find(root, ".parquet") if "/run_id=" in p)


def committed_paths(location: OutputLocation) -> dict[str, str]:
    """Path of each data file the predictions table holds -> the run id its commit gave it."""
    actions = pa.table(delta(location).get_add_actions(flatten=True))
    return dict(zip(actions.column("path").to_pylist(), actions.column("partition.run_id").to_pylist(), strict=True))


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> OutputLocation:
    if request.param == "local":
        return OutputLocation.open(str(tmp_path / "out"))
    _, bucket, storage_options = request.getfixturevalue("s3")
    return OutputLocation.open(f"s3://{bucket}/out", storage_options)


# --- 1. a committed run, as every reader sees it ---


def test_a_committed_run_is_visible_to_every_reader_with_its_run_id_from_the_partition(output):
    location = output
    parts = [rows("run-a", ["/i/1.jpg", "/i/2.jpg"]), rows("run-a", ["/i/3.jpg"], "error")]
    version = commit_run(location, "run-a", parts)
    assert version == 1  # the create, then this run's one commit

    expected = [(f"/i/{i}.jpg", "run-a") for i in (1, 2, 3)]
    assert visible(location) == everywhere(expected)
    # The files hold no run_id: the readers above took it from the commit's partition value.
    for path in data_files(location):
        with location.fs.open(location.path(PREDICTIONS, path), "rb") as f:
            assert "run_id" not in pq.read_schema(f).names
    assert committed_paths(location) == {
        "run_id=run-a/part-00000.parquet": "run-a",
        "run_id=run-a/part-00001.parquet": "run-a",
    }
    assert run_commits(location, PREDICTIONS, "run-a") == [version]

    assert view(location, "SELECT seq, run_id, version, rows, ok, error FROM runs") == [(1, "run-a", 1, 3, 2, 1)]
    assert view(location, "SELECT url, rows, partial FROM shards ORDER BY url") == [
        (f"/i/{i}.jpg", 1, False) for i in (1, 2, 3)
    ]
    assert sorted(view(location, "SELECT image_id, status FROM latest")) == [
        ("/i/1.jpg", "ok"), ("/i/2.jpg", "ok"), ("/i/3.jpg", "error")
    ]  # fmt: skip
    assert view(location, "SELECT image_id FROM errors") == [("/i/3.jpg",)]
    (manifest,) = tables.read_manifests(location)
    assert (manifest.run_id, manifest.version, manifest.counts) == ("run-a", 1, Counts(3, 2, 1))
    assert staging_left(location) == []  # intent, records and lease folder removed


# --- 2. a driver killed at each step of the commit ---

# (function of pipeline.tables, killed before or after it runs, is the predictions commit done by then)
KILL_POINTS = {
    "after the intent is written": ("finish_commit", "before", False),
    "after the shards append": ("_commit_predictions", "before", False),
    "after the predictions commit": ("_commit_predictions", "after", True),
    "before latest is caught up": ("catch_up_latest", "before", True),
    "before staging is removed": ("discard", "before", True),
}


def kill_at(monkeypatch, name: str, when: str):
    """Make ``pipeline.tables.<name>`` kill the driver (KeyboardInterrupt) before or after it runs; returns it."""
    real = getattr(tables, name)

    def killed(*args, **kwargs):
        if when == "after":
            real(*args, **kwargs)
        raise KeyboardInterrupt(f"driver killed {when} {name}")

    monkeypatch.setattr(tables, name, killed)
    return real


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_driver_killed_during_its_commit_is_invisible_until_the_predictions_commit_and_rolled_forward(
    tmp_path, monkeypatch, point
):
    name, when, committed = KILL_POINTS[point]
    location = OutputLocation.open(str(tmp_path / "out"))
    commit_run(location, "r1", [rows("r1", ["/i/1.jpg"])])
    r2 = [rows("r2", ["/i/1.jpg", "/i/2.jpg"], "error"), rows("r2", ["/i/3.jpg"])]

    real = kill_at(monkeypatch, name, when)
    with pytest.raises(KeyboardInterrupt), Lease(location, "r2", "k1"):
        commit_run(location, "r2", r2)
    monkeypatch.setattr(tables, name, real)
    # Lease.__exit__ said the run ended: recovery treats the driver as dead.
    assert lease_expired(runs.read_lease(location, "r2"))
    assert read_intent(location, "r2") is not None
    assert data_files(location) == [
        "run_id=r1/part-00000.parquet",
        "run_id=r2/part-00000.parquet",
        "run_id=r2/part-00001.parquet",
    ]

    before = [("/i/1.jpg", "r1")]
    after = [*before, ("/i/1.jpg", "r2"), ("/i/2.jpg", "r2"), ("/i/3.jpg", "r2")]
    assert visible(location) == everywhere(after if committed else before)
    if not committed:
        assert run_commits(location, PREDICTIONS, "r2") == []
        shard_rows = tables.dataset(location, SHARDS).to_table().column("run_id").to_pylist()
        assert shard_rows.count("r2") == (3 if name == "_commit_predictions" else 0)  # appended, yet...
        assert view(location, "SELECT DISTINCT run_id FROM shards") == [("r1",)]  # ...not read as committed
        assert view(location, "SELECT run_id FROM runs") == [("r1",)]
        assert view(location, "SELECT image_id, run_id FROM latest") == [("/i/1.jpg", "r1")]

    assert recover(location) == []  # it had decided its content: rolled forward, not offered for adoption

    assert visible(location) == everywhere(after)
    assert view(location, "SELECT run_id, version FROM runs ORDER BY seq") == [("r1", 1), ("r2", 2)]
    assert sorted(view(location, "SELECT image_id, run_id, status FROM latest")) == [
        ("/i/1.jpg", "r2", "error"), ("/i/2.jpg", "r2", "error"), ("/i/3.jpg", "r2", "ok")
    ]  # fmt: skip
    assert sorted(view(location, "SELECT url, run_id FROM shards WHERE run_id = 'r2'")) == [
        (f"/i/{i}.jpg", "r2") for i in (1, 2, 3)
    ]
    for table in TABLES:  # each step done exactly once
        assert len(run_commits(location, table, "r2")) == 1, table
    assert run_commits(location, PREDICTIONS, "r2") == [2]
    assert staging_left(location) == []
    assert recover(location) == []  # and nothing left to do


# --- 3. idempotency ---


def test_finishing_a_commit_twice_commits_once(tmp_path, monkeypatch):
    location = OutputLocation.open(str(tmp_path / "out"))
    real = kill_at(monkeypatch, "finish_commit", "before")
    with pytest.raises(KeyboardInterrupt):
        commit_run(location, "r1", [rows("r1", ["/i/1.jpg", "/i/2.jpg"])])
    monkeypatch.setattr(tables, "finish_commit", real)
    intent = read_intent(location, "r1")

    def versions() -> dict[str, int]:
        return {name: delta(location, name).version() for name in TABLES}

    assert versions() == dict.fromkeys(TABLES, 0)
    assert finish_commit(location, intent) == 1
    assert versions() == dict.fromkeys(TABLES, 1)
    assert finish_commit(location, intent) == 1  # again, staging gone meanwhile: nothing is committed twice...
    assert versions() == dict.fromkeys(TABLES, 1)
    assert visible(location) == everywhere([("/i/1.jpg", "r1"), ("/i/2.jpg", "r1")])  # ...nor any file removed
    assert staging_left(location) == []


# --- 4. adoption ---


def test_a_rerun_commits_a_crashed_runs_finished_files_as_its_own_without_copying_them(tmp_path):
    location = OutputLocation.open(str(tmp_path / "out"))
    ensure_tables(location)
    s1, s2, s3 = (Shard(f"/in/s{i}.tar", "webdataset", 100, "e1") for i in (1, 2, 3))
    # The crashed run finished s1 (in part-0) and s2 (part-1 and part-2); part-2 also holds rows of s3, unfinished.
    crashed_files = stage(
        location,
        "crashed",
        [
            rows("crashed", [f"{s1.url}#a.jpg", f"{s1.url}#b.jpg"]),
            rows("crashed", [f"{s2.url}#a.jpg"]),
            rows("crashed", [f"{s2.url}#b.jpg", f"{s3.url}#a.jpg"]),
        ],
    )
    record_progress(location.progress("crashed"), "task-1", [ShardRead(s1).done(2)])
    record_progress(location.progress("crashed"), "task-2", [ShardRead(s2).done(2)])
    dead_lease(location, "crashed")
    adopted_inode = Path(location.path(PREDICTIONS, crashed_files[0].path)).stat().st_ino

    crashed = recover(location)
    assert crashed == [CrashedRun("crashed", "k1")]

    def rerun(run_id: str) -> Plan:
        plan = Plan("full", 3, ShardReads.of([ShardRead(s1), ShardRead(s2), ShardRead(s3)]))
        adopt(location, crashed, "k1", plan, run_id)
        return plan

    first, second = rerun("first"), rerun("second")  # two reruns of the same work, at once
    for plan in (first, second):
        assert plan.adopted_files == [crashed_files[0]] and plan.adopted_from == ["crashed"]
        assert [read.shard for read in plan.reads] == [s2, s3]

    own = [rows("first", [f"{s2.url}#a.jpg", f"{s2.url}#b.jpg", f"{s3.url}#a.jpg", f"{s3.url}#b.jpg"])]
    shards = [*first.adopted_shards, *whole_shards(own)]
    with Lease(location, "first", "k1"):
        version = commit_run(
            location, "first", own, shards, first.adopted_files, replaces=["crashed"], adopted_from=["crashed"]
        )

    images = [f"{s1.url}#a.jpg", f"{s1.url}#b.jpg", f"{s2.url}#a.jpg", f"{s2.url}#b.jpg", f"{s3.url}#a.jpg",
              f"{s3.url}#b.jpg"]  # fmt: skip
    assert visible(location) == everywhere([(image, "first") for image in images])
    assert committed_paths(location) == {  # committed where the crashed run wrote it: no copy
        "run_id=crashed/part-00000.parquet": "first",
        "run_id=first/part-00000.parquet": "first",
    }
    assert Path(location.path(PREDICTIONS, "run_id=crashed/part-00000.parquet")).stat().st_ino == adopted_inode
    assert data_files(location) == ["run_id=crashed/part-00000.parquet", "run_id=first/part-00000.parquet"]
    # The crashed run's unadopted files and staging went with the commit (the second rerun is still at work).
    assert [path.rsplit("/", 1)[1] for path in staging_left(location)] == ["second"]
    assert view(location, "SELECT url, run_id FROM shards ORDER BY url") == [
        (s1.url, "first"), (s2.url, "first"), (s3.url, "first")
    ]  # fmt: skip

    # The second rerun adopted the same crash: its commit is refused, and commits nothing.
    with pytest.raises(KeyboardInterrupt), Lease(location, "second", "k1"):
        with pytest.raises(AdoptionLost):
            commit_run(
                location, "second", [rows("second", [f"{s2.url}#a.jpg"])], replaces=["crashed"],
                adopted_from=["crashed"], adopted=second.adopted_files,
            )  # fmt: skip
        raise KeyboardInterrupt  # it dies there, before it forgets its adoption
    assert delta(location).version() == version
    assert run_commits(location, PREDICTIONS, "second") == []
    assert visible(location) == everywhere([(image, "first") for image in images])
    assert view(location, "SELECT DISTINCT run_id FROM shards") == [("first",)]
    assert view(location, "SELECT run_id FROM runs") == [("first",)]
    # Recovery does not roll its lost adoption forward: it offers what the run wrote itself, for a rerun to adopt.
    assert recover(location) == [CrashedRun("second", "k1")]
    assert read_intent(location, "second") is None
    assert [file.path for file in runs.staged_files(location, "second")] == ["run_id=second/part-00000.parquet"]
    assert delta(location).version() == version
    assert "run_id=crashed/part-00000.parquet" in data_files(location)  # still held by the first rerun's commit


def test_polars_native_reader_gets_the_run_id_of_a_runs_own_files(tmp_path):
    """Polars' own Delta reader (read_delta/scan_delta without use_pyarrow) takes partition values from Hive-style
    paths, not from the log (pola-rs/polars#23391): data folders are named ``run_id=<run>`` so that it agrees (for
    files a rerun adopted, the path names the run that wrote them; use_pyarrow=True reads the log's value)."""
    import polars as pl

    location = OutputLocation.open(str(tmp_path / "out"))
    commit_run(location, "r1", [rows("r1", ["/i/1.jpg", "/i/2.jpg"])])
    assert pl.read_delta(table_uri(location))["run_id"].to_list() == ["r1", "r1"]
    assert pl.scan_delta(table_uri(location)).filter(pl.col("run_id") == "r1").collect().height == 2


def test_adoptable_takes_only_files_whose_shards_are_all_finished_and_whole():
    def file(name: str, *sources: tuple[str, int]) -> StagedFile:
        return StagedFile(name, 1, sum(n for _, n in sources), 0, (), sources, "{}")

    a = file("a", ("s1", 2))
    b = file("b", ("s2", 1), ("s3", 1))  # s3 unfinished: b cannot be committed, so s2 is not whole without it
    c = file("c", ("s2", 1))
    d = file("d", ("s4", 1))  # s4 gave 2 rows, 1 is in files: a file of it was cut short (no record)
    e = file("e", ("s5", 1), ("s2", 1))  # s5 is whole only with e, which goes with s2
    f = file("f", ("s5", 1))
    finished = {"s1": 2, "s2": 3, "s4": 2, "s5": 2}
    assert adoptable([a, b, c, d, e, f], finished) == ([a], {"s1"})
    # Without the unfinished shard's rows in b, everything finished is taken.
    b_done = file("b", ("s2", 1), ("s3", 1))
    assert adoptable([a, b_done, c, e, f], {"s1": 2, "s2": 3, "s3": 1, "s5": 2}) == (
        [a, b_done, c, e, f],
        {"s1", "s2", "s3", "s5"},
    )
    assert adoptable([a, c], {}) == ([], set())


# --- 5. concurrent commits ---


def _commit_rounds(url, storage_options, who, rounds, barrier, results) -> None:  # in a spawned process
    location = OutputLocation.open(url, storage_options)
    for round_ in range(rounds):
        run_id = f"r{round_}-p{who}"
        own = [f"/in/p{who}-r{round_}.tar#{i}.jpg" for i in range(3)]
        shared = [f"/in/shared.tar#{i}.jpg" for i in (round_, round_ + 1)]  # both read it whole; it changes
        parts = [rows(run_id, own), rows(run_id, shared)]
        staged = StagedOutput.of(stage(location, run_id, parts))
        manifest = manifest_of(run_id, staged)
        barrier.wait(timeout=120)  # both commit onto the same table version at the same moment
        results.put((run_id, commit(location, run_id, staged, manifest, whole_shards(parts))))


class WrongVersion(AssertionError):
    """A run was told (or its runs row says) another predictions version than the one that holds its commit."""


class StaleLatest(AssertionError):
    """``latest`` is not the newest committed row of each image."""


@pytest.mark.parametrize("store", ["local", "s3"])
def test_two_processes_committing_at_once_both_commit_once(tmp_path, request, store):
    """Two processes (spawned) each commit their own run onto one output at the same moment, three rounds.

    Both commits target the same predictions version each round; delta-rs makes the loser's ``_delta_log/N.json``
    write fail and commits it at N+1 (a blind append conflicts with nothing), and the two ``latest`` merges of a
    round conflict on its application transaction, so each predictions commit is merged once, in order.

    On S3 that rests on the store refusing a second ``PUT`` of one key with ``If-None-Match: *`` (412). moto 5.2.5
    emulates that answer (also for multipart completion), but checks then writes without a lock: it is not a proof
    of atomicity, only real S3 promises that; nor does it emulate S3's 409 ConditionalRequestConflict for conditional
    writes in flight at once, throttling, signatures or IAM (benchmarks/delta/FINDINGS.md, section 4.4).

    No commit lost or doubled, every row there; each run is told the version that holds it (else WrongVersion)
    and ``latest`` is the newest committed row of each image (else StaleLatest).
    """
    rounds = 3
    if store == "local":
        location = OutputLocation.open(str(tmp_path / "out"))
    else:
        _, bucket, storage_options = request.getfixturevalue("s3")
        location = OutputLocation.open(f"s3://{bucket}/out", storage_options)
    ensure_tables(location)  # once, up front: concurrent creates race (FINDINGS section 4.5)

    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    workers = [
        context.Process(
            target=_commit_rounds, args=(location.url(), location.storage_options, who, rounds, barrier, results)
        )
        for who in (0, 1)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=240)
    assert [worker.exitcode for worker in workers] == [0, 0]
    reported = dict(results.get(timeout=5) for _ in range(2 * rounds))

    run_ids = sorted(f"r{r}-p{who}" for r in range(rounds) for who in (0, 1))
    assert sorted(reported) == run_ids
    assert delta(location).version() == 2 * rounds  # the create, then one commit per run
    versions = commit_versions(location)
    assert sorted(versions) == run_ids and sorted(versions.values()) == list(range(1, 2 * rounds + 1))
    # Each round's two runs got that round's two versions: neither waited a round for the other.
    assert [sorted(versions[f"r{r}-p{who}"] for who in (0, 1)) for r in range(rounds)] == [
        [2 * r + 1, 2 * r + 2] for r in range(rounds)
    ]
    for table in TABLES:  # each step of each run done once
        assert {run: len(v) for run, v in commits_per_run(location, table).items()} == dict.fromkeys(run_ids, 1), table
    seen = pairs(delta(location).to_pyarrow_table())
    assert len(seen) == 2 * rounds * 5 and len(set(seen)) == len(seen)
    with connect(location) as db:
        assert sorted(run for (run,) in db.execute("SELECT run_id FROM runs").fetchall()) == run_ids
        assert db.execute("SELECT count(*) FROM shards").fetchall() == [(2 * rounds * 2,)]
        latest = dict(db.execute("SELECT image_id, run_id FROM latest").fetchall())
        in_runs = dict(db.execute("SELECT run_id, version FROM runs").fetchall())
    assert staging_left(location) == []

    own = {f"/in/p{who}-r{r}.tar#{i}.jpg": f"r{r}-p{who}" for r in range(rounds) for who in (0, 1) for i in range(3)}
    last = max((f"r{rounds - 1}-p{who}" for who in (0, 1)), key=versions.get)  # committed last: its shared rows
    shared = {f"/in/shared.tar#{i}.jpg": last for i in (rounds - 1, rounds)}
    expected = {**own, **shared}  # one row per image; the images gone from the re-read shared.tar gone
    if latest != expected:
        raise StaleLatest(f"latest {latest} is not {expected}")
    try:
        assert_latest_is_the_newest_committed_row(location)
    except AssertionError as error:
        raise StaleLatest(str(error)) from None
    told = {run_id: reported[run_id] for run_id in run_ids}
    if told != versions or in_runs != versions:
        raise WrongVersion(f"committed at {versions}; told {told}; runs table {in_runs}")


def test_a_run_is_told_the_version_it_committed_at_while_another_commits(tmp_path, monkeypatch):
    """Run b commits between run a's commit and a's look at the table's history (as a concurrent run may)."""
    location = OutputLocation.open(str(tmp_path / "out"))
    real = tables.committed_version

    def another_commits_first(location: OutputLocation, table: DeltaTable, run_id: str) -> int:
        if run_id == "a":
            monkeypatch.setattr(tables, "committed_version", real)
            commit_run(location, "b", [rows("b", ["/i/2.jpg"])])
        return real(location, table, run_id)

    monkeypatch.setattr(tables, "committed_version", another_commits_first)
    told = commit_run(location, "a", [rows("a", ["/i/1.jpg"])])
    assert commit_versions(location) == {"a": 1, "b": 2}
    assert dict(view(location, "SELECT run_id, version FROM runs")) == {"a": 1, "b": 2}, "the runs table"
    assert told == 1, "the version commit() returned"


def test_latest_catches_up_from_a_snapshot_a_commit_has_overtaken(tmp_path, monkeypatch):
    """Three runs committed, none merged into latest yet; the catch-up loads the predictions table just before the
    third run's commit lands (as one that races a concurrent commit may)."""
    location = OutputLocation.open(str(tmp_path / "out"))
    real = kill_at(monkeypatch, "catch_up_latest", "before")
    committed = {"a": "/i/1.jpg", "b": "/i/2.jpg", "c": "/i/3.jpg"}
    for run_id, image in committed.items():
        with pytest.raises(KeyboardInterrupt):
            commit_run(location, run_id, [rows(run_id, [image])])
    monkeypatch.setattr(tables, "catch_up_latest", real)

    real_open = tables.open_table
    stale = {PREDICTIONS: 2}  # the predictions table as loaded just before c's commit (version 3) landed

    def open_table(location, name, version=None):
        return real_open(location, name, stale.pop(name, version))

    monkeypatch.setattr(tables, "open_table", open_table)
    tables.catch_up_latest(location)
    monkeypatch.setattr(tables, "open_table", real_open)
    tables.catch_up_latest(location)  # and again, up to date
    assert dict(view(location, "SELECT image_id, run_id FROM latest")) == {v: k for k, v in committed.items()}
    assert_latest_is_the_newest_committed_row(location)


# --- 6. latest ---

# The newest committed row of each image (by the version of its run's predictions commit), less the images that a
# later run's whole read of their shard no longer found.
NEWEST = """
WITH ranked AS (SELECT p.*, r.version AS v FROM p JOIN r USING (run_id)),
newest AS (
    SELECT * FROM ranked QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY v DESC, processed_at DESC) = 1
)
SELECT * EXCLUDE (v) FROM newest n
WHERE NOT EXISTS (SELECT 1 FROM s JOIN r USING (run_id) WHERE s.url = n.source AND NOT s.partial AND r.version > n.v)
"""


def commit_versions(location: OutputLocation) -> dict[str, int]:
    """Run id -> the version of its predictions commit, from the log (read when nobody commits)."""
    table = delta(location)
    history = table.history()
    assert history[0]["version"] == table.version()  # numbered from the snapshot: only right with no newer commit
    return {entry[RUN_KEY]: entry["version"] for entry in history if RUN_KEY in entry}


def assert_latest_is_the_newest_committed_row(location: OutputLocation) -> None:
    names = output_schema().names
    versions = pa.table(
        {"run_id": list(commit_versions(location)), "version": list(commit_versions(location).values())}
    )
    with duckdb.connect() as db:
        db.register("p", delta(location).to_pyarrow_dataset())
        db.register("r", versions)
        db.register("s", delta(location, SHARDS).to_pyarrow_dataset())
        db.register("l", delta(location, LATEST).to_pyarrow_dataset())
        columns = ", ".join(names)
        newest = db.execute(f"SELECT {columns} FROM ({NEWEST}) ORDER BY image_id").fetchall()
        latest = db.execute(f"SELECT {columns} FROM l ORDER BY image_id").fetchall()
    assert latest == newest


def test_latest_takes_the_newest_row_per_image_and_a_whole_reread_replaces_a_shard(tmp_path):
    import polars as pl

    location = OutputLocation.open(str(tmp_path / "out"))
    tar = "/in/shard-0.tar"
    r1 = [rows("r1", [f"{tar}#a.jpg", f"{tar}#b.jpg"]), rows("r1", [f"{tar}#c.jpg"], "error")]
    v1 = commit_run(location, "r1", r1, [shard_record(tar, 3)])
    assert_latest_is_the_newest_committed_row(location)

    v2 = commit_run(location, "r2", [rows("r2", [f"{tar}#c.jpg"])], [shard_record(tar, 1, partial=True)])  # retried
    assert dict(view(location, "SELECT image_id, run_id FROM latest")) == {
        f"{tar}#a.jpg": "r1", f"{tar}#b.jpg": "r1", f"{tar}#c.jpg": "r2"
    }  # fmt: skip
    assert view(location, "SELECT count(*) FROM errors") == [(0,)]
    assert view(location, "SELECT count(*) FROM predictions") == [(4,)]  # history stays
    assert_latest_is_the_newest_committed_row(location)

    # The shard changed (b is gone, d is new) and is read whole again.
    v3 = commit_run(location, "r3", [rows("r3", [f"{tar}#a.jpg", f"{tar}#d.jpg"])], [shard_record(tar, 2, "e2")])
    assert dict(view(location, "SELECT image_id, run_id FROM latest")) == {f"{tar}#a.jpg": "r3", f"{tar}#d.jpg": "r3"}
    assert view(location, "SELECT run_id, seq, version FROM runs ORDER BY seq") == [
        ("r1", 1, v1), ("r2", 2, v2), ("r3", 3, v3)
    ]  # fmt: skip
    assert_latest_is_the_newest_committed_row(location)

    # Time travel: the predictions table as of the first run's commit holds exactly its rows.
    first = [(f"{tar}#{n}.jpg", "r1") for n in "abc"]
    assert visible(location, version=v1) == everywhere(first, views=False)
    assert pairs(tables.dataset(location, PREDICTIONS, v1).to_table()) == first
    frame = pl.read_delta(table_uri(location), version=v2, use_pyarrow=True)
    assert sorted(frame["run_id"].to_list()) == ["r1", "r1", "r1", "r2"]


# --- 7. recovery ---


def test_recovery_keeps_live_runs_offers_crashed_ones_and_removes_orphans(tmp_path):
    location = OutputLocation.open(str(tmp_path / "out"))
    out = Path(location.root)
    ensure_tables(location)
    # A run whose driver died after writing a file: offered for adoption, its files kept.
    stage(location, "crashed", [rows("crashed", ["/i/1.jpg"])])
    dead_lease(location, "crashed", "k1")
    # A committed run that adopted another crashed run's file, leaving that run's folder with the committed file.
    gone = stage(location, "gone", [rows("gone", ["/i/5.jpg"])])
    dead_lease(location, "gone", "k2")
    commit_run(location, "adopter", [rows("adopter", ["/i/6.jpg"])], adopted=gone, replaces=["gone"],
               adopted_from=["gone"])  # fmt: skip
    assert committed_paths(location)["run_id=gone/part-00000.parquet"] == "adopter"
    # Orphans: a folder of a run with no staging and no commit; a stray file beside a committed one.
    os.makedirs(out / "predictions/run_id=orphan")
    pq.write_table(rows("orphan", ["/i/9.jpg"]), out / "predictions/run_id=orphan/part-00000.parquet")
    pq.write_table(rows("gone", ["/i/8.jpg"]), out / "predictions/run_id=gone/part-00009.parquet")
    before = visible(location)

    with Lease(location, "alive", "k1"):
        stage(location, "alive", [rows("alive", ["/i/2.jpg"])])
        crashed = recover(location)
        assert crashed == [CrashedRun("crashed", "k1")]
        assert data_files(location) == [  # the live and the crashed run's files stay, and the committed one
            "run_id=adopter/part-00000.parquet",
            "run_id=alive/part-00000.parquet",
            "run_id=crashed/part-00000.parquet",
            "run_id=gone/part-00000.parquet",
        ]
        assert runs.staged_files(location, "alive") and runs.staged_files(location, "crashed")
        assert sorted(p.rsplit("/", 1)[1] for p in staging_left(location)) == ["alive", "crashed"]
    assert visible(location) == before == everywhere([("/i/5.jpg", "adopter"), ("/i/6.jpg", "adopter")])
    assert not list((out / "predictions/run_id=orphan").glob("*"))


def test_an_orphan_run_folder_goes_whole(tmp_path):
    location = OutputLocation.open(str(tmp_path / "out"))
    commit_run(location, "r1", [rows("r1", ["/i/1.jpg"])])
    orphan = Path(location.path(PREDICTIONS, "run_id=orphan"))
    orphan.mkdir()
    pq.write_table(rows("orphan", ["/i/9.jpg"]), orphan / "part-00000.parquet")
    assert recover(location) == []
    assert not list(orphan.glob("*"))  # the file went...
    assert not orphan.exists()  # ...and so should its folder


def test_leases_expire_when_the_driver_is_gone_or_silent():
    here = socket.gethostname()
    assert not lease_expired({"host": here, "pid": os.getpid(), "started_at": _ago(1), "heartbeat_at": _ago(1)})
    assert lease_expired({"host": here, "pid": DEAD_PID, "started_at": _ago(1), "heartbeat_at": _ago(1)})
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


# --- 8. faults between delta-rs and the store ---


FAULTS = ("slow_down", "drop_before", "drop_after")


def test_commits_whose_log_writes_fail_once_commit_exactly_once(s3):
    """Three runs, each through a store where the first PUT of every Delta commit it makes (shards, predictions,
    runs, latest) fails one way: 503 SlowDown; the connection lost before the store saw the request; or lost after
    the store wrote the entry (the answer never comes).

    delta-rs (object_store) retries each on its own. After a lost answer its retry of the conditional PUT gets 412:
    delta-rs takes the entry it wrote itself for a concurrent writer's and raises CommitFailedError ("Concurrent
    transaction failed": the entry holds the run's own application transaction); the pipeline then looks again,
    finds its transaction, and counts the commit as done. All three kinds are survived; none fails permanently.
    """
    _, bucket, storage_options = s3
    location = OutputLocation.open(f"s3://{bucket}/out", storage_options)
    ensure_tables(location)
    expected = []
    for number, fault in enumerate(FAULTS, 1):
        first_try = FirstTry("PUT", "/_delta_log/", ".json")  # the first PUT of each log entry: each commit
        with FaultProxyProcess(storage_options["endpoint_url"], **{fault: 1.0}, only=first_try) as proxy:
            flaky = OutputLocation.open(f"s3://{bucket}/out", {"endpoint_url": proxy.endpoint})
            images = [f"/i/{fault}-{i}.jpg" for i in range(2)]
            assert commit_run(flaky, fault, [rows(fault, images)]) == number
        expected += [(image, fault) for image in images]
        faulted = sorted(path.split("/")[-3] for _, path, what in proxy.log if what == fault)
        assert faulted == sorted(TABLES), proxy.log  # the commit to each table failed once
        assert all(path.endswith(f"/_delta_log/{number:020d}.json") for _, path, what in proxy.log if what == fault)
        assert proxy.counts[fault] == 4 and sum(proxy.counts[f] for f in FAULTS) == 4, proxy.counts
    assert visible(location) == everywhere(expected)
    for table in TABLES:
        assert delta(location, table).version() == len(FAULTS), table
        assert commits_per_run(location, table) == {fault: [n] for n, fault in enumerate(FAULTS, 1)}, table
    assert staging_left(location) == []


def test_a_run_committed_through_a_flaky_store_commits_exactly_once_with_all_rows(s3, monkeypatch):
    """Every request (s3fs's and delta-rs's, reads and writes, the commit and the recovery after it) may fail: 503
    SlowDown, or a connection dropped before or after the store acted. s3fs's own retries are off, so the pipeline's
    retry covers its writes; delta-rs retries on its own."""
    monkeypatch.setattr("pipeline.storage.BASE_DELAY", 0.01)
    monkeypatch.setattr("s3fs.S3FileSystem.retries", 1)
    _, bucket, storage_options = s3
    location = OutputLocation.open(f"s3://{bucket}/out", storage_options)
    ensure_tables(location)
    faults = {"slow_down": 0.1, "drop_before": 0.05, "drop_after": 0.05, "seed": 3}
    with FaultProxyProcess(storage_options["endpoint_url"], **faults) as proxy:
        flaky = OutputLocation.open(
            f"s3://{bucket}/out",
            {"endpoint_url": proxy.endpoint, "config_kwargs": {"retries": {"max_attempts": 1}},
             "skip_instance_cache": True},
        )  # fmt: skip
        assert commit_run(flaky, "r1", [rows("r1", ["/i/1.jpg", "/i/2.jpg"]), rows("r1", ["/i/3.jpg"], "error")]) == 1
        assert recover(flaky) == []
    assert all(proxy.counts[fault] for fault in FAULTS), proxy.counts
    assert visible(location) == everywhere([("/i/1.jpg", "r1"), ("/i/2.jpg", "r1"), ("/i/3.jpg", "r1")])
    for table in TABLES:
        assert run_commits(location, table, "r1") == [1], table
    assert_latest_is_the_newest_committed_row(location)
    assert staging_left(location) == []


def test_other_threads_run_while_a_table_check_waits_on_a_slow_store(s3):
    import threading
    import time

    _, bucket, storage_options = s3
    ensure_tables(OutputLocation.open(f"s3://{bucket}/out", storage_options))
    ticks = []
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.01):
            ticks.append(time.monotonic())

    with FaultProxyProcess(storage_options["endpoint_url"], delay=0.5) as slow:
        location = OutputLocation.open(f"s3://{bucket}/out", {"endpoint_url": slow.endpoint})
        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        started = time.monotonic()
        assert tables.is_table(location, PREDICTIONS)
        waited = time.monotonic() - started
        stop.set()
        ticker.join()
    assert waited >= 0.5
    # A thread that gets the GIL ticks every 10 ms; allow it a quarter of that.
    assert len([t for t in ticks if started <= t <= started + waited]) >= waited / 0.01 / 4


# --- reading through faults, shards, and whole files (not about the commit) ---


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
        (tar,) = list_shards(f"s3://{bucket}/in/", "webdataset", options).shards
        records = list(read_shard(tar, {"storage_options": options}))
        files = [
            r
            for s in list_shards(f"s3://{bucket}/in/files/", "images", options).shards
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


def test_leases_and_staging_records_are_written_whole(tmp_path):
    location = OutputLocation.open(str(tmp_path))
    write_json(location.fs, location.staging("x", "_lease.json"), {"run_id": "x"})
    write_data_file(location, "x", "part-00000.parquet", rows("x", ["/i/1.jpg"]))
    assert json.loads((tmp_path / "_staging/x/_lease.json").read_text()) == {"run_id": "x"}
    # no temporary file left beside any of them
    assert sorted(p.name for p in (tmp_path / "_staging/x").rglob("*")) == [
        "_files",
        "_lease.json",
        "part-00000.parquet.json",
    ]
    assert [p.name for p in (tmp_path / "predictions/run_id=x").iterdir()] == ["part-00000.parquet"]


def _ago(seconds: float) -> str:
    return (datetime.now(timezone.utc) - timedelta(seconds=seconds)).isoformat()
