"""The similarity index (``pipeline.vector_index``, ``resnet-pipeline index``): recall against exact search, the image
itself first, a stale index said so, and the same on moto's S3 server over HTTP.

Outputs are real Delta tables: runs of clustered random embeddings (a mixture of Gaussians, each vector scaled by a
random norm so that cosine and L2 neighbours differ) committed with the commit protocol's own test helpers, no model.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.query import connect, fetch_arrow, similar
from pipeline.runs import OutputLocation
from pipeline.vector_index import FOLDER, RECORD, StaleIndexWarning, build, open_index, parameters
from tests.test_runs import commit_run, rows

DIM = 96
CLUSTERS = 24


def clustered(run_id: str, ids: list[str], seed: int, label: str | None = None) -> pa.Table:
    """Rows of the output schema whose embeddings come from CLUSTERS Gaussians (the same centres for every seed)."""
    centres = np.random.default_rng(0).standard_normal((CLUSTERS, DIM), dtype=np.float32)
    rng = np.random.default_rng(seed)
    which = rng.integers(0, CLUSTERS, len(ids))
    noise = 0.35 * rng.standard_normal((len(ids), DIM), dtype=np.float32)
    vectors = (centres[which] + noise) * rng.uniform(0.3, 3.0, (len(ids), 1)).astype(np.float32)
    offsets = pa.array(np.arange(len(ids) + 1, dtype=np.int32) * DIM)
    table = rows(run_id, ids)
    replaced = {
        "embedding": pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1))),
        "label": pa.array([label or f"cluster-{c}" for c in which]),
        "score": pa.array(rng.random(len(ids), dtype=np.float32)),
    }
    for name, column in replaced.items():
        table = table.set_column(table.schema.get_field_index(name), name, column)
    return table


def image_ids(count: int, start: int = 0, shard: str = "s") -> list[str]:
    return [f"/data/{shard}{i // 500}.tar#{i:05d}.jpg" for i in range(start, start + count)]


def committed(location: OutputLocation, run_id: str, count: int, seed: int, start: int = 0) -> list[str]:
    """One committed run of ``count`` clustered images and 5 failed ones; returns the ok images' ids."""
    ids = image_ids(count, start)
    commit_run(location, run_id, [clustered(run_id, ids, seed), rows(run_id, image_ids(5, 90_000), "error")])
    return ids


def exact_neighbours(db, queries: list[str], k: int = 10) -> dict[str, set[str]]:
    """The k nearest images of each query by cosine similarity, ranked with NumPy over every row of ``latest``."""
    table = fetch_arrow(db, "SELECT image_id, embedding FROM latest WHERE status = 'ok'")
    ids = table.column("image_id").to_pylist()
    vectors = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(len(ids), -1)
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    position = {image_id: i for i, image_id in enumerate(ids)}
    return {q: {ids[i] for i in np.argsort(-(vectors @ vectors[position[q]]))[:k]} for q in queries}


def recall_at_10(db, index, queries: list[str], **knobs) -> float:
    """Recall@10 of ``similar`` through the index against exact search; each answer starts with its image."""
    exact, found = exact_neighbours(db, queries), 0
    for image_id in queries:
        approx = similar(db, image_id, 10, index, **knobs).column("image_id").to_pylist()
        assert approx[0] == image_id
        found += len(set(approx) & exact[image_id])
    return found / (10 * len(queries))


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    location = OutputLocation.open(str(tmp_path_factory.mktemp("similar-index") / "out"))
    ids = committed(location, "20261202T000000Z-aaaaaa", 3000, seed=1)
    return location, ids, build(location)


