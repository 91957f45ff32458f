"""The pipeline end to end on a real local Ray cluster: every layout, local and S3, rows checked against the model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections import Counter
from dataclasses import replace
from pathlib import Path

import duckdb
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.decode import decode
from pipeline.manifest import Counts, Manifest, PlanSummary
from pipeline.model import caffe_preprocess
from pipeline.query import dataset
from pipeline.runner import run
from pipeline.runs import OutputLocation, new_run_id
from pipeline.samples import BAD_FILES, PHOTOS, VARIANTS, photo, write_samples
from pipeline.sink import file_schema, output_schema
from pipeline.spec import parse_spec
from pipeline.tables import read_manifests
from tests.clusters import clean_environment, ray_head
from tests.layouts import LAYOUTS, write_layout

pytestmark = pytest.mark.slow

SMALL = [  # ResNet-18 on 64x64 crops: the pipeline's behaviour, at a fraction of ResNet-50's cost
    "model.depth=18",
    "model.weights=random",
    "model.seed=3",
    "model.top_k=3",
    "decode.image_size=64",
    "inference.batch_size=4",
]


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def direct_model():
    from pipeline.model import create_model

    return create_model("resnet18", weights="random", seed=3, input_shape=(64, 64, 3), with_embedding=True)


def read_rows(result, storage_options=None) -> list[dict]:
    """The run's committed rows, read from the predictions table as any Delta reader does."""
    import pyarrow.dataset as ds

    rows = dataset(result.output_url, storage_options).to_table(filter=ds.field("run_id") == result.run_id)
    assert rows.schema.names == output_schema().names
    return rows.to_pylist()


