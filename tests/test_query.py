"""Queries over outputs the pipeline itself wrote (local disk and moto's S3 server): views, label search, similar
images, reports; through the Python API and the CLI."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from io import BytesIO

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.query import Query, QueryError, connect, export, fetch_arrow, search, similar
from pipeline.report import report, to_html
from pipeline.runner import run
from pipeline.samples import VARIANTS, photo
from pipeline.spec import parse_spec

pytestmark = pytest.mark.slow

SMALL = {
    "model": {"depth": 18, "weights": "random", "seed": 11, "top_k": 5},
    "decode": {"image_size": 64},
    "inference": {"batch_size": 4},
}
MARKUP = "[x] :x: [/b] markup.jpg"  # a folder "[x] :x: [" holding "b] markup.jpg": the image id reads [/b]


def jpeg(image: Image.Image) -> bytes:
    buffer = BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def corpus() -> dict[str, bytes]:
    """A photo, a resized copy of it, and unrelated pictures (another photo's variants, flat colours, noise)."""
    import numpy as np

    china, flower = photo("china.jpg"), photo("flower.jpg")
    images = {
        "china.jpg": jpeg(china),
        "china-resized.jpg": jpeg(china.resize((china.width * 3 // 4, china.height * 3 // 4))),
        "broken.jpg": b"not an image",
    }
    for name in ("photo.jpg", "gray.jpg", "cmyk.jpg", "exif-rotated.jpg", "small.jpg"):
        images[f"flower-{name}"] = VARIANTS[name](flower)
    rng = np.random.default_rng(0)
    for index in range(4):
        images[f"noise-{index}.jpg"] = jpeg(Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)))
        images[f"flat-{index}.jpg"] = jpeg(Image.new("RGB", (80, 60), ((60 * index) % 256, 120, 200 - 40 * index)))
    images[MARKUP] = jpeg(Image.new("RGB", (70, 50), (230, 30, 90)))
    return images


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    """A local output with two committed runs (the second relabels two images) and a crashed, uncommitted one."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    root = tmp_path_factory.mktemp("query")
    images = corpus()
    (root / "in").mkdir()
    for name, data in images.items():
        (root / "in" / name).parent.mkdir(exist_ok=True)
        (root / "in" / name).write_bytes(data)
    out = str(root / "out")
    first = run(parse_spec({"input": str(root / "in"), "output": out, **SMALL}), progress=False)
    second = run(
        parse_spec({"input": f"{root}/in/flat-[01].jpg", "output": out, **SMALL}),
        progress=False,
    )
    crashed = "20260101T000000Z-dead00"
    (root / "out" / "_staging" / crashed).mkdir(parents=True)
    (root / "out" / "predictions" / f"run_id={crashed}").mkdir()
    for path in (root / "out" / "predictions" / f"run_id={first.run_id}").glob("*.parquet"):
        # Rows no commit holds, beside the table's own files
        (root / "out" / "predictions" / f"run_id={crashed}" / path.name).write_bytes(path.read_bytes())
    yield {"out": out, "root": root, "images": images, "first": first, "second": second}
    ray.shutdown()


def test_views_see_committed_runs_and_latest_has_one_row_per_image(labeled):
    out, first, second = labeled["out"], labeled["first"], labeled["second"]
    with connect(out) as db:
        assert db.execute("SELECT count(*) FROM predictions").fetchone()[0] == first.rows + second.rows
        assert db.execute("SELECT count(*), count(DISTINCT image_id) FROM latest").fetchone() == (first.rows,) * 2
        newest = dict(db.execute("SELECT image_id, run_id FROM latest").fetchall())
        assert sorted(run for run in newest.values()) == sorted([first.run_id] * (first.rows - 2) + [second.run_id] * 2)
        assert db.execute("SELECT run_id FROM runs ORDER BY seq").fetchall() == [(first.run_id,), (second.run_id,)]
        assert db.execute("SELECT image_id, error FROM errors").fetchall()[0][0].endswith("broken.jpg")
        dimension = db.execute("SELECT any_value(typeof(embedding)), max(len(embedding)) FROM predictions").fetchone()
    assert dimension == ("FLOAT[]", 512)


def test_label_search_by_name_and_by_wordnet_id(labeled):
    with connect(labeled["out"]) as db:
        latest = {r["image_id"]: r for r in fetch_arrow(db, "SELECT * FROM latest").to_pylist()}
        most_common = db.execute("SELECT label, count(*) AS n FROM latest GROUP BY label ORDER BY n DESC").fetchone()
        label = most_common[0]
        wnid = next(r["top_k"][0]["wnid"] for r in latest.values() if r["label"] == label)
        by_name = search(db, label).column("image_id").to_pylist()
        by_wnid = search(db, wnid).column("image_id").to_pylist()
        in_top3 = set(search(db, label, in_top_k=3).column("image_id").to_pylist())
        high = search(db, label, in_top_k=3, min_score=0.5).to_pylist()
        with pytest.raises(QueryError, match=r"no image in this output carries the label 'tenchh'.*tench"):
            search(db, "tenchh")
    expected_top1 = {i for i, r in latest.items() if r["status"] == "ok" and r["top_k"][0]["wnid"] == wnid}
    expected_top3 = {
        i for i, r in latest.items() if r["status"] == "ok" and wnid in [t["wnid"] for t in r["top_k"][:3]]
    }
    assert set(by_name) == set(by_wnid) == expected_top1 and by_name
    assert in_top3 == expected_top3
    assert all(row["score"] >= 0.5 for row in high)


def test_similar_returns_the_image_first_and_its_resized_copy_next(labeled):
    base = str(labeled["root"] / "in")
    with connect(labeled["out"]) as db:
        nearest = similar(db, f"{base}/china.jpg", k=5).to_pylist()
        with pytest.raises(QueryError, match="no image"):
            similar(db, f"{base}/nope.jpg")
        with pytest.raises(QueryError, match="no embedding"):
            similar(db, f"{base}/broken.jpg")
    assert [row["image_id"] for row in nearest[:2]] == [f"{base}/china.jpg", f"{base}/china-resized.jpg"]
    assert nearest[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert nearest[1]["similarity"] > nearest[2]["similarity"]


def test_report_counts_reasons_labels_and_renders_html_with_pictures(labeled):
    data = report(labeled["out"])
    images = labeled["images"]
    assert (data["images"], data["ok"], data["error"]) == (len(images), len(images) - 1, 1)
    assert [r["reason"] for r in data["error_reasons"]] == ["not a readable image"]
    assert sum(x["count"] for x in data["score_histogram"]) == len(images) - 1
    assert sum(x["count"] for x in data["top_labels"]) <= len(images) - 1 and data["top_labels"]
    assert [r["run_id"] for r in data["runs"]] == [labeled["first"].run_id, labeled["second"].run_id]
    one = report(labeled["out"], run_id=labeled["second"].run_id)
    assert (one["images"], one["runs"][0]["images"]) == (2, 2)
    with pytest.raises(QueryError, match="no committed run"):
        report(labeled["out"], run_id="20260101T000000Z-dead00")

    page = to_html(data)
    pictures = re.findall(r'<img alt="([^"]+)" src="data:image/svg\+xml;base64,([^"]+)"', page)
    assert [alt for alt, _ in pictures] == ["histogram of top-1 labels", "histogram of top-1 scores"]
    for _, encoded in pictures:
        svg = base64.b64decode(encoded).decode()
        assert svg.startswith("<svg") and svg.count("<rect") >= 1
    assert data["top_labels"][0]["label"] in base64.b64decode(pictures[0][1]).decode()
    assert "http" not in page.replace(labeled["out"], "")  # nothing to fetch: self-contained


def cli(*args: str) -> subprocess.CompletedProcess:
    """The command as a user runs it, on a terminal wide enough that no id in a table is folded."""
    env = {**os.environ, "COLUMNS": "1000"}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_cli_query_search_similar_report(labeled, tmp_path):
    out, base = labeled["out"], str(labeled["root"] / "in")
    result = cli("query", out, "SELECT count(*) AS n FROM latest", "--format", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"n": len(labeled["images"])}
    result = cli("query", out, "SELECT image_id, status FROM latest ORDER BY image_id", "--format", "csv")
    assert result.stdout.splitlines()[0] == "image_id,status" and len(result.stdout.splitlines()) == 1 + len(
        labeled["images"]
    )
    parquet = tmp_path / "latest.parquet"
    result = cli("query", out, "SELECT * FROM latest", "--format", "parquet", "-o", str(parquet))
    assert result.returncode == 0 and ds.dataset(parquet).count_rows() == len(labeled["images"])
    assert cli("query", out, "SELECT nope FROM latest").returncode == 2

    result = cli("similar", out, f"{base}/china.jpg", "-k", "3", "--format", "json")
    assert [json.loads(line)["image_id"] for line in result.stdout.splitlines()][:2] == [
        f"{base}/china.jpg",
        f"{base}/china-resized.jpg",
    ]
    result = cli("search", out, "--label", "no-such-label")
    assert result.returncode == 2 and "no image in this output carries" in result.stderr

    page = tmp_path / "report.html"
    result = cli("report", out, "--html", str(page))
    assert result.returncode == 0 and f"images  {len(labeled['images'])}" in result.stdout
    assert page.read_text().count("data:image/svg+xml;base64,") == 2


def test_queries_on_s3(s3, labeled):
    fs, bucket, storage_options = s3
    for path in (labeled["root"] / "in").iterdir():
        if path.is_file():
            fs.pipe_file(f"{bucket}/in/{path.name}", path.read_bytes())
    options = {**storage_options, "key": "testing", "secret": "testing"}
    spec = parse_spec(
        {
            "input": {"url": f"s3://{bucket}/in/", "storage_options": options},
            "output": {"url": f"s3://{bucket}/out", "storage_options": options},
            **SMALL,
        }
    )
    result = run(spec, progress=False)
    with connect(f"s3://{bucket}/out", options) as db:
        assert db.execute("SELECT count(*) FROM latest").fetchone()[0] == result.rows
        nearest = similar(db, f"s3://{bucket}/in/china.jpg", k=2).column("image_id").to_pylist()
    assert nearest == [f"s3://{bucket}/in/china.jpg", f"s3://{bucket}/in/china-resized.jpg"]
    assert report(f"s3://{bucket}/out", storage_options=options)["images"] == result.rows


def test_printed_values_are_data_never_markup_or_terminal_codes(labeled, tmp_path):
    out, image = labeled["out"], str(labeled["root"] / "in" / MARKUP)
    value = cli("query", out, "SELECT '[/b] :x: [x] ' || chr(27) || '[31m' AS v")
    assert value.returncode == 0, value.stderr
    assert "[/b] :x: [x] \\x1b[31m" in value.stdout  # the escape byte written out, not sent

    with connect(out) as db:
        (label,) = db.execute("SELECT label FROM latest WHERE image_id = $id", {"id": image}).fetchone()
    found = [cli("search", out, "--label", label), cli("similar", out, image, "-k", "2")]
    for result in found:
        assert result.returncode == 0, result.stderr
        assert image in result.stdout
    missing = image.replace("markup", "missing")
    failed = cli("similar", out, missing)
    assert failed.returncode == 2 and f"no image {missing!r} in this output" in failed.stderr

    odd = tmp_path / "out [/b] :x: [x]"  # report's text names the output (Delta's store takes no control characters)
    shutil.copytree(out, odd)
    reported = cli("report", str(odd))
    assert reported.returncode == 0, reported.stderr
    assert "out [/b] :x: [x]: latest result of every image" in reported.stdout
    for result in (value, *found, failed, reported):
        assert "\x1b" not in result.stdout + result.stderr and "\u274c" not in result.stdout  # no ESC, no emoji


def test_results_stream_into_files_and_a_table_shows_its_first_rows(labeled, tmp_path):
    out, many = labeled["out"], "SELECT range AS i FROM range(2000000)"
    shown = cli("query", out, "SELECT range AS i FROM range(5000)")
    assert shown.returncode == 0, shown.stderr
    assert "│ 999 │" in shown.stdout and "│ 1000 │" not in shown.stdout
    assert "(the first 1,000 rows; more were cut: every row with --format csv|json|parquet -o FILE)" in shown.stdout

    for safe, rows in (([], 2_000_000), (["--safe"], 200_000)):  # DuckDB's COPY; Arrow batches (may not COPY)
        sql = many.replace("2000000", str(rows))
        for output_format in ("csv", "json", "parquet"):
            path = tmp_path / f"it's {len(safe)}.{output_format}"  # a quote in the path
            result = cli("query", out, sql, "--format", output_format, "-o", str(path), *safe)
            assert result.returncode == 0, result.stderr
            if output_format == "parquet":
                assert pq.read_metadata(path).num_rows == rows
                continue
            lines = path.read_text().splitlines()
            if output_format == "csv":
                assert lines[:3] == ["i", "0", "1"] and len(lines) == 1 + rows
            else:
                assert [json.loads(line) for line in lines[:2]] == [{"i": 0}, {"i": 1}] and len(lines) == rows

    nested = tmp_path / "latest.json"
    result = cli("query", out, "SELECT image_id, top_k, embedding FROM latest", "--format", "json", "-o", str(nested))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in nested.read_text().splitlines()]  # JSON lines: one object per line
    assert len(records) == len(labeled["images"]) and {len(r["embedding"] or [0] * 512) for r in records} == {512}
    flat = tmp_path / "latest.csv"  # CSV leaves out the nested columns
    result = cli("query", out, "SELECT image_id, top_k, embedding FROM latest", "--format", "csv", "-o", str(flat))
    assert result.returncode == 0 and flat.read_text().splitlines()[0] == "image_id"

    image = str(labeled["root"] / "in" / "china.jpg")
    result = cli("similar", out, image, "-k", "3", "--format", "parquet", "-o", str(tmp_path / "similar.parquet"))
    assert result.returncode == 0, result.stderr
    with connect(out) as db:
        expected = similar(db, image, k=3).column("image_id").to_pylist()
        export(db, Query("SELECT $v AS v", {"v": "it's [/b]"}), "csv", tmp_path / "value.csv")
    assert pq.read_table(tmp_path / "similar.parquet").column("image_id").to_pylist() == expected
    assert (tmp_path / "value.csv").read_text() == "v\nit's [/b]\n"  # parameter values reach COPY as values


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM read_csv('/etc/passwd')",
        "COPY (SELECT 1) TO '{tmp}/x.csv'",
        "ATTACH '{tmp}/x.db'",
        "INSTALL httpfs",
        "SET enable_external_access = true",
    ],
)
def test_safe_queries_read_the_views_and_nothing_else(labeled, tmp_path, sql):
    result = cli("query", labeled["out"], sql.format(tmp=tmp_path), "--safe")
    assert result.returncode == 2 and result.stderr.startswith("query failed: "), result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_safe_queries_still_read_every_view(labeled):
    views = "SELECT (SELECT count(*) FROM latest) AS n, (SELECT count(*) FROM runs JOIN shards USING (run_id)) AS s"
    result = cli("query", labeled["out"], views, "--safe", "--format", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["n"] == len(labeled["images"])


def test_as_of_shows_the_output_as_it_was_after_an_earlier_run(labeled):
    out, first, second = labeled["out"], labeled["first"], labeled["second"]
    assert (first.version, second.version) == (1, 2)
    with connect(out, as_of=first.version) as db:
        assert db.execute("SELECT count(*) FROM predictions").fetchone()[0] == first.rows
        assert set(db.execute("SELECT DISTINCT run_id FROM latest").fetchall()) == {(first.run_id,)}
        assert db.execute("SELECT count(*) FROM latest").fetchone()[0] == first.rows
        assert db.execute("SELECT run_id FROM runs").fetchall() == [(first.run_id,)]
        assert {r[0] for r in db.execute("SELECT DISTINCT run_id FROM shards").fetchall()} == {first.run_id}
    with connect(out, as_of=second.version) as db:
        assert db.execute("SELECT count(DISTINCT run_id) FROM latest").fetchone()[0] == 2
    shown = cli("query", out, "SELECT count(*) AS n FROM predictions", "--as-of", str(first.version), "--format", "csv")
    assert shown.returncode == 0 and shown.stdout.split() == ["n", str(first.rows)], shown.stderr
    wrong = cli("query", out, "SELECT 1", "--as-of", "yesterday")
    assert wrong.returncode == 2 and "--as-of: 'yesterday' is neither a version number" in wrong.stderr
