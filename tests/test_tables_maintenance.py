"""What keeps a night's cost flat as an output's history grows (issue 22): ``shards`` and ``runs`` compacted by the
commit, ``runs``' statistics without the manifest, and a ``latest`` merge that opens only the files its images can
be in. Small outputs on local disk, no Ray."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
from deltalake import DeltaTable

import pipeline.sources
from pipeline import incremental, tables
from pipeline.query import connect
from pipeline.runs import LATEST, PREDICTIONS, RUNS, SHARDS, OutputLocation
from pipeline.sources import Shard
from pipeline.spec import parse_spec
from tests.test_runs import commit_run, delta, rows, shard_record, view


def listing(shards: list[Shard]) -> Any:
    """Listed shards as the planner takes them (a ``Shards`` table where the code has one)."""
    kind = getattr(pipeline.sources, "Shards", None)
    return kind.of(shards) if kind else shards


def shard(night: int, etag: str = "e1") -> Shard:
    return Shard(f"/in/night-{night:02d}.tar", "webdataset", 100, etag)


def commit_night(location: OutputLocation, night: int, status: str = "ok") -> int:
    url = shard(night).url
    return commit_run(location, f"r{night:02d}", [rows(f"r{night:02d}", [f"{url}#a.jpg", f"{url}#b.jpg"], status)],
                      [shard_record(url, 2)])  # fmt: skip


def files(location: OutputLocation, name: str) -> int:
    return len(delta(location, name).file_uris())


def test_shards_and_runs_stay_a_few_files_and_every_reader_still_sees_all_of_history(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "COMPACT_FILES", 3)
    location = OutputLocation.open(str(tmp_path / "out"))
    versions = []
    for night in range(9):
        versions.append(commit_night(location, night, "error" if night == 4 else "ok"))
        assert files(location, SHARDS) <= 4 and files(location, RUNS) <= 4, night
    assert files(location, SHARDS) < 9 and files(location, RUNS) < 9

    # Planning: every shard committed whole is covered; a changed one is read again.
    spec = parse_spec({"input": "/in", "output": str(tmp_path / "out"), "incremental": True})
    listed = [shard(n) for n in range(9)]
    assert incremental.plan_run(spec, listing(listed), location, "k1").skipped == 9
    listed[6] = shard(6, "e2")
    assert [read.shard.url for read in incremental.plan_run(spec, listing(listed), location, "k1").reads] == [
        shard(6).url
    ]
    # Retrying failures: the failed images of night 4, wherever its shards row now lies.
    retry = incremental.plan_retry(listing(listed), location)
    assert [(read.shard.url, sorted(read.only or ())) for read in retry.reads] == [
        (shard(4).url, [f"{shard(4).url}#a.jpg", f"{shard(4).url}#b.jpg"])
    ]

    # Each run's one commit is still known (its application transaction survives compaction).
    for name in (SHARDS, RUNS):
        table = delta(location, name)
        assert all(table.transaction_version(f"r{n:02d}") == 1 for n in range(9)), name
    assert [m.run_id for m in tables.read_manifests(location)] == [f"r{n:02d}" for n in range(9)]
    assert view(location, "SELECT count(*) FROM shards") == [(9,)]
    assert view(location, "SELECT run_id, version FROM runs ORDER BY seq") == [
        (f"r{n:02d}", v) for n, v in enumerate(versions)
    ]
    # pyarrow filters the compacted files (delta-rs writes no string_view Arrow cannot filter)
    found = tables.dataset(location, SHARDS).to_table(filter=ds.field("url") == shard(7).url)
    assert found.column("run_id").to_pylist() == ["r07"]

    # Time travel: the output as of night 3's commit.
    with connect(location, as_of=versions[2]) as db:
        assert db.execute("SELECT run_id FROM runs ORDER BY seq").fetchall() == [("r00",), ("r01",), ("r02",)]
        assert db.execute("SELECT count(*) FROM shards").fetchall() == [(3,)]
        assert db.execute("SELECT count(*) FROM latest").fetchall() == [(6,)]


def runs_stats(location: OutputLocation) -> dict[str, Any]:
    """The statistics of the newest add of the runs table."""
    table = delta(location, RUNS)
    adds = [a["add"] for a in tables.log_actions(location, RUNS, table.version()) if "add" in a]
    return json.loads(adds[-1]["stats"])


def test_runs_statistics_leave_out_the_manifest_in_new_and_existing_outputs(tmp_path, monkeypatch):
    fresh = OutputLocation.open(str(tmp_path / "new"))
    commit_night(fresh, 0)
    stats = runs_stats(fresh)
    assert "manifest" not in stats["minValues"] and stats["minValues"]["run_id"] == "r00"

    # An output made before the property: its runs' stats held the manifest, until ensure_tables sets it.
    old = OutputLocation.open(str(tmp_path / "old"))
    with monkeypatch.context() as before:
        before.setattr(tables, "PROPERTIES", {})
        commit_night(old, 0)
    assert "manifest" in runs_stats(old)["minValues"]
    commit_night(old, 1)  # commit_run calls ensure_tables, as every run does first
    assert "manifest" not in runs_stats(old)["minValues"]
    assert DeltaTable(old.table(RUNS)).metadata().configuration == tables.PROPERTIES[RUNS]
    assert [m.run_id for m in tables.read_manifests(old)] == ["r00", "r01"]


def test_the_latest_merge_opens_only_the_files_its_images_can_be_in(tmp_path, monkeypatch):
    location = OutputLocation.open(str(tmp_path / "out"))
    for night in range(6):
        commit_night(location, night)
    opened: list[str] = []
    built: list[str] = []
    fragments, to_dataset = tables._fragments, DeltaTable.to_pyarrow_dataset

    def spy_fragments(location: OutputLocation, table: DeltaTable, held: list[dict]) -> tuple:
        if table.table_uri.rstrip("/").endswith(LATEST):
            opened.extend(file["path"] for file in held)
        return fragments(location, table, held)

    def spy_dataset(table: DeltaTable, *args, **kwargs) -> ds.Dataset:
        built.append(table.table_uri.rstrip("/").rsplit("/", 1)[-1])
        return to_dataset(table, *args, **kwargs)

    monkeypatch.setattr(tables, "_fragments", spy_fragments)
    monkeypatch.setattr(DeltaTable, "to_pyarrow_dataset", spy_dataset)
    url = shard(2).url
    commit_run(location, "r-again", [rows("r-again", [f"{url}#a.jpg"])], [shard_record(url, 1, "e2")])
    holding = [
        f["path"]
        for f in pa.table(delta(location, LATEST, version=6).get_add_actions(flatten=True)).to_pylist()
        if f["min.source"] <= url <= f["max.source"]
    ]
    assert opened == holding and len(holding) == 1
    assert LATEST not in built
    assert view(location, f"SELECT image_id, run_id FROM latest WHERE source = '{url}'") == [
        (f"{url}#a.jpg", "r-again")
    ]
    assert view(location, "SELECT count(*) FROM latest") == [(11,)]


def test_a_tables_dataset_gives_each_file_its_bounds_and_partition_without_delta_rs_building_them(
    tmp_path, monkeypatch
):
    location = OutputLocation.open(str(tmp_path / "out"))
    for night in range(3):
        commit_night(location, night)
    url = shard(3).url
    mixed = pa.concat_tables([rows("r03", [f"{url}#a.jpg"]), rows("r03", [f"{url}#b.jpg"], "error")])
    commit_run(location, "r03", [mixed], [shard_record(url, 2)])

    def refused(*args, **kwargs):
        raise AssertionError("delta-rs's to_pyarrow_dataset sets up every file's bounds, slowly")

    monkeypatch.setattr(DeltaTable, "to_pyarrow_dataset", refused)
    latest, predictions = tables.dataset(location, LATEST), tables.dataset(location, PREDICTIONS)
    lookup = ds.field("image_id") == f"{shard(1).url}#b.jpg"
    assert len(list(latest.get_fragments(filter=lookup))) == 1  # the other files are skipped unread
    assert latest.to_table(filter=lookup).column("run_id").to_pylist() == ["r01"]
    # A column with nulls in a file gets no bounds there: its nulls are still found.
    assert latest.to_table(filter=ds.field("label").is_null()).column("image_id").to_pylist() == [f"{url}#b.jpg"]
    assert predictions.to_table(filter=ds.field("label") == "tench").num_rows == 7
    # The run id comes from the log's partition values, and selects the run's files only.
    run = ds.field("run_id") == "r02"
    assert len(list(predictions.get_fragments(filter=run))) == 1
    assert sorted(predictions.to_table(filter=run).column("image_id").to_pylist()) == [
        f"{shard(2).url}#a.jpg",
        f"{shard(2).url}#b.jpg",
    ]
    assert predictions.schema == pa.schema(delta(location).schema().to_arrow())
    assert predictions.count_rows() == latest.count_rows() == 8