def relative_error(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("samples")
    paths = write_samples(folder / "images")
    spec = parse_spec({"input": str(folder / "images"), "output": str(folder / "out")}, SMALL)
    return paths, run(spec, progress=False)


def test_every_image_has_one_row_that_matches_the_model(sample_run, direct_model):
    paths, result = sample_run
    rows = read_rows(result)
    assert sorted(row["image_id"] for row in rows) == sorted(str(p) for p in paths)  # one row each, none lost
    assert result.rows == len(paths) and result.error == len(BAD_FILES)
    assert {row["model_fingerprint"] for row in rows} == {direct_model.weights_info.fingerprint}

    checked = 0
    for row in rows:
        if row["status"] != "ok":
            continue
        pixels, width, height = decode(Path(row["image_id"]).read_bytes(), "crop", size=64)
        expected = direct_model.predict(np.asarray(caffe_preprocess(pixels[None])), verbose=0)
        assert relative_error(row["embedding"], expected["embedding"][0]) < 1e-4, row["image_id"]
        scores = expected["predictions"][0]
        assert row["class_id"] == int(np.argmax(scores))
        assert row["top_k"][0]["class_id"] == row["class_id"]
        np.testing.assert_allclose([c["score"] for c in row["top_k"]], np.sort(scores)[::-1][:3], rtol=1e-3)
        assert (row["width"], row["height"]) == (width, height)
        checked += 1
    assert checked == len(VARIANTS) * len(PHOTOS)


def test_the_model_stage_runs_on_jax(tmp_path, direct_model):
    """``inference.backend: jax`` (the Keras backend on JAX-only GPU images): the actors compile with jax.jit and
    give the rows the TensorFlow model gives."""
    paths = write_samples(tmp_path / "images", include_bad=False, photos=PHOTOS[:1])
    spec = parse_spec(
        {"input": str(tmp_path / "images"), "output": str(tmp_path / "out")}, [*SMALL, "inference.backend=jax"]
    )
    result = run(spec, progress=False)
    rows = read_rows(result)
    assert len(rows) == len(paths) and all(row["status"] == "ok" for row in rows)
    (manifest,) = [m for m in read_manifests(OutputLocation.open(result.output_url)) if m.run_id == result.run_id]
    assert [actor["backend"] for actor in manifest.actors] == ["jax"]
    for row in rows:
        pixels, _, _ = decode(Path(row["image_id"]).read_bytes(), "crop", size=64)
        expected = direct_model.predict(np.asarray(caffe_preprocess(pixels[None])), verbose=0)
        assert relative_error(row["embedding"], expected["embedding"][0]) < 1e-3, row["image_id"]
        assert row["class_id"] == int(np.argmax(expected["predictions"][0]))


def test_bad_images_become_error_rows_with_reasons(sample_run):
    _, result = sample_run
    rows = {Path(row["image_id"]).name: row for row in read_rows(result)}
    expected = {
        "bad-empty.jpg": "empty file",
        "bad-html-page.jpg": "not a readable image",
        "bad-random-bytes.png": "not a readable image",
        "bad-huge-header.png": "too large",
        "bad-truncated.jpg": "corrupt image data",
        "bad-broken-crc.png": "corrupt image data",
    }
    assert set(expected) == {f"bad-{name}" for name in BAD_FILES}
    for name, reason in expected.items():
        row = rows[name]
        assert row["status"] == "error" and reason in row["error"], (name, row["error"])
        for column in ("label", "class_id", "score", "top_k", "embedding", "width", "height"):
            assert row[column] is None, (name, column)
    good = [row for row in rows.values() if row["status"] == "ok"]
    assert all(row["error"] is None and len(row["embedding"]) == 512 for row in good)
    assert rows["china-exif-rotated.jpg"]["width"] == 640 and rows["china-exif-rotated.jpg"]["height"] == 427
    assert rows["flower-one-pixel.png"]["status"] == "ok"


def test_output_contract_files_and_manifest(sample_run):
    _, result = sample_run
    location = OutputLocation.open(result.output_url)
    (manifest,) = read_manifests(location)
    good, bad = len(VARIANTS) * len(PHOTOS), len(BAD_FILES)
    (path,) = Path(location.root, "predictions").glob("run_id=*/*.parquet")  # 34 rows in batches of 4: one file
    table = pq.read_table(path)
    assert table.schema.equals(file_schema())  # the run id is the commit's partition value
    assert not Path(location.root, "_staging").exists()

    assert manifest.counts == Counts(rows=good + bad, ok=good, error=bad)
    assert manifest.model.fingerprint == table.column("model_fingerprint")[0].as_py()
    assert manifest.model.random_weights is True
    assert manifest.plan == PlanSummary("full", listed=good + bad, to_read=good + bad)
    # The manifest as stored in the run's Delta commit: plain JSON, read back into the same typed record.
    from deltalake import DeltaTable

    (commit,) = [c for c in DeltaTable(location.path("predictions")).history() if c.get("resnet_pipeline.run_id")]
    stored = json.loads(commit["resnet_pipeline.manifest"])
    assert commit["version"] == manifest.version == result.version == 1
    assert stored["plan"]["adopted_from"] == [] and Manifest.from_json(stored) == replace(
        manifest, version=None, committed_at=None
    )
    shards = dataset(location, table="shards").to_table().to_pylist()
    assert len(shards) == good + bad and all(s["size"] is not None and s["etag"] for s in shards)
    assert all(s["rows"] == 1 and not s["partial"] for s in shards)
    assert manifest.model.key and manifest.model.key_parts["image_size"] == 64
    for stage in ("list", "ray_init", "read", "decode", "predict", "model_startup", "pipeline"):
        assert manifest.stage_seconds[stage]["seconds"] >= 0, stage
    stages = manifest.stage_seconds
    assert stages["predict"]["items"] == good
    for stage in ("decode", "predict"):  # spans within the time of the Ray plan
        assert 0 <= stages[stage]["started_s"] <= stages[stage]["started_s"] + stages[stage]["span_seconds"]
        assert stages[stage]["started_s"] + stages[stage]["span_seconds"] <= stages["pipeline"]["seconds"] + 1
    actors = manifest.actors
    assert actors and all(a["backend"] == "tensorflow" and "/device:CPU:0" in a["devices"][0] for a in actors)
    assert all(a["batches_at_once"] == 2 for a in actors)  # one per core of the 2-CPU local cluster
    # Forward passes side by side: their summed time fits in the span only twice over.
    assert stages["predict"]["seconds"] <= 2 * len(actors) * stages["predict"]["span_seconds"] + 0.01

    rows = dataset(location).to_table()  # noqa: F841 (read by DuckDB below)
    statuses = duckdb.sql(
        "SELECT status, count(*) AS n, count(embedding) AS with_embedding FROM rows GROUP BY status ORDER BY status"
    ).fetchall()
    assert statuses == [("error", bad, 0), ("ok", good, good)]


@pytest.fixture(scope="module")
def layout_images() -> dict[str, bytes]:
    picture = photo(PHOTOS[1])
    images = {name: VARIANTS[name](picture) for name in ("photo.jpg", "photo.png", "gray.jpg", "cmyk.jpg", "small.jpg")}
    images["broken.jpg"] = BAD_FILES["truncated.jpg"](picture)
    return images


def check_layout_run(result, expected: dict[str, bytes], storage_options=None):
    rows = read_rows(result, storage_options)
    assert sorted(row["image_id"] for row in rows) == sorted(expected)
    by_id = {row["image_id"]: row for row in rows}
    broken = [image_id for image_id in expected if image_id.endswith("broken.jpg")]
    assert [by_id[i]["status"] for i in broken] == ["error"]
    assert sum(row["status"] == "ok" for row in rows) == len(expected) - 1


@pytest.mark.parametrize("layout", [layout for layout in LAYOUTS if layout != "images"])
def test_local_layouts(layout, layout_images, tmp_path):
    fs = fsspec.filesystem("file", auto_mkdir=True)
    expected = write_layout(layout, fs, str(tmp_path / "in"), str(tmp_path / "in"), layout_images)
    spec = parse_spec({"input": str(tmp_path / "in"), "output": str(tmp_path / "out")}, SMALL)
    check_layout_run(run(spec, progress=False), expected)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_s3_layouts(layout, layout_images, s3):
    fs, bucket, storage_options = s3
    expected = write_layout(layout, fs, f"{bucket}/in", f"s3://{bucket}/in", layout_images)
    # Credentials given in the spec (as some users will) are used but never written out.
    options = {**storage_options, "key": "testing", "secret": "do-not-leak-this"}
    spec = parse_spec(
        {
            "input": {"url": f"s3://{bucket}/in/", "storage_options": options},
            "output": {"url": f"s3://{bucket}/out", "storage_options": options, "embedding_dtype": "float16"},
        },
        [*SMALL, "output.rows_per_file=2"],
    )
    result = run(spec, progress=False)
    check_layout_run(result, expected, storage_options)
    assert result.output_url == f"s3://{bucket}/out"
    (manifest,) = read_manifests(OutputLocation.open(result.output_url, storage_options))
    assert not any(b"do-not-leak-this" in fs.cat_file(path) for path in fs.find(f"{bucket}/out"))
    assert manifest.spec["output"]["storage_options"]["secret"] == "***"
    files = fs.glob(f"{bucket}/out/predictions/run_id={result.run_id}/*.parquet")
    assert len(files) >= 2  # rows_per_file=2 over 6 rows
    with fs.open(files[0], "rb") as f:
        parquet = pq.ParquetFile(f)
        table = parquet.read()
        physical = {parquet.schema.column(i).physical_type for i in range(len(parquet.schema))}
    # float16 embeddings are stored as float32 values rounded to half precision: every engine reads them (Spark
    # cannot read Parquet's FLOAT16), and compressed they take about what float16 would.
    embedding = table.schema.field("embedding").type
    assert pa.types.is_list(embedding) and pa.types.is_float32(embedding.value_type)
    assert {len(v) for v in table.column("embedding").to_pylist() if v is not None} == {512}
    assert "FIXED_LEN_BYTE_ARRAY" not in physical  # how Parquet stores FLOAT16
    values = np.asarray(table.column("embedding").combine_chunks().flatten())
    assert np.array_equal(values, values.astype(np.float16).astype(np.float32))
    assert not fs.exists(f"{bucket}/out/_staging/{result.run_id}")
    assert fs.exists(f"{bucket}/out/predictions/_delta_log/00000000000000000001.json")


def test_gpu_scheduling_path_on_a_cpu_machine(tmp_path):
    """A local cluster that declares one logical GPU: the actor asks for it, gets it, and TensorFlow runs on the
    CPU (there is no device), which is the code path a GPU cluster takes."""
    write_samples(tmp_path / "images", include_bad=False, photos=PHOTOS[:1])
    script = textwrap.dedent(
        f"""
        import json, ray
        from pipeline.runner import run
        from pipeline.spec import parse_spec
        ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="ERROR")
        spec = parse_spec({{"input": "{tmp_path}/images", "output": "{tmp_path}/out"}},
                          {SMALL!r} + ["inference.gpus_per_actor=1"])
        result = run(spec, progress=False)
        print("RESULT", json.dumps({{"rows": result.rows}}))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'RESULT {"rows": 14}' in done.stdout
    (manifest,) = read_manifests(OutputLocation.open(str(tmp_path / "out")))
    assert [actor["gpu_ids"] for actor in manifest.actors] == [["0"]]
    assert manifest.spec["inference"]["gpus_per_actor"] == 1


def test_a_killed_predictor_is_replaced_and_nothing_is_lost(tmp_path):
    """SIGKILL the model actor's process mid-run: Ray starts a new one, its batches are retried, and every input
    still ends as exactly one row."""
    import os
    import shutil
    import signal
    import threading
    import time

    import psutil

    source = write_samples(tmp_path / "samples", include_bad=False, photos=PHOTOS[:1])
    images = tmp_path / "images"
    images.mkdir()
    for i in range(40):  # 560 images: long enough to kill the actor while it works
        for path in source:
            shutil.copy(path, images / f"{i:02d}-{path.name}")
    # One file per batch: the first file staged says the actor is past its start-up and predicting, on a machine
    # of any speed. ResNet-50 at 112 pixels: batches slow enough that dozens are left to do when it is killed.
    spec = parse_spec(
        {"input": str(images), "output": str(tmp_path / "out")},
        [
            "model.depth=50",
            "model.weights=random",
            "decode.image_size=112",
            "inference.batch_size=8",
            "output.rows_per_file=8",
        ],
    )
    run_id = new_run_id()
    staging = Path(OutputLocation.open(str(tmp_path / "out")).staging(run_id))
    outcome = {}
    worker = threading.Thread(
        target=lambda: outcome.update(result=run(spec, progress=False, run_id=run_id)), daemon=True
    )
    worker.start()

    def predictor_processes():  # of the local cluster this test's run started: never another's on the machine
        ours = psutil.Process().children(recursive=True)
        return [p for p in ours if "MapBatches(Predictor)" in " ".join(_cmdline(p))]

    deadline = time.monotonic() + 120
    while not predictor_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    (victim,) = predictor_processes()
    while not list(staging.glob("_files/*.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker.is_alive(), "the run finished before the actor could be killed; make it longer"
    os.kill(victim.pid, signal.SIGKILL)
    worker.join(timeout=300)

    result = outcome["result"]
    rows = read_rows(result)
    ids = [row["image_id"] for row in rows]
    assert len(ids) == len(set(ids)) == 40 * len(source)
    assert all(row["status"] == "ok" for row in rows)
    (manifest,) = read_manifests(OutputLocation.open(result.output_url))
    assert len(manifest.actors) == 2  # the killed one and its replacement


def _cmdline(process) -> list[str]:
    import psutil

    try:
        return process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def _on_a_local_cluster(script: str, env: dict[str, str] | None = None) -> list[str]:
    """Run ``script`` in a fresh process (it starts the runner's local cluster) and return what it printed after
    RESULT: a setting of the local cluster must be seen by the processes Ray starts, not by this test's own."""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split("RESULT")[1].split()


def test_workers_of_a_local_cluster_give_written_memory_back(tmp_path):
    """A worker that wrote a Parquet file keeps no more than a fraction of it (Arrow's allocator would otherwise
    hold about five times the file's size until the worker exits, which showed as memory growing with the run)."""
    script = textwrap.dedent(
        f"""
        import ray
        from pipeline.runner import _init_ray
        _init_ray(None)

        @ray.remote
        def write_a_file():
            import os, time, numpy as np, psutil, pyarrow as pa, pyarrow.dataset as ds
            rows = 4000  # a default output file: 2048 float32 per row, about 32 MB
            embedding = pa.FixedSizeListArray.from_arrays(pa.array(np.random.rand(rows * 2048).astype("f4")), 2048)
            tables = [pa.table({{"embedding": embedding.slice(i, 32)}}) for i in range(0, rows, 32)]
            before = psutil.Process().memory_info().rss
            ds.write_dataset(tables, "{tmp_path}", format="parquet", min_rows_per_group=rows,
                              max_rows_per_group=rows, max_rows_per_file=rows)
            time.sleep(1)
            return os.environ.get("MIMALLOC_PURGE_DELAY"), (psutil.Process().memory_info().rss - before) >> 20

        print("RESULT", *ray.get(write_a_file.remote()))
        """
    )
    setting, kept_mib = _on_a_local_cluster(script)
    assert setting == "0"
    assert int(kept_mib) < 60, f"the worker kept {kept_mib} MiB after writing a 32 MB file"


def test_the_log_monitor_of_a_local_cluster_lists_its_folder_less_often():
    """Ray's log monitor lists the log folder ten times a second unless told otherwise, which on a 2-core machine
    takes CPU from the model; the local cluster the runner starts tells it."""
    script = textwrap.dedent(
        """
        import psutil
        from pipeline.runner import _init_ray
        _init_ray(None)
        (monitor,) = [p for p in psutil.Process().children(recursive=True) if "log_monitor" in " ".join(p.cmdline())]
        print("RESULT", monitor.environ().get("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD"))
        """
    )
    assert _on_a_local_cluster(script) == ["0"]


def test_a_run_without_an_address_starts_its_own_cluster_even_beside_a_running_one():
    """`ray start` leaves the address of its cluster in its temp folder, where ray.init(address=None) looks (the
    default folder, or the one RAY_TMPDIR names) and joins it: someone else's cluster, maybe with a token."""
    system_temp = Path(tempfile.mkdtemp(prefix="rp-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    # `ray start` as a user runs it: its temp folder is <system temp>/ray, where ray.init looks for an address file.
    options = ("--num-cpus=1", "--include-dashboard=false")
    with ray_head(clean_environment(), *options, temp_dir=system_temp / "ray") as head:
        env = clean_environment(RAY_TMPDIR=str(system_temp))
        script = textwrap.dedent(
            """
            import ray
            from pipeline.runner import _init_ray
            _init_ray(None)
            print("RESULT", ray.get_runtime_context().gcs_address)
            """
        )
        (joined,) = _on_a_local_cluster(script, env)
    shutil.rmtree(system_temp, ignore_errors=True)
    assert joined.rsplit(":", 1)[1] != str(head.ports["port"]), "the run joined the cluster `ray start` left running"


def test_the_run_sink_writes_files_of_the_size_asked_and_describes_them_as_written(tmp_path):
    import ray

    from pipeline.runs import staged_files
    from pipeline.writer import RunSink
    from tests.test_runs import rows

    location = OutputLocation.open(str(tmp_path / "out"))
    table = pa.concat_tables(
        [rows("r1", [f"/i/{i}.jpg" for i in range(7)]), rows("r1", [f"/i/{i}.jpg" for i in range(7, 10)], "error")]
    )
    sink = RunSink(location, "r1", rows_per_file=4, schema=table.schema)
    ray.data.from_arrow([table.slice(0, 3), table.slice(3, 3), table.slice(6)]).write_datasink(sink)

    written = sorted(sink.written, key=lambda file: file.path)
    assert sum(file.rows for file in written) == 10 and all(file.rows <= 4 for file in written)
    folder = Path(location.root, "predictions")
    for file in written:  # what the sink says of each file is what the file holds
        stored = pq.read_table(folder / file.path)
        assert stored.schema.equals(file_schema()) and stored.num_rows == file.rows
        assert file.size == (folder / file.path).stat().st_size
        assert file.ok == stored.column("status").to_pylist().count("ok") and file.fingerprints == ("f" * 64,)
        assert dict(file.sources) == dict(Counter(stored.column("source").to_pylist()))
        assert json.loads(file.stats)["numRecords"] == file.rows
    assert sorted(p.name for p in folder.glob("run_id=r1/*.parquet")) == sorted(Path(f.path).name for f in written)
    assert staged_files(location, "r1") == written  # the records a rerun adopts by
    ids = pa.concat_tables(pq.read_table(folder / file.path) for file in written).column("image_id").to_pylist()
    assert sorted(ids) == sorted(table.column("image_id").to_pylist())