def test_the_index_finds_what_exact_search_finds(indexed):
    location, ids, record = indexed
    assert (record.rows, record.dimension, record.predictions_version) == (3000, DIM, 1)  # failed rows left out
    assert (record.num_partitions, record.num_sub_vectors) == parameters(3000, DIM) == (11, 6)
    index = open_index(location.url())
    queries = ids[::150]
    with connect(location) as db, warnings.catch_warnings():
        warnings.simplefilter("error", StaleIndexWarning)  # up to date: no warning
        assert recall_at_10(db, index, queries) >= 0.9
        approx = similar(db, ids[7], 10, index).to_pylist()
        exact = {row["image_id"]: row for row in similar(db, ids[7], 10).to_pylist()}
    assert approx[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    for row in approx:  # refined: exact similarities, and what similar prints from the index is the row's own
        if row["image_id"] in exact:
            assert row == pytest.approx(exact[row["image_id"]], abs=1e-4)
    assert [row["similarity"] for row in approx] == sorted((row["similarity"] for row in approx), reverse=True)


def test_nprobes_and_refine_trade_recall_for_time(indexed):
    location, ids, _ = indexed
    index = open_index(location)
    with connect(location) as db:
        coarse = recall_at_10(db, index, ids[::200], nprobes=1, refine=0)
        fine = recall_at_10(db, index, ids[::200], nprobes=11, refine=20)
    assert coarse < fine and fine >= 0.95


def test_parameters_follow_the_rows_and_the_dimension():
    assert parameters(1_000_000, 2048) == (1000, 128)
    assert parameters(10_000_000, 2048) == (3162, 128)
    assert parameters(4000, 100) == (15, 10)  # 100 = 10 x 10: the largest divisor up to 100 / 8
    assert parameters(100_000, 512, num_partitions=64, num_sub_vectors=32) == (64, 32)
    with pytest.raises(ValueError, match="must divide the dimension 512"):
        parameters(100_000, 512, num_sub_vectors=100)


def test_a_stale_index_says_so_and_a_rebuild_catches_up(tmp_path):
    location = OutputLocation.open(str(tmp_path / "out"))
    ids = committed(location, "20261202T000000Z-aaaaaa", 1200, seed=2)
    build(location)
    new = committed(location, "20261202T000001Z-bbbbbb", 300, seed=3, start=5000)
    index = open_index(location)
    with connect(location) as db:
        with pytest.warns(StaleIndexWarning, match=r"1 version behind .*1 run committed since.*resnet-pipeline index"):
            nearest = similar(db, new[0], 10, index).column("image_id").to_pylist()
        assert nearest[0] == new[0] and not set(nearest[1:]) & set(new)  # the new image first; its run not indexed
        build(location)
        index = open_index(location)
        with warnings.catch_warnings():
            warnings.simplefilter("error", StaleIndexWarning)
            assert recall_at_10(db, index, [new[0], ids[0]]) >= 0.9
        assert set(similar(db, new[0], 10, index).column("image_id").to_pylist()) & set(new[1:])


def test_cli_builds_the_index_and_similar_uses_it_in_every_format(tmp_path):
    location = OutputLocation.open(str(tmp_path / "out"))
    ids = committed(location, "20261202T000000Z-aaaaaa", 1500, seed=4)
    out, runner = str(tmp_path / "out"), CliRunner()
    built = runner.invoke(app, ["index", out])
    assert built.exit_code == 0, built.output
    assert (
        "indexed 1,500 embeddings of 96 values (5 partitions x 6 sub-vectors) at predictions version 1" in built.stdout
    )

    lines = runner.invoke(app, ["similar", out, ids[3], "-k", "5", "--format", "json"]).stdout.splitlines()
    approx = [json.loads(line)["image_id"] for line in lines]
    exact = runner.invoke(app, ["similar", out, ids[3], "-k", "5", "--format", "json", "--exact"]).stdout
    assert approx[0] == ids[3] and len(approx) == 5
    assert len(set(approx) & {json.loads(line)["image_id"] for line in exact.splitlines()}) >= 4
    written = runner.invoke(app, ["similar", out, ids[3], "-k", "5", "--format", "parquet", "-o", f"{tmp_path}/n.pq"])
    assert written.exit_code == 0 and pq.read_table(tmp_path / "n.pq").column("image_id").to_pylist() == approx

    committed(location, "20261202T000001Z-bbbbbb", 50, seed=5, start=5000)
    stale = runner.invoke(app, ["similar", out, ids[3], "-k", "3", "--format", "csv", "--nprobes", "2"])
    assert stale.exit_code == 0
    assert stale.stderr.startswith("warning: the similarity index is 1 version behind the output")
    assert stale.stdout.splitlines()[0] == "image_id,similarity,label,score,source"
    missing = runner.invoke(app, ["similar", out, "/data/nope.jpg"])
    assert missing.exit_code == 2 and "no image '/data/nope.jpg' in this output" in missing.stderr


def test_the_index_on_s3(s3):
    fs, bucket, storage_options = s3
    secret = "s3cr3t-never-shown"
    options = {**storage_options, "key": "testing", "secret": secret}
    location = OutputLocation.open(f"s3://{bucket}/out", options)
    ids = committed(location, "20261202T000000Z-aaaaaa", 1500, seed=6)
    record = build(f"s3://{bucket}/out", options)
    assert record.rows == 1500 and record.num_partitions == 5
    assert fs.exists(f"{bucket}/out/{FOLDER}/{RECORD}") and fs.ls(f"{bucket}/out/{FOLDER}/similar.lance")
    index = open_index(f"s3://{bucket}/out", options)
    with connect(f"s3://{bucket}/out", options) as db:  # the output's format check passes with _index/ there
        assert recall_at_10(db, index, ids[::500]) >= 0.9
    committed(location, "20261202T000001Z-bbbbbb", 20, seed=7, start=5000)
    message = open_index(f"s3://{bucket}/out", options).stale_message()
    assert f"resnet-pipeline index s3://{bucket}/out" in message
    assert secret not in message + fs.cat_file(f"{bucket}/out/{FOLDER}/{RECORD}").decode()


def test_a_small_output_is_searched_exactly_through_its_lance_dataset(tmp_path):
    location = OutputLocation.open(str(tmp_path / "out"))
    ids = committed(location, "20261202T000000Z-aaaaaa", 300, seed=8)
    assert build(location).num_partitions == 0  # too few rows to train IVF-PQ on
    with connect(location) as db:
        assert recall_at_10(db, open_index(location), ids[::30]) == 1.0
