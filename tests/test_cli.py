"""The command line, run as a user runs it: subprocesses of the installed entry points, each with its own Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pytest
import yaml
from deltalake import DeltaTable

from pipeline.runs import OutputLocation
from pipeline.samples import BAD_FILES, VARIANTS, photo, write_samples
from pipeline.tables import MANIFEST_KEY, RUN_KEY, read_manifests

SMALL = ["--set", "model.depth=18", "--set", "model.weights=random", "--set", "decode.image_size=64"]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=600, cwd=cwd
    )


def write_spec(path: Path, document: dict) -> Path:
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.mark.slow
def test_run_end_to_end(tmp_path):

    paths = write_samples(tmp_path / "images", photos=("flower.jpg",))
    spec = write_spec(tmp_path / "job.yaml", {"input": str(tmp_path / "images"), "output": str(tmp_path / "out")})
    result = cli("run", str(spec), *SMALL, "--set", "model.top_k=2", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{len(paths)} ({len(VARIANTS)} ok, {len(BAD_FILES)} failed)" in result.stdout
    assert "images/s" in result.stdout and str(tmp_path / "out") in result.stdout
    table = DeltaTable(str(tmp_path / "out" / "predictions")).to_pyarrow_table()
    assert table.num_rows == len(paths)
    assert {len(row) for row in table.column("top_k").to_pylist() if row} == {2}
    (commit,) = [c for c in DeltaTable(str(tmp_path / "out" / "predictions")).history() if c.get(RUN_KEY)]
    record = json.loads(commit[MANIFEST_KEY])
    assert record["spec"]["model"]["top_k"] == 2
    assert f"committed   version {commit['version']} of the Delta table" in result.stdout
    predict = record["stage_seconds"]["predict"]
    assert f"{predict['items'] / predict['span_seconds']:.1f} images/s once predicting" in result.stdout


@pytest.mark.slow
def test_demo_with_random_weights(tmp_path):
    workdir = tmp_path / "demo :x:"  # names are data: printed as they are, never read as Rich markup or emoji
    (workdir / "images").mkdir(parents=True)
    (workdir / "images" / "[x] :x: extra.jpg").write_bytes(VARIANTS["photo.jpg"](photo("flower.jpg")))
    result = cli("demo", "--workdir", str(workdir), *SMALL, "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "meaningless" in result.stderr  # a random run never passes for a real one
    for name in ("china-photo.jpg", "flower-exif-rotated.jpg", "bad-html-page.jpg", "[x] :x: extra.jpg"):
        assert name in result.stdout
    assert "error: empty file" in result.stdout
    good, bad = 2 * len(VARIANTS) + 1, len(BAD_FILES)
    assert f"{good + bad} ({good} ok, {bad} failed)" in result.stdout
    assert str(workdir / "output") in result.stdout  # the run's summary
    assert len(read_manifests(OutputLocation.open(str(workdir / "output")))) == 1


@pytest.mark.slow
def test_too_many_errors_fail_the_run_and_commit_nothing(tmp_path):
    write_samples(tmp_path / "images", photos=("flower.jpg",))  # 6 of 20 files are broken: 30 %
    spec = write_spec(tmp_path / "job.yaml", {"input": str(tmp_path / "images"), "output": str(tmp_path / "out")})
    result = cli("run", str(spec), *SMALL, "--set", "max_error_fraction=0.25", "--quiet")
    assert result.returncode == 1
    assert f"{len(BAD_FILES)} of {len(BAD_FILES) + len(VARIANTS)} images failed" in result.stderr
    assert "over max_error_fraction 25.0%" in result.stderr and "not committed" in result.stderr
    assert not (tmp_path / "out" / "_staging").exists()
    assert read_manifests(OutputLocation.open(str(tmp_path / "out"))) == []  # nothing committed
    assert not list((tmp_path / "out").glob("predictions/run_id=*/*.parquet"))  # and the files written are gone


@pytest.mark.slow
def test_a_model_that_fails_in_the_actor_fails_the_run_and_commits_nothing(tmp_path):
    import keras

    write_samples(tmp_path / "images", include_bad=False, photos=("flower.jpg",))
    weights = tmp_path / "other.weights.h5"
    keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3)).save_weights(weights)  # not a ResNet-18
    spec = write_spec(tmp_path / "job.yaml", {"input": str(tmp_path / "images"), "output": str(tmp_path / "out")})
    result = cli("run", str(spec), *SMALL, "--set", f"model.weights={weights}", "--quiet")
    assert result.returncode == 1
    assert f"run failed: {weights} does not fit resnet18" in result.stderr
    assert read_manifests(OutputLocation.open(str(tmp_path / "out"))) == []  # the tables exist, empty
    assert not list((tmp_path / "out").glob("predictions/run_id=*")) and not (tmp_path / "out" / "_staging").exists()


def test_demo_without_cached_imagenet_weights_says_how_to_continue(tmp_path):
    result = cli("demo", "--workdir", str(tmp_path / "demo"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "are not cached" in result.stderr
    assert "resnet-pipeline demo --download-weights" in result.stderr
    assert "--set model.weights=random" in result.stderr
    assert not (tmp_path / "demo" / "output").exists()  # stopped before any work


def test_a_download_that_cannot_work_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("RESNET_PIPELINE_WEIGHTS_URL", "http://127.0.0.1:9/keras/")  # nothing listens there
    result = cli("demo", "--workdir", str(tmp_path / "demo"), "--download-weights")
    assert result.returncode == 2
    assert "model.weights: Could not fetch weights from http://127.0.0.1:9/keras/resnet50_weights" in result.stderr
    assert "(md5 2cb95161c43110f7111970584f804107) into" in result.stderr  # and how to go on without a download
    assert "weights=random" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "demo" / "output").exists()


@pytest.mark.parametrize(
    ("document", "overrides", "message"),
    [
        ({"input": "IN", "output": "OUT", "model": {"topk": 3}}, [], "model.topk: unknown field"),
        ({"input": "IN"}, [], "output: Field required"),
        ({"input": "IN", "output": "OUT"}, ["inference.batch_size=big"], "inference.batch_size"),
        ({"input": "IN/missing", "output": "OUT"}, [], "input.url: nothing found at"),
        ({"input": "IN", "output": "OUT", "model": {"weights": "/no/such.h5"}}, [], "model.weights: Weights file"),
        ({"input": "IN", "output": "OUT", "model": {"weights": "imagenet"}}, [], "model.weights: The ImageNet"),
        ({"input": "IN", "output": "OUT"}, ["inference.backend=torch"], "inference.backend: Input should be"),
    ],
)
def test_bad_specs_stop_before_any_work(tmp_path, document, overrides, message):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(b"not even an image")
    text = yaml.safe_dump(document).replace("IN", str(tmp_path / "in")).replace("OUT", str(tmp_path / "out"))
    spec = tmp_path / "job.yaml"
    spec.write_text(text)
    result = cli("run", str(spec), *[arg for o in overrides for arg in ("--set", o)])
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_backend_that_is_not_installed_stops_before_any_work(tmp_path, monkeypatch):
    import importlib.util

    from pipeline.runner import PreflightError, preflight
    from pipeline.spec import parse_spec

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(b"not even an image")
    spec = parse_spec({"input": str(tmp_path / "in"), "output": str(tmp_path / "out")}, ["inference.backend=jax"])
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "jax" else find_spec(name, *a))
    with pytest.raises(PreflightError, match=r"inference\.backend: 'jax' needs the jax package"):
        preflight(spec)
    assert not (tmp_path / "out").exists()


def test_weights_commands(tmp_path, monkeypatch):
    monkeypatch.setenv("RESNET_PIPELINE_CACHE", str(tmp_path / "cache"))
    where = cli("weights", "where")
    assert where.returncode == 0 and where.stdout.strip() == str(tmp_path / "cache" / "weights")
    monkeypatch.setenv("RESNET_PIPELINE_WEIGHTS_URL", "http://127.0.0.1:9/keras/")
    fetch = cli("weights", "fetch", "101")
    assert fetch.returncode == 2 and "Traceback" not in fetch.stderr
    assert "Could not fetch weights from http://127.0.0.1:9/keras/resnet101_weights_tf_dim" in fetch.stderr
    basic = cli("weights", "fetch", "18")
    assert basic.returncode == 2 and "no published ImageNet weights for resnet18" in basic.stderr
    unknown = cli("weights", "fetch", "42")
    assert unknown.returncode == 2 and "depth must be one of [18, 34, 50, 101, 152], got 42" in unknown.stderr


def test_console_script_help():
    script = Path(sys.executable).with_name("resnet-pipeline")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in ("run", "demo", "weights"):
        assert command in result.stdout


@pytest.mark.slow
def test_two_runs_on_one_output_at_once_each_commit_their_own(tmp_path):
    """Concurrent runs get their own run id, staging folder and files: both commit, neither sees the other's rows."""
    for name in ("a", "b"):
        write_samples(tmp_path / name, include_bad=False, photos=("china.jpg",) if name == "a" else ("flower.jpg",))
    specs = [
        write_spec(tmp_path / f"{name}.yaml", {"input": str(tmp_path / name), "output": str(tmp_path / "out")})
        for name in ("a", "b")
    ]
    command = [sys.executable, "-m", "pipeline", "run", "--quiet", *SMALL]
    runs = [subprocess.Popen([*command, str(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE) for spec in specs]
    for process in runs:
        process.wait(timeout=600)
        assert process.returncode == 0, process.stderr.read().decode()[-3000:]

    manifests = read_manifests(OutputLocation.open(str(tmp_path / "out")))
    assert len(manifests) == 2 and manifests[0].run_id != manifests[1].run_id
    rows = DeltaTable(str(tmp_path / "out" / "predictions")).to_pyarrow_table()
    for manifest in manifests:
        table = rows.filter(pc.equal(rows.column("run_id"), manifest.run_id))
        sources = {Path(s).parent.name for s in table.column("source").to_pylist()}
        assert table.num_rows == len(VARIANTS) and len(sources) == 1  # one run's rows, all from its own input
    latest = DeltaTable(str(tmp_path / "out" / "latest")).to_pyarrow_table()
    assert latest.num_rows == 2 * len(VARIANTS)  # both runs merged, each image once
    assert not (tmp_path / "out" / "_staging").exists()
