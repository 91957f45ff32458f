"""What a run refuses before any work, naming the field: an output inside its input, a Parquet input without its
image column, resources no node of the cluster can hold."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.runner import PreflightError, check_resources, preflight
from pipeline.samples import VARIANTS, photo
from pipeline.sources import InputError
from pipeline.spec import parse_spec
from pipeline.storage import is_within

SMALL = {"model": {"depth": 18, "weights": "random"}, "decode": {"image_size": 64}}
GIB = 2**30


def spec(input_url: str, output_url: str, **sections):
    return parse_spec({"input": input_url, "output": output_url, **SMALL, **sections})


def images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.jpg").write_bytes(VARIANTS["small.jpg"](photo("china.jpg")))
    return folder


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=300)


# --- an output inside its input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["same", "inside", "inside, by a relative path", "inside, through a link"])
def test_an_output_inside_its_input_is_refused_naming_both(tmp_path, monkeypatch, where):
    source = images(tmp_path / "in")
    output = {
        "same": str(source),
        "inside": f"{source}/labels",
        "inside, by a relative path": "in/labels",
        "inside, through a link": str(tmp_path / "link" / "labels"),
    }[where]
    (tmp_path / "link").symlink_to(source)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PreflightError, match=r"^output\.url: .* is inside the input") as refused:
        preflight(spec(str(source), output))
    assert output in str(refused.value) and str(source) in str(refused.value)


def test_an_output_beside_the_input_is_fine(tmp_path):
    source = images(tmp_path / "in")
    assert len(preflight(spec(str(source), str(tmp_path / "in-labels"))).shards) == 1  # a shared prefix is not a folder
    assert len(preflight(spec(f"{source}/*.jpg", str(tmp_path / "labels"))).shards) == 1


@pytest.mark.parametrize(
    ("inner", "outer", "within"),
    [
        ("s3://bucket/in/labels", "s3://bucket/in/", True),
        ("s3://bucket/in", "s3://bucket/in/*.jpg", True),  # a glob searches its folder
        ("s3://bucket/in-labels", "s3://bucket/in", False),
        ("s3://other/in/labels", "s3://bucket/in", False),
        ("gs://bucket/in/labels", "s3://bucket/in", False),
    ],
)
def test_which_urls_lie_inside_others(inner, outer, within):
    assert is_within(inner, {}, outer, {}) is within


def test_the_same_path_on_two_endpoints_is_two_places():
    assert not is_within("s3://b/in/x", {"endpoint_url": "http://a:9000"}, "s3://b/in", {"endpoint_url": "http://b"})


@pytest.mark.slow
def test_the_cli_refuses_an_output_inside_the_input_before_any_work(tmp_path):
    source = images(tmp_path / "in")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"input": str(source), "output": str(source / "labels"), **SMALL}))
    result = cli("run", str(job))
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"output.url: {source / 'labels'} is inside the input {source}" in result.stderr
    assert sorted(p.name for p in source.iterdir()) == ["a.jpg"]  # nothing written into the input


# --- Parquet inputs without their columns -------------------------------------------------------------------------


def parquet_file(path: Path, columns: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


@pytest.mark.parametrize(
    ("columns", "options", "message"),
    [
        ({"picture": [b"x"], "id": ["a"]}, {}, r"input\.image_column: .* has no image column: set input\.image_column"),
        ({"image": [b"x"]}, {"image_column": "jpg"}, r"input\.image_column: .* has no image column 'jpg'"),
        ({"image": [b"x"]}, {"id_column": "name"}, r"input\.id_column: .* has no id column 'name' \(columns: image\)"),
    ],
)
def test_a_parquet_input_without_its_columns_is_refused(tmp_path, columns, options, message):
    path = parquet_file(tmp_path / "in" / "part-0.parquet", columns)
    with pytest.raises(InputError, match=message):
        preflight(spec(str(path.parent), str(tmp_path / "out"), input={"url": str(path.parent), **options}))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_cli_stops_with_exit_2_on_a_parquet_input_without_an_image_column(tmp_path):
    path = parquet_file(tmp_path / "in" / "part-0.parquet", {"picture": [b"x", b"y"], "key": ["a", "b"]})
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"input": str(path.parent), "output": str(tmp_path / "out"), **SMALL}))
    result = cli("run", str(job))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "input.image_column:" in result.stderr and "columns: picture, key" in result.stderr
    assert "Traceback" not in result.stderr and "Ray" not in result.stderr  # stopped before Ray started
    assert not (tmp_path / "out").exists()


# --- resources no node can hold -----------------------------------------------------------------------------------

LAPTOP = [{"CPU": 2.0, "memory": 16.0 * GIB, "object_store_memory": 4.0 * GIB}]


def job(**inference):
    return spec("/in", "/out", inference=inference)


@pytest.mark.parametrize(
    ("inference", "message"),
    [
        ({"actor_memory_gb": 100000}, r"^inference\.actor_memory_gb: a model actor asks for 1 CPUs, 100000\.0 GiB"),
        ({"gpus_per_actor": 1}, r"^inference\.gpus_per_actor: .*the largest: 2 CPUs, 16\.0 GiB of memory; 1 node"),
        ({"cpus_per_actor": 4}, r"^inference\.cpus_per_actor: a model actor asks for 4 CPUs"),
        ({"actors": {"min": 3, "max": 3}}, r"^inference\.actors\.min: 3 model actors of .* the cluster; it holds 2"),
        ({"cpus_per_actor": 2}, r"^inference\.cpus_per_actor: 1 model actor\(s\) of 2 CPUs leave 0 of the cluster"),
    ],
)
def test_resources_no_node_can_hold_are_refused_naming_the_field(inference, message):
    with pytest.raises(PreflightError, match=message):
        check_resources(job(**inference), LAPTOP, [])


def test_a_decode_task_larger_than_any_node_is_refused():
    with pytest.raises(PreflightError, match=r"^decode\.cpus_per_task: a decode task asks for 3 CPUs"):
        check_resources(spec("/in", "/out", decode={"cpus_per_task": 3}), LAPTOP, [])


def test_what_fits_passes():
    check_resources(job(), LAPTOP, [])
    check_resources(job(actors={"min": 1, "max": 8}), LAPTOP, [])  # the pool grows as far as it can
    check_resources(job(gpus_per_actor=1), [*LAPTOP, {"CPU": 8.0, "GPU": 1.0, "memory": 60.0 * GIB}], [])


def test_a_cluster_that_can_add_a_node_that_fits_passes_and_one_that_cannot_is_refused():
    gpu_nodes = [{"CPU": 8.0, "GPU": 1.0, "memory": float("inf")}]  # a node type that leaves its memory unsaid
    check_resources(job(gpus_per_actor=1, actors={"min": 4, "max": 4}), LAPTOP, gpu_nodes)
    with pytest.raises(PreflightError, match=r"^inference\.gpus_per_actor"):
        check_resources(job(gpus_per_actor=2), LAPTOP, gpu_nodes)


def test_where_the_cluster_may_add_unknown_nodes_a_misfit_is_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.runner"):
        check_resources(job(gpus_per_actor=1), LAPTOP, None)
    assert "inference.gpus_per_actor" in caplog.text and "waiting for the cluster to add a node" in caplog.text


@pytest.mark.slow
def test_the_cli_refuses_an_actor_larger_than_the_local_cluster(tmp_path):
    source = images(tmp_path / "in")
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump({"input": str(source), "output": str(tmp_path / "out"), **SMALL}))
    result = cli("run", str(job_file), "--set", "inference.actor_memory_gb=100000", "--quiet")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "inference.actor_memory_gb: a model actor asks for 1 CPUs, 100000.0 GiB of memory" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "out").glob("predictions/run_id=*")) and not (tmp_path / "out" / "_staging").exists()
